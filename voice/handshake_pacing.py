"""New connections' handshakes paced over the event loop's turns, so that a burst of them never holds the
live sessions' frames.

A reconnect storm (another instance drained, a load balancer failed over) brings hundreds of TCP
connections within a few milliseconds. The event loop accepts them all at once, and in its next turn parses
every upgrade request, answers every WebSocket handshake and starts every connection's app: 250 of them were
~50-80 ms of work in one turn, during which no frame of a live session moved. That one turn was the p99 of
the live sessions' frames during a storm (`bench/storm.py`, "p99 per 250 ms": 68-79 ms in the storm's first
250 ms, 10-28 ms after it). The admission gate (voice/realtime/admission.py) bounds the work after the
handshake; this bounds the handshakes: a new connection's first request is not handled until the pacer lets it,
at most VOICE_HANDSHAKES_PER_TURN connections per turn of the loop, first come first served. A connection
arriving alone is handled in the next turn. What is paced is the request's arrival, not the accept: clients
connect one by one as their TCP handshakes complete, then send their upgrade requests, which a storm's
clients do within the same few milliseconds. Pacing the accepts (the first version) let every request of a
storm be handled in one turn all the same: a 40-60 ms stall of the loop when 250 upgrade requests arrive at
once on accepted connections (`bench/handshake_burst.py`; docs/BENCHMARKS.md, "Day 5").
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, Protocol

from django.conf import settings
from uvicorn.protocols.http.h11_impl import H11Protocol

from voice.realtime.registry import loop_local


class PacedConnection(Protocol):
    transport: asyncio.Transport

    def handshake(self) -> None: ...


class HandshakePacer:
    """Lets at most `per_turn` new connections handle their first request per turn of one event loop, in
    arrival order."""

    def __init__(self, per_turn: int) -> None:
        self.per_turn = max(1, per_turn)
        self._waiting: collections.deque[PacedConnection] = collections.deque()
        self._scheduled = False

    def admit(self, connection: PacedConnection) -> None:
        """Called as a new connection's first bytes arrive, its reading paused: handled in a later turn."""
        self._waiting.append(connection)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._release)

    def _release(self) -> None:
        # A callback scheduled from a callback runs in the next turn, after that turn's socket events: the
        # live sessions' frames are read between two batches.
        waiting = self._waiting
        for _ in range(min(self.per_turn, len(waiting))):
            connection = waiting.popleft()
            if not connection.transport.is_closing():
                connection.handshake()
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
    """uvicorn's h11 protocol whose first request is handled only when the loop's pacer lets it."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Called by the event loop once the TCP connection is accepted."""
        self._accepted_at = time.monotonic()
        self._first_bytes: bytes | None = None
        self._paced = False
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        """Called by the event loop with the client's bytes: the first ones wait for the pacer's turn."""
        if self._paced:
            super().data_received(data)
        elif self._first_bytes is None:
            self._first_bytes = data
            self.transport.pause_reading()
            handshake_pacer().admit(self)
        else:  # read in the same batch as the first ones
            self._first_bytes += data

    def handshake(self) -> None:
        """Called by the pacer in this connection's turn: handle what arrived so far, then read on."""
        self._paced = True
        data, self._first_bytes = self._first_bytes or b"", None
        self.transport.resume_reading()
        super().data_received(data)

    def handle_websocket_upgrade(self, event: Any) -> None:
        """Called by h11 on an upgrade request: the WebSocket protocol takes the connection over."""
        _accepted_at.append(self._accepted_at)
        try:
            super().handle_websocket_upgrade(event)
        finally:
            _accepted_at.pop()
