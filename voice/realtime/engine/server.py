"""Standalone WebSocket server speaking the Realtime GA protocol, one EngineSession per connection.

`python manage.py realtime_engine --port 8765` runs it; point OPENAI_REALTIME_URL at
ws://127.0.0.1:8765/v1/realtime to use it as the "openai" upstream. Tests start it on an ephemeral
port with `await start_engine_server()` (same loop) or `EngineServerThread` (own thread and loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from functools import partial
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .config import EngineConfig
from .protocol import error_event
from .session import EngineClosed, EngineSession

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # GA allows 15 MiB per append event
_UNAUTHORIZED = json.dumps({"error": {"type": "invalid_request_error", "code": "invalid_api_key",
                                      "message": "Incorrect API key provided.", "param": None}})  # fmt: skip


def _authorize(config: EngineConfig, connection: ServerConnection, request: Request) -> Response | None:
    """Handshake check: any non-empty bearer token passes (401 otherwise, or when fail_with says so)."""
    auth = request.headers.get("Authorization", "")
    token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    if not token or config.fail_with == "invalid_api_key":
        return connection.respond(HTTPStatus.UNAUTHORIZED, _UNAUTHORIZED + "\n")
    return None


async def _pump(ws: ServerConnection, session: EngineSession) -> None:
    """Forward the session's events to the socket in order; perform its close when it ends."""
    while True:
        item = await session.out.get()
        if isinstance(item, EngineClosed):
            if item.code == 1006:  # abnormal closure cannot be sent: drop the TCP connection instead
                ws.transport.abort()
            else:
                await ws.close(item.code, item.reason[:120])
            return
        await ws.send(item)


async def _handle(config: EngineConfig, ws: ServerConnection) -> None:
    """One connection = one session; the beta header is refused like GA does (error + close 4000)."""
    request = ws.request
    if request is not None and request.headers.get("OpenAI-Beta", "").lower().startswith("realtime"):
        message = "The beta Realtime API shape is no longer supported; remove the OpenAI-Beta header."
        await ws.send(json.dumps(error_event("beta_api_shape_disabled", message)))
        await ws.close(4000, "beta_api_shape_disabled")
        return
    query = parse_qs(urlsplit(request.path if request else "").query)
    session = EngineSession(config, model=(query.get("model") or [None])[0])
    session.start()
    writer = asyncio.create_task(_pump(ws, session))
    try:
        async for message in ws:
            session.receive(message)
    except ConnectionClosed:
        pass
    finally:
        session.shutdown()
        # Let the writer flush a close the session asked for; otherwise stop it.
        if not writer.done():
            writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await writer


async def start_engine_server(
    host: str = "127.0.0.1", port: int = 0, config: EngineConfig | None = None
) -> tuple[Server, int]:
    """Start listening on the current loop; returns (server, bound port). Close with server.close()."""
    config = config or EngineConfig()
    server = await ws_serve(
        partial(_handle, config), host, port, process_request=partial(_authorize, config),
        max_size=MAX_MESSAGE_BYTES, compression=None,
    )  # fmt: skip
    bound = next(iter(server.sockets)).getsockname()[1]
    return server, bound


async def serve(host: str, port: int, config: EngineConfig | None = None) -> None:
    """Run the engine server until cancelled (the management command's main)."""
    server, bound = await start_engine_server(host, port, config)
    log.info("local realtime engine listening on ws://%s:%s/v1/realtime", host, bound)
    try:
        await server.serve_forever()
    finally:
        server.close()
        await server.wait_closed()


class EngineServerThread:
    """The server on its own thread and loop, for synchronous tests or a live Django server."""

    def __init__(self, config: EngineConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config, self.host, self.port = config, host, port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: Server | None = None
        self._thread = threading.Thread(target=self._run, name="realtime-engine", daemon=True)

    @property
    def url(self) -> str:
        """The ws:// URL of the realtime endpoint."""
        return f"ws://{self.host}:{self.port}/v1/realtime"

    def start(self) -> EngineServerThread:
        """Called once; returns when the socket is listening."""
        self._thread.start()
        self._ready.wait(10)
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server, self.port = self._loop.run_until_complete(
            start_engine_server(self.host, self.port, self.config)
        )
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def stop(self) -> None:
        """Called at teardown: closes the server and joins the thread."""
        if self._server is not None:
            future = asyncio.run_coroutine_threadsafe(self._close(), self._loop)
            future.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
