"""A real ASGI server (uvicorn + our drain) in a background thread, and a WebSocket test client."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import threading
import time
import wave
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import websockets
from websockets.asyncio.client import ClientConnection, connect

from tests import secret_scan
from voice.server import VoiceServer, server_config

FRAME_BYTES = 1920  # 40 ms of 24 kHz pcm16


class LiveServer:
    """One gateway instance on an ephemeral (or given) port, with its own event loop thread."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self.host = host  # another local address (e.g. a test namespace's link end) binds only there
        self.requested_port = port
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: VoiceServer | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/v1/ws/voice"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> LiveServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.requested_port))
        self.port = sock.getsockname()[1]
        config = server_config(host=self.host, port=self.port, access_log=True, loop="asyncio")
        self.server = VoiceServer(config)
        self._started.clear()

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(self._started.set)
            self.loop.run_until_complete(self.server.serve(sockets=[sock]))
            self.loop.run_until_complete(_cancel_leftovers())
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

        self._thread = threading.Thread(target=run, name=f"live-server-{self.port}", daemon=True)
        self._thread.start()
        self._started.wait(5)
        deadline = time.time() + 10
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        assert self.server.started, "server did not start"
        return self

    def call(self, coro: Any, timeout: float = 10) -> Any:
        """Run a coroutine on the server's loop (e.g. drain_all) and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        """Graceful stop: drains live sessions (4012) like SIGTERM, then uvicorn's shutdown."""
        if self.server is not None and self._thread is not None:
            self.server.should_exit = True
            self._thread.join(20)
            self.server = None

    def kill(self) -> None:
        """Abrupt stop: connections are dropped without drain (force_exit)."""
        if self.server is not None and self._thread is not None:
            self.server.force_exit = True
            self.server.should_exit = True
            self._thread.join(20)
            self.server = None


async def _cancel_leftovers() -> None:
    """Like asyncio.run: cancel what is still pending (probes, readers) before the loop closes."""
    from voice.services.state import get_state

    await get_state().aclose()
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class VoiceClient:
    """A test client for /v1/ws/voice that records every event it receives."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._cursor = 0
        self.close_code: int | None = None

    @classmethod
    async def open(cls, url: str, *, token: str | None = None, query: str = "",
                   subprotocols: list[str] | None = None, origin: str | None = None,
                   sock: socket.socket | None = None) -> VoiceClient:
        """Connect (over `sock` when given: an unconnected socket, e.g. one made in a test namespace)."""
        params = []
        if token:
            params.append(f"token={token}")
        if query:
            params.append(query)
        full = url + ("?" + "&".join(params) if params else "")
        headers = {"Origin": origin} if origin else None
        extra: dict[str, Any] = {}
        if sock is not None:
            target = urlsplit(url)
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (target.hostname, target.port)), 10)
            extra["sock"] = sock
        try:
            ws = await connect(full, subprotocols=subprotocols, additional_headers=headers, max_size=None,
                               open_timeout=10, proxy=None, **extra)
        except websockets.InvalidStatus as exc:  # a refused handshake is a response too: secret-scanned
            secret_scan.record_refused_handshake(exc.response)
            raise
        return cls(ws)

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(event))

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def next_event(self, timeout: float = 5) -> dict[str, Any]:
        if self._cursor < len(self.events):
            self._cursor += 1
            return self.events[self._cursor - 1]
        try:
            raw = await asyncio.wait_for(self.ws.recv(), timeout)
        except websockets.ConnectionClosed as exc:
            self.close_code = exc.rcvd.code if exc.rcvd else 1006
            if exc.rcvd:
                secret_scan.record_ws("close", f"{exc.rcvd.code} {exc.rcvd.reason}")
            raise
        secret_scan.record_ws("<-", raw)  # everything the gateway sends a client is secret-scanned
        event = json.loads(raw)
        self.events.append(event)
        self._cursor += 1
        return event

    async def wait_for(self, kind: str, timeout: float = 10, **match: Any) -> dict[str, Any]:
        """Skip events until one of type `kind` (matching fields) arrives."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {kind} within {timeout}s; saw {[e['type'] for e in self.events][-15:]}")
            event = await self.next_event(left)
            if event["type"] == kind and all(event.get(k) == v for k, v in match.items()):
                return event

    async def wait_closed(self, timeout: float = 5) -> int:
        """Drain events until the server closes; return the close code."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(websockets.ConnectionClosed):
            while time.monotonic() < deadline:
                await self.next_event(deadline - time.monotonic())
        if self.close_code is None:
            await asyncio.wait_for(self.ws.wait_closed(), max(0.1, deadline - time.monotonic()))
            self.close_code = self.ws.close_code
            secret_scan.record_ws("close", f"{self.ws.close_code} {self.ws.close_reason}")
        return self.close_code  # type: ignore[return-value]

    def seen(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    async def close(self) -> None:
        await self.ws.close()

    async def stream_pcm(self, pcm: bytes, *, pace: float = 0.0) -> int:
        """Send pcm16 as 40 ms appends; `pace` seconds between frames (0 = as fast as possible)."""
        frames = 0
        for offset in range(0, len(pcm), FRAME_BYTES):
            chunk = pcm[offset:offset + FRAME_BYTES]
            await self.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode()})
            frames += 1
            if pace:
                await asyncio.sleep(pace)
            elif frames % 10 == 0:
                await asyncio.sleep(0)
        return frames


async def session_with_a_turn(url: str, token: str, text: str = "Litter moisture?") -> VoiceClient:
    """A ready session that has had one answered text turn."""
    client = await VoiceClient.open(url, token=token)
    await client.wait_for("gateway.session.ready")
    await client.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
    await client.send({"type": "response.create"})
    await client.wait_for("response.done", timeout=15)
    return client


def read_wav(path: Path) -> bytes:
    with wave.open(str(path), "rb") as wav:
        assert wav.getframerate() == 24000 and wav.getsampwidth() == 2 and wav.getnchannels() == 1
        return wav.readframes(wav.getnframes())


async def text_turn(client: VoiceClient, text: str = "Litter moisture?", timeout: float = 30) -> None:
    """One answered text turn: the session relays both ways."""
    await client.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
    await client.send({"type": "response.create"})
    await client.wait_for("response.done", timeout=timeout)
