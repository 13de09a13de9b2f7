"""WebSocket origin policy: blocks cross-site WebSocket hijacking from browsers on other sites."""

from __future__ import annotations

from typing import Any

from channels.security.websocket import OriginValidator
from django.conf import settings


class VoiceOriginValidator(OriginValidator):
    """Allows `VOICE_ALLOWED_ORIGINS` (default: the ALLOWED_HOSTS) and clients that send no Origin.

    Browsers always send `Origin` on a WebSocket handshake, so a missing header means a non-browser
    client (a backend, a test, a load generator), which cannot be a hijacking vector and still has to
    present a valid JWT.
    """

    def __init__(self, application: Any) -> None:
        allowed = list(settings.VOICE_ALLOWED_ORIGINS) or list(settings.ALLOWED_HOSTS)
        super().__init__(application, allowed)

    def valid_origin(self, parsed_origin: Any) -> bool:
        """Called once per handshake with the parsed `Origin` header (None when absent)."""
        if parsed_origin is None:
            return True
        return self.validate_origin(parsed_origin)
