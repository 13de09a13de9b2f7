"""The voice socket's WebSocket protocol for uvicorn: websockets-sansio with a fast path for data frames.

Measured (docs/BENCHMARKS.md), uvicorn's websockets-sansio protocol spends most of a relayed frame's CPU
in plumbing rather than in the relay: a generator-driven frame parser, a message dict and an
asyncio.Queue hop per frame, a pause_reading/resume_reading pair per message, and a send coroutine
chain per outgoing frame. This subclass keeps websockets in charge of everything that is rare or
subtle — the handshake, control frames, fragmentation, close handshakes, keepalive, protocol errors
(1002, 1007, 1009) — and handles only the common case itself: a complete, unfragmented, masked text
frame in, a text frame out.

Incoming frames are cut from the stream here; each one that is not a plain text frame is handed to
websockets whole, so its parser is always at a frame boundary and its state stays exact. Text goes to
an Inbox (voice/realtime/inbox.py), whose bypass lets the app relay a frame synchronously while its
reader is parked.

The app reaches the fast path through the ASGI scope extension `FASTPATH_EXTENSION`:
``set_text_handler(fn)`` installs the bypass (``fn(payload: bytes) -> bool``: a text frame's UTF-8
payload, True when handled; unhandled frames arrive as usual, decoded), and
``send_text_nowait(payload: bytes) -> bool`` writes a text frame at once (False: use `send`). Payloads
stay bytes: a relayed frame is never decoded and encoded back.
Servers without it (daphne, runserver) serve the same app through plain ASGI.
"""

from __future__ import annotations

import time
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.exceptions import InvalidState
from websockets.protocol import OPEN
from websockets.speedups import apply_mask

from voice.handshake_pacing import upgrading_accepted_at
from voice.realtime.inbox import MAX_QUEUED, BypassHandler, Inbox

FASTPATH_EXTENSION = "intelia.voice.fastpath"
_FIN_TEXT = 0x81  # FIN bit + text opcode, no RSV bits


