"""The OpenAI Realtime upstream (GA protocol over a WebSocket), with connect retries."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlencode

import websockets
from django.conf import settings
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from voice.realtime.upstream import Upstream, UpstreamClosed, UpstreamConnectError

logger = logging.getLogger(__name__)

# openai-python's list of close codes worth a retry.
RETRYABLE_CLOSE_CODES = frozenset({1001, 1005, 1006, 1011, 1012, 1013, 1015})
_FATAL_HTTP_STATUSES = frozenset({400, 401, 403, 404})


def upstream_url() -> str:
    """OPENAI_REALTIME_URL?model=OPENAI_REALTIME_MODEL."""
    base = settings.OPENAI_REALTIME_URL
    separator = "&" if "?" in base else "?"
    return f"{base}{separator}{urlencode({'model': settings.OPENAI_REALTIME_MODEL})}"


class OpenAIUpstream(Upstream):
    """A GA realtime session at OpenAI (or anything speaking the protocol at OPENAI_REALTIME_URL)."""

    kind = "openai"

    def __init__(self, *, url: str | None = None, api_key: str | None = None) -> None:
        self.url = url or upstream_url()
        self.api_key = api_key if api_key is not None else settings.OPENAI_API_KEY
        self._ws: ClientConnection | None = None

    async def connect(self) -> None:
        """Called once per session: open the socket, retrying with exponential backoff."""
        attempts = max(1, settings.RETRY_MAX_ATTEMPTS)
        delay = settings.RETRY_BASE_DELAY
        for attempt in range(1, attempts + 1):
            try:
                self._ws = await asyncio.wait_for(
                    connect(
                        self.url,
                        additional_headers={"Authorization": f"Bearer {self.api_key or 'local'}"},
                        max_size=16 * 1024 * 1024,
                        compression=None,  # base64 audio does not compress; deflate costs CPU per frame
                        ping_interval=20,
                        ping_timeout=20,
                        open_timeout=settings.VOICE_UPSTREAM_CONNECT_TIMEOUT,
                        proxy=None,
                    ),
                    timeout=settings.VOICE_UPSTREAM_CONNECT_TIMEOUT + 1,
                )
                return
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in _FATAL_HTTP_STATUSES:
                    raise UpstreamConnectError(f"upstream refused the handshake (HTTP {status})", fatal=True) from None
                reason = f"HTTP {status}"
            except (OSError, TimeoutError, websockets.exceptions.WebSocketException) as exc:
                reason = type(exc).__name__
            logger.warning("upstream connect attempt %d/%d failed: %s", attempt, attempts, reason)
            if attempt < attempts:
                await asyncio.sleep(delay)
                delay *= settings.RETRY_BACKOFF_FACTOR
        raise UpstreamConnectError(f"upstream unreachable after {attempts} attempts")

    async def send(self, text: str) -> None:
        """Called for each event to forward."""
        if self._ws is None:
            raise UpstreamClosed(None, "not connected")
        try:
            await self._ws.send(text)
        except ConnectionClosed as exc:
            raise UpstreamClosed(exc.rcvd.code if exc.rcvd else 1006) from None

    async def recv(self) -> str:
        """Called by the session's reader loop."""
        if self._ws is None:
            raise UpstreamClosed(None, "not connected")
        try:
            message = await self._ws.recv()
        except ConnectionClosed as exc:
            raise UpstreamClosed(exc.rcvd.code if exc.rcvd else 1006, exc.rcvd.reason if exc.rcvd else "") from None
        if isinstance(message, bytes):
            return message.decode("utf-8", errors="replace")
        return message

    async def close(self) -> None:
        """Called at session end or recycle."""
        if self._ws is not None:
            await self._ws.close()


def make_upstream() -> Upstream:
    """The upstream configured by VOICE_UPSTREAM: OpenAI (or a URL speaking its protocol) or the local engine."""
    if settings.VOICE_UPSTREAM == "local":
        from voice.realtime.engine.upstream import LocalUpstream

        return LocalUpstream()
    return OpenAIUpstream()
