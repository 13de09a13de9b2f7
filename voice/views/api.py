"""Authenticated JSON endpoints for the chat UI: WebSocket tickets and session feedback."""

from __future__ import annotations

import json
import uuid

from asgiref.sync import sync_to_async
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from voice.services.auth import AuthError, Identity, identity_from_jwt, ticket_issue
from voice.services.feedback import FeedbackError, feedback_submit


def bearer_identity(request: HttpRequest) -> Identity:
    """The identity of `Authorization: Bearer <JWT>` (raises AuthError)."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthError("missing bearer token")
    return identity_from_jwt(token.strip())


def _unauthorized() -> JsonResponse:
    response = JsonResponse({"error": "unauthorized"}, status=401)
    response["WWW-Authenticate"] = "Bearer"
    return response


@csrf_exempt
@require_POST
async def ticket_view(request: HttpRequest) -> JsonResponse:
    """POST /v1/voice/ticket: trade a JWT for a 30-second single-use WebSocket ticket."""
    try:
        identity = bearer_identity(request)
    except AuthError:
        return _unauthorized()
    ticket, ttl = await ticket_issue(identity)
    response = JsonResponse({"ticket": ticket, "expires_in": ttl})
    response["Cache-Control"] = "no-store"
    return response


@csrf_exempt
@require_POST
async def feedback_view(request: HttpRequest, session_id: uuid.UUID) -> JsonResponse:
    """POST /v1/voice/sessions/<id>/feedback: the session owner's rating, within 24 h."""
    try:
        identity = bearer_identity(request)
    except AuthError:
        return _unauthorized()
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        return JsonResponse({"error": "invalid_feedback", "message": "body must be JSON"}, status=400)
    if not isinstance(body, dict):
        return JsonResponse({"error": "invalid_feedback", "message": "body must be an object"}, status=400)
    try:
        await sync_to_async(feedback_submit, thread_sensitive=False)(
            session_id=str(session_id), external_user_id=identity.user_id,
            rating=body.get("rating"), comment=body.get("comment"),
        )
    except FeedbackError as exc:
        return JsonResponse({"error": "invalid_feedback", "message": str(exc)}, status=exc.status)
    return JsonResponse({"status": "ok"}, status=201)
