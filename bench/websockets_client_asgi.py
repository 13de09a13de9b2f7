"""Bench only: the production gateway with the upstream client on `websockets` instead of picows.

bench/relay.py's `uvicorn-wsclient` target serves this app to compare the two upstream clients side by
side (the only difference is OpenAIUpstream's transport).
"""

import asyncio
import logging

import websockets
from django.conf import settings
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from intelia_voice.asgi import application  # noqa: F401 - re-exported for uvicorn
from voice.realtime import openai_upstream
from voice.realtime.openai_upstream import _FATAL_HTTP_STATUSES, upstream_url
from voice.realtime.upstream import Upstream, UpstreamClosed, UpstreamConnectError

logger = logging.getLogger(__name__)

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



openai_upstream.OpenAIUpstream = OpenAIUpstream  # make_upstream() resolves the name at call time
