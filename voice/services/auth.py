"""Authentication of voice connections: JWT access tokens (simplejwt) and single-use tickets."""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass

from django.conf import settings
from rest_framework_simplejwt.exceptions import TokenError
from rest_framework_simplejwt.tokens import AccessToken

from voice.services.state import get_state

TICKET_PREFIX = "ticket:"


class AuthError(Exception):
    """The credentials are missing or invalid. The message never contains the credential."""


@dataclass(frozen=True)
class Identity:
    """Who is connecting, from a validated access token."""

    user_id: str
    email: str = ""
    plan: str | None = None  # the `plan` claim; None = use the plan on the local profile


def identity_from_jwt(raw: str | None) -> Identity:
    """Validate an access JWT (signature, expiry, type `access`, `user_id`) and return its identity."""
    if not raw:
        raise AuthError("missing token")
    if len(raw) > settings.JWT_MAX_TOKEN_BYTES:
        raise AuthError("token too large")
    try:
        token = AccessToken(raw)  # verifies signature/alg, exp, nbf, aud/iss when set, token_type
    except TokenError as exc:
        raise AuthError("invalid or expired token") from exc
    user_id = token.payload.get("user_id")
    if user_id in (None, ""):
        raise AuthError("token has no user_id")
    plan = token.payload.get("plan")
    email = token.payload.get("email") or ""
    return Identity(
        user_id=str(user_id),
        email=str(email)[:254],
        plan=str(plan).lower() if plan else None,
    )


def issue_access_token(*, user_id: str, plan: str | None = None, email: str = "", minutes: int = 60) -> str:
    """Sign an access token in the format the main application issues (demos, support, tests)."""
    from datetime import timedelta

    token = AccessToken()
    token.set_exp(lifetime=timedelta(minutes=minutes))
    token["user_id"] = user_id
    if plan:
        token["plan"] = plan
    if email:
        token["email"] = email
    return str(token)


async def ticket_issue(identity: Identity) -> tuple[str, int]:
    """Called by POST /v1/voice/ticket: store the identity under a random single-use ticket."""
    ticket = secrets.token_urlsafe(24)
    ttl = settings.VOICE_TICKET_TTL
    await get_state().set_json(TICKET_PREFIX + ticket, asdict(identity), ttl)
    return ticket, ttl


async def ticket_redeem(ticket: str | None) -> Identity:
    """Called on connect with ?ticket=: consume it (works once) and return its identity."""
    if not ticket or len(ticket) > 128:
        raise AuthError("missing ticket")
    data = await get_state().pop_json(TICKET_PREFIX + ticket)
    if not data:
        raise AuthError("invalid or used ticket")
    return Identity(**data)
