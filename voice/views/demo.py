"""GET /voice/demo/: the voice demo page (development and staging only).

The page is a thin UI over `voice/static/voice/voice-client.js`, the module the chat UI embeds. It is
served only when `DEBUG` or `VOICE_DEMO_ENABLED` is on (404 otherwise), with a strict
Content-Security-Policy: no inline script, configuration travels in data- attributes.
"""

from __future__ import annotations

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",  # ES modules and the AudioWorklet, same origin only
        "style-src 'self'",
        "img-src 'self' data:",
        "media-src 'self' blob:",
        "connect-src 'self' ws: wss:",  # the voice WebSocket (may be another host behind a proxy)
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)


def demo_enabled() -> bool:
    return bool(settings.DEBUG or getattr(settings, "VOICE_DEMO_ENABLED", False))


@require_GET
def demo_view(request: HttpRequest) -> HttpResponse:
    """The demo page; 404 unless DEBUG or VOICE_DEMO_ENABLED."""
    if not demo_enabled():
        raise Http404("The voice demo is disabled")
    response = render(request, "voice/demo.html", {"max_session_s": settings.MAX_SESSION_DURATION})
    response["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response["Permissions-Policy"] = "microphone=(self), camera=(), geolocation=()"
    response["Referrer-Policy"] = "no-referrer"  # a ?token= must never leak through Referer
    response["Cache-Control"] = "no-store"
    return response
