"""The admission gate: at most VOICE_ADMISSION_CONCURRENCY connections of this event loop are being admitted
(authentication and the access decision: the database and Redis) at any moment.

A reconnect storm (another instance drained, a load balancer failed over) brings hundreds of connections at
once. Admitted together, each of them has a step ready in every turn of the event loop, and the live
sessions' frames wait behind all of those steps (the loop runs every ready callback before it polls the
sockets again); they also all finish late together. Through the gate, admissions queue in arrival order
(FIFO), a bounded number progress at a time (enough to overlap their Redis and database round trips), the
frames wait behind at most that many steps, and the first in line are ready first.

The gate is given back as the upstream connection starts: its set-up is OpenAI's network round trips (TLS,
the upgrade, session.created, session.updated), a few milliseconds of CPU spread over a few hundred of wall
time. Held through them, a 16-wide gate admitted a storm at 16 per set-up time (`bench/storm.py
--upstream-setup-ms 100`: ready p95 3.9-4.0 s for 250, against 1.0-1.2 s given back there).
"""

from __future__ import annotations

import asyncio
import time

from django.conf import settings

from voice import metrics
from voice.realtime.registry import loop_local

_gates: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}


def admission_gate() -> asyncio.Semaphore:
    """The running loop's gate (a semaphore released by whoever ends the admission, ready or not)."""
    return loop_local(_gates, lambda: asyncio.Semaphore(max(1, settings.VOICE_ADMISSION_CONCURRENCY)))


ADMISSION_PHASES = ("handshake", "gate", "authenticate", "access", "upstream", "ready")
_phase_histograms = {phase: metrics.ADMISSION_PHASE.labels(phase=phase) for phase in ADMISSION_PHASES}


class AdmissionClock:
    """Times the steps of one admission (voice_admission_phase_seconds): where a storm's ready time goes."""

    __slots__ = ("_at", "_steps")

    def __init__(self, connected_at: float | None = None) -> None:
        """Called as the app takes the connection; `connected_at`: when the server accepted its socket (the
        voice server's fast path knows it), so that the handshake's own time is a phase too."""
        self._at = time.monotonic()
        self._steps: list[tuple[str, float]] = []
        if connected_at is not None:
            self._steps.append(("handshake", self._at - connected_at))

    def mark(self, phase: str) -> None:
        """Called as each step ends (in ADMISSION_PHASES order)."""
        now = time.monotonic()
        self._steps.append((phase, now - self._at))
        self._at = now

    def observe(self) -> None:
        """Called once the session is ready: the steps go to the histogram (a refused admission's do not)."""
        for phase, seconds in self._steps:
            _phase_histograms[phase].observe(seconds)
        self._steps.clear()
