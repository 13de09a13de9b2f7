"""New connections' handshakes paced over the event loop's turns, so that a burst of them never holds the
live sessions' frames.

A reconnect storm (another instance drained, a load balancer failed over) brings hundreds of TCP
connections within a few milliseconds. The event loop accepts them all at once, and in its next turn parses
every upgrade request, answers every WebSocket handshake and starts every connection's app: 250 of them were
~50-80 ms of work in one turn, during which no frame of a live session moved. That one turn was the p99 of
the live sessions' frames during a storm (`bench/storm.py`, "p99 per 250 ms": 68-79 ms in the storm's first
250 ms, 10-28 ms after it). The admission gate (voice/realtime/admission.py) bounds the work after the
handshake; this bounds the handshakes: a new connection's socket is not read until the pacer lets it, at
most VOICE_HANDSHAKES_PER_TURN connections per turn of the loop, first come first served. A connection
arriving alone is read in the next turn.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

from django.conf import settings
from uvicorn.protocols.http.h11_impl import H11Protocol

from voice.realtime.registry import loop_local


class HandshakePacer:
    """Resumes reading at most `per_turn` new connections per turn of one event loop, in arrival order."""

    def __init__(self, per_turn: int) -> None:
        self.per_turn = max(1, per_turn)
        self._waiting: collections.deque[asyncio.Transport] = collections.deque()
        self._scheduled = False

    def admit(self, transport: asyncio.Transport) -> None:
        """Called as a connection is accepted, its reading paused: it will be read in a later turn."""
        self._waiting.append(transport)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._release)

    def _release(self) -> None:
        # A callback scheduled from a callback runs in the next turn, after that turn's socket events: the
        # live sessions' frames are read between two batches.
        waiting = self._waiting
        for _ in range(min(self.per_turn, len(waiting))):
            transport = waiting.popleft()
            if not transport.is_closing():
                transport.resume_reading()
        if waiting:
            asyncio.get_running_loop().call_soon(self._release)
        else:
            self._scheduled = False


_pacers: dict[asyncio.AbstractEventLoop, HandshakePacer] = {}
_accepted_at: list[float] = []  # the accept time of the connection being upgraded (a synchronous hand-over)


def handshake_pacer() -> HandshakePacer:
    """The running loop's pacer."""
    return loop_local(_pacers, lambda: HandshakePacer(settings.VOICE_HANDSHAKES_PER_TURN))


def upgrading_accepted_at() -> float | None:
    """Called by the WebSocket protocol as it takes over an upgraded connection: when its socket was
    accepted (the admission's handshake phase starts there), or None outside an upgrade."""
    return _accepted_at[-1] if _accepted_at else None


class PacedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol whose connections are read only when the loop's pacer lets them."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Called by the event loop once the TCP connection is accepted."""
        self._accepted_at = time.monotonic()
        super().connection_made(transport)
        transport.pause_reading()
        handshake_pacer().admit(transport)

    def handle_websocket_upgrade(self, event: Any) -> None:
        """Called by h11 on an upgrade request: the WebSocket protocol takes the connection over."""
        _accepted_at.append(self._accepted_at)
        try:
            super().handle_websocket_upgrade(event)
        finally:
            _accepted_at.pop()
