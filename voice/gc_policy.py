"""When the cyclic garbage collector may pause the process: young collections always, full ones when it is idle.

A full collection walks every tracked object of the process with the GIL held; no frame moves meanwhile. With
Django and the app frozen at start-up, what is left to walk is the live sessions' own objects (~470 each):
~90 ms at 400 sessions on a 2 vCPU EPYC (docs/BENCHMARKS.md "Capacity v2"). CPython starts one whenever the
objects that survived two young collections since the last one exceed a quarter of the old generation, i.e.
right after every burst of admissions (every new session's objects are long-lived) and every ~30 s under
steady load: that stall was what held the gateway at 250 sessions per core.

Ended sessions are freed by reference counting (their cycles are broken at session end, test_capacity.py),
so what reaches the old generation is live state, not garbage: a full collection finds almost nothing.
The policy: CPython's own full collections are off (threshold 2 out of reach); young collections (generations
0 and 1) run as before; a full collection runs when no session is live (nobody hears it), or at the latest
VOICE_GC_FULL_MAX_SECONDS after the previous one, whatever the load (bounding the cyclic garbage a busy
process can hold). Every full collection is timed and logged by `watch_gc_pauses`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

from django.conf import settings

logger = logging.getLogger(__name__)
GC_PAUSE_WARNING_SECONDS = 0.02
FULL_COLLECTIONS_OFF = 1_000_000  # generation-1 collections between full ones: never reached
CHECK_SECONDS = 1.0


class FullCollectionPolicy:
    """Owns the process's full collections while a server runs (start at start-up, stop at shutdown)."""

    def __init__(self, max_interval_seconds: float) -> None:
        self.max_interval = max_interval_seconds
        self.last_full = time.monotonic()
        self.full_collections = 0
        self._saved_threshold: tuple[int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> FullCollectionPolicy:
        """Called at server start-up, after Django and the app are frozen out of the collector."""
        if self.max_interval <= 0:
            return self  # CPython's own policy
        self._saved_threshold = gc.get_threshold()
        young, middle, _ = self._saved_threshold
        gc.set_threshold(young, middle, FULL_COLLECTIONS_OFF)
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def stop(self) -> None:
        """Called at server shutdown: CPython's thresholds back (tests run several servers in one process)."""
        if self._task is not None:
            self._task.cancel()
        if self._saved_threshold is not None:
            gc.set_threshold(*self._saved_threshold)
            self._saved_threshold = None

    def due(self, *, now: float, sessions_live: bool) -> bool:
        """Called every second: a full collection now? Only if objects reached the old generation since
        the last one, and either nobody is listening or the longest interval has passed."""
        if gc.get_count()[2] == 0:
            return False
        return not sessions_live or now - self.last_full >= self.max_interval

    async def _run(self) -> None:
        from voice.realtime.registry import live_sessions

        while True:
            await asyncio.sleep(CHECK_SECONDS)
            now = time.monotonic()
            if self.due(now=now, sessions_live=bool(live_sessions())):
                gc.collect(2)
                self.last_full = time.monotonic()
                self.full_collections += 1


def watch_gc_pauses() -> Callable[[str, dict[str, int]], None]:
    """Time every cyclic collection (voice_gc_pause_seconds) and log the ones long enough to be heard."""
    from voice import metrics

    started: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            pause = time.perf_counter() - started.pop()
            metrics.GC_PAUSE.labels(generation=str(info["generation"])).observe(pause)
            if pause > GC_PAUSE_WARNING_SECONDS:
                logger.warning("gc pause %.0f ms (generation %d, %d collected): every session's audio waited",
                               pause * 1000, info["generation"], info["collected"])

    gc.callbacks.append(on_gc)
    return on_gc


def full_collection_policy_start() -> FullCollectionPolicy:
    """Called at server start-up (VOICE_GC_FULL_MAX_SECONDS; 0 leaves CPython's own policy)."""
    return FullCollectionPolicy(settings.VOICE_GC_FULL_MAX_SECONDS).start()
