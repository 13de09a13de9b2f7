"""EngineConnection: one WebSocket connection of the engine's server (picows) bound to one EngineSession.

picows parses frames in compiled code and calls `on_ws_frame` once per frame, with no task, coroutine or
queue per message; the session's events are sent from its own `deliver` calls, in order. It replaced the
`websockets` server (2026-12-04), which cost about half of the engine's CPU per received audio frame.
"""

from __future__ import annotations

import asyncio
import json
import logging

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from .config import EngineConfig
from .protocol import error_event
from .session import EngineClosed, EngineSession

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # GA allows 15 MiB per append event
CLOSE_TIMEOUT_S = 10.0  # after our close frame, how long the peer has to answer it (as `websockets`)
BETA_MESSAGE = "The beta Realtime API shape is no longer supported; remove the OpenAI-Beta header."


class EngineConnection(WSListener):
    """Frames in -> `session.receive`; `session.deliver` -> frames out; closes both ways."""

    def __init__(self, config: EngineConfig, model: str | None, live: set[EngineConnection], *, beta: bool = False):
        super().__init__()
        self.config, self.model, self.beta = config, model, beta
        self.live = live  # the server's open connections, closed with it
        self.session: EngineSession | None = None
        self.transport: WSTransport | None = None
        self._fragments: list[bytes] = []  # a fragmented message being reassembled
        self._fragments_type = WSMsgType.TEXT
        self._fragments_size = 0
        self._close_timer: asyncio.TimerHandle | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        """Called by picows after the 101: starts the session (or refuses the beta shape like GA does)."""
        self.transport = transport
        self.live.add(self)
        if self.beta:
            transport.send(WSMsgType.TEXT, json.dumps(error_event("beta_api_shape_disabled", BETA_MESSAGE)))
            self.close(4000, "beta_api_shape_disabled")
            return
        self.session = EngineSession(self.config, model=self.model)
        self.session.deliver = self._deliver
        self.session.start()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Called by picows for every frame: messages go to the session as they complete."""
        kind = frame.msg_type
        if kind is WSMsgType.TEXT and frame.fin:  # the hot path: one whole text message per frame
            try:
                text = frame.get_payload_as_utf8_text()
            except UnicodeDecodeError:
                self.close(WSCloseCode.INVALID_TEXT, "invalid UTF-8")
                return
            if self.session is not None:
                self.session.receive(text)
        elif kind in (WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION):
            self._fragment(frame)
        elif kind is WSMsgType.CLOSE:
            self._peer_closed(frame)

    def _fragment(self, frame: WSFrame) -> None:
        """A binary message, or a piece of a fragmented one: reassembled up to MAX_MESSAGE_BYTES."""
        if frame.msg_type is not WSMsgType.CONTINUATION:
            self._fragments, self._fragments_type, self._fragments_size = [], frame.msg_type, 0
        self._fragments.append(frame.get_payload_as_bytes())
        self._fragments_size += frame.payload_size
        if self._fragments_size > MAX_MESSAGE_BYTES:
            self._fragments = []
            self.close(WSCloseCode.MESSAGE_TOO_BIG, "message too big")
            return
        if not frame.fin:
            return
        data, self._fragments = b"".join(self._fragments), []
        if self._fragments_type is WSMsgType.TEXT:
            try:
                message: str | bytes = data.decode()
            except UnicodeDecodeError:
                self.close(WSCloseCode.INVALID_TEXT, "invalid UTF-8")
                return
        else:
            message = data  # binary: parsed as JSON bytes, as the `websockets` server did
        if self.session is not None:
            self.session.receive(message)

    def _peer_closed(self, frame: WSFrame) -> None:
        """The client's close frame: echoed (unless it answers ours), then hang up (the server closes TCP first)."""
        assert self.transport is not None
        if not self.transport.is_close_frame_sent:
            self.transport.send(WSMsgType.CLOSE, frame.get_payload_as_bytes())  # its code and reason, or none
        self.transport.disconnect()
        if self.session is not None:
            self.session.shutdown()

    def _deliver(self, item: str | EngineClosed) -> None:
        """The session's `deliver`: an event is sent now; its end closes the socket (1006: abort it)."""
        transport = self.transport
        if transport is None or transport.is_disconnected:
            return
        if isinstance(item, str):
            transport.send(WSMsgType.TEXT, item)
        elif item.code == 1006:  # abnormal closure cannot be sent: drop the TCP connection instead
            transport.disconnect(graceful=False)
        else:
            self.close(item.code, item.reason[:120])

    def close(self, code: int, reason: str) -> None:
        """Called by the session's end or the server's close: our close frame now; the peer's answer (or
        CLOSE_TIMEOUT_S) ends the TCP connection. The session stops at once (it may be what asked)."""
        assert self.transport is not None
        if self.session is not None:
            self.session.shutdown()
        if self.transport.is_close_frame_sent or self.transport.is_disconnected:
            return
        self.transport.send_close(code, reason.encode())  # an int: picows takes any code (4000, 1001, ...)
        self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, self.transport.disconnect)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        """Called by picows once the TCP connection is gone: the session stops (timers, responses)."""
        self.live.discard(self)
        if self._close_timer is not None:
            self._close_timer.cancel()
        if self.session is not None:
            self.session.shutdown()
        # The session's deliver is a bound method of this listener, and picows' transport refers to it too:
        # without these cycles an ended connection is freed by reference counting (test_capacity.py).
        self.session, self.transport, self._close_timer = None, None, None
