"""Operator HTTP endpoints: Prometheus `/metrics`, `GET /v1/voice/stats`, and
`POST /v1/voice/plans/<code>/subscribers`. Thin: access checks here, figures in voice.services.stats."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from voice import metrics
from voice.selectors import staff_user_for_external_id
from voice.services.auth import AuthError, identity_from_jwt
from voice.services.plans import PlanNotFound, plan_update
from voice.services.state import get_state
from voice.services.stats import live_session_ids_sync, parse_since, stats_report

DEFAULT_SINCE = timedelta(days=7)


# --- /metrics -----------------------------------------------------------------------------------------
def _bearer(request: HttpRequest) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def metrics_allowed(request: HttpRequest) -> bool:
    """Called per scrape: the METRICS_TOKEN bearer when set, else a client in METRICS_ALLOWED_NETWORKS."""
    token = settings.METRICS_TOKEN
    if token:
        offered = _bearer(request) or ""
        return hmac.compare_digest(offered.encode(), token.encode())
    try:
        client = ipaddress.ip_address((request.META.get("REMOTE_ADDR") or "").split("%")[0])
    except ValueError:
        return False
    for network in settings.METRICS_ALLOWED_NETWORKS:
        try:
            if client in ipaddress.ip_network(network.strip(), strict=False):
                return True
        except ValueError:
            continue
    return False


def _registry() -> CollectorRegistry:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


@require_GET
async def metrics_view(request: HttpRequest) -> HttpResponse:
    """Called by Prometheus: the exposition of this process's metrics (403 when not allowed)."""
    if not metrics_allowed(request):
        return HttpResponse("Forbidden\n", status=403, content_type="text/plain")
    metrics.REDIS_FALLBACK.set(1 if get_state().using_fallback else 0)
    metrics.EVENT_LOOP_TASKS.set(len(asyncio.all_tasks()))  # this view runs on the serving loop (async)
    return HttpResponse(generate_latest(_registry()), content_type=CONTENT_TYPE_LATEST)


# --- staff access (stats, plans API) --------------------------------------------------------------------
def staff_check(request: HttpRequest) -> tuple[AbstractBaseUser | None, JsonResponse | None]:
    """Called by staff endpoints (sync; ORM): (staff user, None) when allowed, else (None, 401/403).

    Accepted: a Django admin session of a staff user, or `Authorization: Bearer <access JWT>` whose user
    (VoiceProfile.external_id, else username) is an active staff user.
    """
    raw = _bearer(request)
    if raw is not None:
        try:
            identity = identity_from_jwt(raw)
        except AuthError:
            return None, JsonResponse({"error": "unauthorized"}, status=401)
        staff = staff_user_for_external_id(identity.user_id)
        if staff is None:
            return None, JsonResponse({"error": "forbidden"}, status=403)
        return staff, None
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return None, JsonResponse({"error": "unauthorized"}, status=401)
    if not (user.is_active and user.is_staff):
        return None, JsonResponse({"error": "forbidden"}, status=403)
    return user, None


@require_GET
def stats_view(request: HttpRequest) -> JsonResponse:
    """Called for GET /v1/voice/stats[?since=7d] by staff (sync view: the ORM work runs in a thread)."""
    _, denial = staff_check(request)
    if denial is not None:
        return denial
    try:
        since = parse_since(request.GET["since"]) if "since" in request.GET else DEFAULT_SINCE
    except ValueError as exc:
        return JsonResponse({"error": "bad_request", "message": str(exc)}, status=400)
    return JsonResponse(stats_report(since=since, live_ids=live_session_ids_sync()))


def _csrf_failure(request: HttpRequest) -> HttpResponse | None:
    """Session-authenticated POSTs need a CSRF token (bearer requests do not carry ambient credentials)."""
    return CsrfViewMiddleware(lambda _: HttpResponse()).process_view(request, None, (), {})


@csrf_exempt
@require_POST
def plan_subscribers_view(request: HttpRequest, code: str) -> JsonResponse:
    """Called by the main application: POST {"active_subscribers": N} keeps the adoption KPI current."""
    staff, denial = staff_check(request)
    if denial is not None:
        return denial
    if _bearer(request) is None and _csrf_failure(request) is not None:
        return JsonResponse({"error": "forbidden", "message": "CSRF check failed"}, status=403)
    try:
        body = json.loads(request.body or b"{}")
        count = body["active_subscribers"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        message = 'expected {"active_subscribers": <non-negative integer>}'
        return JsonResponse({"error": "bad_request", "message": message}, status=400)
    try:
        plan, changes = plan_update(code=code, actor_id=staff.pk, active_subscribers=count)
    except PlanNotFound:
        return JsonResponse({"error": "not_found", "message": f"unknown plan {code!r}"}, status=404)
    except ValidationError as exc:
        return JsonResponse({"error": "bad_request", "message": "; ".join(exc.messages)}, status=400)
    return JsonResponse({"plan": plan.code, "active_subscribers": plan.active_subscribers,
                         "changed": bool(changes)})