def text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented text frame (server to client)."""
    size = len(payload)
    if size < 126:
        return bytes((_FIN_TEXT, size)) + payload
    if size < 65536:
        return b"\x81\x7e" + size.to_bytes(2, "big") + payload
    return b"\x81\x7f" + size.to_bytes(8, "big") + payload


class VoiceWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol with frame-level fast paths (see the module docstring)."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any], _loop: Any = None):
        super().__init__(config, server_state, app_state, _loop)
        self.queue: Inbox = Inbox()  # type: ignore[assignment]  # the asyncio.Queue subset uvicorn uses
        self._fast = False  # set once the handshake is done: frames are cut here
        self._pending = b""  # an incomplete frame's bytes
        self._in_fragmented_message = False  # fragments all go to websockets
        self._max_size = config.ws_max_size
        self._accepted = False
        self._write_paused = False
        # A peer gets as long to answer our close frame as to answer a ping (uvicorn: a fixed 10 s).
        self.close_timeout = config.ws_ping_timeout or self.close_timeout

    # --- handshake -----------------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        """Called by the event loop once the TCP connection is accepted."""
        # The admission's first phase starts when the socket was accepted (voice_admission_phase).
        self._connected_at = upgrading_accepted_at() or time.monotonic()
        super().connection_made(transport)

    def handle_connect(self, event: Any) -> None:
        """Called by websockets once the upgrade request is parsed: offer the fast path to the app."""
        super().handle_connect(event)
        if self.response.status_code == 101:
            self.scope["extensions"][FASTPATH_EXTENSION] = {
                "set_text_handler": self.set_text_handler,
                "send_text_nowait": self.send_text_nowait,
                "connected_at": self._connected_at,
            }

    def connection_lost(self, exc: Exception | None) -> None:
        """Called by the event loop once the socket is gone."""
        super().connection_lost(exc)
        # The scope's extension holds this protocol's bound methods (a cycle through the scope): without it,
        # an ended connection is freed by reference counting instead of by the next full collection.
        getattr(self, "scope", {}).get("extensions", {}).pop(FASTPATH_EXTENSION, None)
        self.queue.bypass = None

    def shutdown(self) -> None:
        """Called by uvicorn as the server shuts down (after the app's drain): close, and cut off a peer that
        does not answer within the close timeout (uvicorn's graceful close waits on a silent one: see `_close`)."""
        pending = self.close_timer  # our close already sent: its peer keeps the time it had left
        deadline = pending.when() if pending is not None else self.loop.time() + self.close_timeout
        super().shutdown()
        if not self.disconnected:
            self.close_timer = self.loop.call_at(deadline, self.transport.abort)

    def keepalive_timeout(self) -> None:
        """Called when a ping's pong is the ping timeout late: the link is dead, nothing more will reach it."""
        super().keepalive_timeout()
        self.transport.abort()  # a graceful close would wait to flush the unsent frames first (see `send`)

    def set_text_handler(self, handler: BypassHandler | None) -> None:
        """Called by the app (once accepted) to relay text frames synchronously while it is idle."""
        self.queue.bypass = handler

    # --- frames in -----------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        """Called by the event loop with bytes from the client."""
        if not self._fast:
            super().data_received(data)
            return
        if self._pending:
            data, self._pending = self._pending + data, b""
        pos, end = 0, len(data)
        while end - pos >= 2:
            first, second = data[pos], data[pos + 1]
            size, head = second & 0x7F, pos + 2
            if size == 126:
                if end - pos < 4:
                    break
                size, head = (data[pos + 2] << 8) | data[pos + 3], pos + 4
            elif size == 127:
                if end - pos < 10:
                    break
                size, head = int.from_bytes(data[pos + 2:pos + 10], "big"), pos + 10
            if size > self._max_size or not second & 0x80:
                self._leave_fast(data[pos:])  # too big or unmasked: websockets closes with 1009 / 1002
                return
            frame_end = head + 4 + size
            if frame_end > end:
                break
            if first == _FIN_TEXT and not self._in_fragmented_message:
                payload = apply_mask(data[head + 4:frame_end], data[head:head + 4])
                if not self.close_sent and not self.queue.try_bypass(payload):  # past close: discarded
                    try:
                        text = payload.decode()
                    except UnicodeDecodeError:
                        self._leave_fast(data[pos:])  # websockets closes with 1007
                        return
                    self.queue.put_nowait(text)
            elif not self._to_websockets(data[pos:frame_end], first):
                return
            pos = frame_end
        if pos < end:
            self._pending = data[pos:]
        if not self.read_paused and self.queue.qsize() >= MAX_QUEUED:
            self.read_paused = True
            self.transport.pause_reading()

    def _to_websockets(self, frame: bytes, first: int) -> bool:
        """A whole control, binary or fragment frame for websockets; False once the connection fails."""
        if first & 0x0F < 0x8:  # a data frame (text, binary, continuation): a message is open until FIN
            self._in_fragmented_message = not first & 0x80
        self.conn.receive_data(frame)
        if self.conn.parser_exc is not None:
            self.handle_parser_exception()
            return False
        self.handle_events()
        return True

    def _leave_fast(self, rest: bytes) -> None:
        self._fast = False
        self._pending = b""
        super().data_received(rest)

    async def receive(self) -> Any:
        """Called by the app for its next message."""
        message = await self.queue.get()
        if self.read_paused and self.queue.empty():
            self.read_paused = False
            self.transport.resume_reading()
        if message.__class__ is str:
            return {"type": "websocket.receive", "text": message}
        return message

    # --- frames out ----------------------------------------------------------------------------------
    def pause_writing(self) -> None:
        """Called by the transport when its write buffer is full."""
        self._write_paused = True
        super().pause_writing()

    def resume_writing(self) -> None:
        """Called by the transport when its write buffer drained."""
        self._write_paused = False
        super().resume_writing()

    def send_text_nowait(self, payload: bytes) -> bool:
        """Called by the app to write a text frame (UTF-8 `payload`) now; False when closing or backed up."""
        # `_accepted`: the handshake is done and no HTTP response replaced it (both final once true).
        if (not self._accepted or self.close_sent or self.disconnected or self._write_paused
                or self.conn.state is not OPEN):
            return False
        self.transport.write(text_frame(payload))
        return True

    def _close(self, code: int, reason: str) -> None:
        """The app closes an accepted connection: uvicorn's close, without its two waits on a peer that reads
        nothing more (a phone that changed network mid-answer, a superseded connection). uvicorn's `send` first
        waits until the write buffer drains, and its close timer closes the transport gracefully, which flushes
        that buffer first: on a silent link neither happens until TCP gives up (minutes), so a resume waited on
        the old connection's close and a shutdown on its socket. Here the close frame joins the buffer at once,
        and a peer that has not answered it within the close timeout is cut off (abort)."""
        if self.disconnected:
            raise ClientDisconnected()
        if self.close_sent:
            raise RuntimeError("Unexpected ASGI message 'websocket.close', after sending 'websocket.close'.")
        if self.transport.is_closing():
            return
        try:
            self.conn.send_close(code, reason)
        except InvalidState:
            raise ClientDisconnected() from None
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        if self.read_paused:  # the peer's answer to the close must be read
            self.read_paused = False
            self.transport.resume_reading()
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.abort)

    async def send(self, message: Any) -> None:
        """Called by the app for every ASGI send."""
        if message["type"] == "websocket.send" and self.handshake_complete and self.initial_response is None:
            if self.close_sent or self.disconnected:
                raise ClientDisconnected()  # ASGI: an OSError, which the app expects once the socket is gone
            if message.get("text") is not None and self.conn.state is OPEN:
                self.transport.write(text_frame(message["text"].encode()))
                if not self.writable.is_set():  # the client reads slower than we write: wait for it
                    await self.writable.wait()
                return
        if message["type"] == "websocket.close" and self.handshake_complete and self.initial_response is None:
            self._close(message.get("code", 1000), message.get("reason", "") or "")
            return
        await super().send(message)
        if message["type"] == "websocket.accept" and self.handshake_complete and not self.close_sent:
            self._accepted = True
            self._fast = not self.conn.reader.buffer
