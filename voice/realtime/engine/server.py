"""Standalone WebSocket server speaking the Realtime GA protocol, one EngineSession per connection.

`python manage.py realtime_engine --port 8765` runs it; point OPENAI_REALTIME_URL at
ws://127.0.0.1:8765/v1/realtime to use it as the "openai" upstream. Tests start it on an ephemeral
port with `await start_engine_server()` (same loop) or `EngineServerThread` (own thread and loop).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from functools import partial
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from picows import WSUpgradeRequest, WSUpgradeResponse, WSUpgradeResponseWithListener, ws_create_server

from .config import EngineConfig
from .transport import CLOSE_TIMEOUT_S, MAX_MESSAGE_BYTES, EngineConnection

log = logging.getLogger(__name__)
_UNAUTHORIZED = json.dumps({"error": {"type": "invalid_request_error", "code": "invalid_api_key",
                                      "message": "Incorrect API key provided.", "param": None}})  # fmt: skip


def _authorized(config: EngineConfig, request: WSUpgradeRequest) -> bool:
    """Handshake check: any non-empty bearer token passes (unless fail_with says the key is invalid)."""
    auth = request.headers.get("Authorization", "")
    token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    return bool(token) and config.fail_with != "invalid_api_key"


class EngineServer:
    """The listening socket and its live connections: close() also says 1001 to every client (as the
    `websockets` server did), and wait_closed() waits for them (at most CLOSE_TIMEOUT_S)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.connections: set[EngineConnection] = set()
        self.server: asyncio.Server | None = None

    @property
    def sockets(self) -> tuple[Any, ...]:
        """The listening sockets (for the bound port)."""
        return tuple(self.server.sockets) if self.server else ()

    def close(self) -> None:
        """Called to stop: no new connections; the live ones are closed with 1001 (going away)."""
        if self.server is not None:
            self.server.close()
        for connection in list(self.connections):
            connection.close(1001, "server shutting down")

    async def wait_closed(self) -> None:
        """Called after close(): returns once the socket and every connection are closed."""
        if self.server is not None:
            await self.server.wait_closed()
        pending = [asyncio.ensure_future(c.transport.wait_disconnected()) for c in self.connections if c.transport]
        if pending:
            _, late = await asyncio.wait(pending, timeout=CLOSE_TIMEOUT_S)
            for future in late:
                future.cancel()

    async def serve_forever(self) -> None:
        """Called by serve(): runs until cancelled."""
        assert self.server is not None
        await self.server.serve_forever()


def _accept(engine: EngineServer, request: WSUpgradeRequest) -> WSUpgradeResponseWithListener:
    """Called by picows for every upgrade request: 401 like OpenAI, else one EngineConnection (whose session
    takes the `?model=`; the beta header is refused after the upgrade, like GA: error + close 4000)."""
    if not _authorized(engine.config, request):
        body = (_UNAUTHORIZED + "\n").encode()
        refusal = WSUpgradeResponse.create_error_response(HTTPStatus.UNAUTHORIZED, body,
                                                          {"Content-Type": "application/json"})  # fmt: skip
        return WSUpgradeResponseWithListener(refusal, None)
    query = parse_qs(urlsplit(request.path.decode("latin-1")).query)
    beta = request.headers.get("OpenAI-Beta", "").lower().startswith("realtime")
    listener = EngineConnection(engine.config, (query.get("model") or [None])[0], engine.connections, beta=beta)
    return WSUpgradeResponseWithListener(WSUpgradeResponse.create_101_response(), listener)


async def start_engine_server(
    host: str = "127.0.0.1", port: int = 0, config: EngineConfig | None = None
) -> tuple[EngineServer, int]:
    """Start listening on the current loop; returns (server, bound port). Close with server.close()."""
    engine = EngineServer(config or EngineConfig())
    engine.server = await ws_create_server(
        partial(_accept, engine), host, port, max_frame_size=MAX_MESSAGE_BYTES, websocket_handshake_timeout=10,
        logger_name="realtime_engine",
    )  # fmt: skip
    return engine, engine.sockets[0].getsockname()[1]


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
        self._server: EngineServer | None = None
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
        self._server, self.port = self._loop.run_until_complete(start_engine_server(self.host, self.port, self.config))
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
