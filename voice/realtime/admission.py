"""The admission gate: at most VOICE_ADMISSION_CONCURRENCY connections of this event loop are being admitted
(authentication, access decision, upstream handshake, rows, up to `gateway.session.ready`) at any moment.

A reconnect storm (another instance drained, a load balancer failed over) brings hundreds of connections at
once. Admitted together, each of them has a step ready in every turn of the event loop, and the live
sessions' frames wait behind all of those steps (the loop runs every ready callback before it polls the
sockets again); they also all finish late together. Through the gate, admissions queue in arrival order
(FIFO), a bounded number progress at a time (enough to overlap their Redis, database and upstream round
trips), the frames wait behind at most that many steps, and the first in line are ready first.
"""

from __future__ import annotations

import asyncio

from django.conf import settings

from voice.realtime.registry import loop_local

_gates: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}


def admission_gate() -> asyncio.Semaphore:
    """The running loop's gate (a semaphore released by whoever ends the admission, ready or not)."""
    return loop_local(_gates, lambda: asyncio.Semaphore(max(1, settings.VOICE_ADMISSION_CONCURRENCY)))
