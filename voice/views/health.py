"""GET /v1/voice/health: the operators' health report. Never fails because a dependency is down."""

from __future__ import annotations

import asyncio

from django.conf import settings
from django.http import JsonResponse
from django.utils import timezone
from django.views.decorators.http import require_GET

from voice.services.state import get_state


async def health_report() -> dict:
    """The health document (also used by `voice_health`)."""
    state = get_state()
    reachable = False
    info: dict = {}
    if state.enabled:
        try:
            reachable = await asyncio.wait_for(state.ping(), 2)
            info = await asyncio.wait_for(state.info(), 2) if reachable else {}
        except TimeoutError:
            reachable = False
    redis = {"redis_available": reachable, **state.describe()}
    redis.update(
        {"redis_version": info.get("redis_version"), "connected_clients": info.get("connected_clients"),
         "used_memory_human": info.get("used_memory_human")}
    )
    if not settings.ENABLE_VOICE_REALTIME:
        status = "disabled"
    elif state.enabled and not reachable:
        status = "degraded"
    else:
        status = "healthy"
    return {
        "status": status,
        "feature_enabled": settings.ENABLE_VOICE_REALTIME,
        "openai_configured": bool(settings.OPENAI_API_KEY),
        "upstream": settings.VOICE_UPSTREAM,
        "weaviate_enabled": settings.RAG_BACKEND == "weaviate" and bool(settings.WEAVIATE_URL),
        "redis": redis,
        "version": settings.APP_VERSION,
        "timestamp": timezone.now().isoformat(),
    }


@require_GET
async def health_view(request) -> JsonResponse:
    """Called by load balancers and operators."""
    return JsonResponse(await health_report())
