"""Catch event-loop stalls in the act: what the loop thread was running while every session's audio waited.

The loop-lag probe (voice/server.py) beats every 10 ms. A watchdog thread wakes when the next beat is overdue
by `threshold` and, while the loop stays stuck, samples the loop thread's Python stack every few
milliseconds; when the loop beats again it logs the stall's length and the frames it was seen in, most
frequent first. Python code that stalls the loop gives up the GIL every switch interval (5 ms), so the
watchdog sees it. A full garbage collection holds the GIL throughout: the watchdog then gets no sample, and
the collection is reported by the GC pause watch instead (voice_gc_pause_seconds). The watchdog costs one
wake-up per `threshold` while the loop is healthy.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections import Counter

logger = logging.getLogger(__name__)
SAMPLE_INTERVAL_SECONDS = 0.003
FRAMES_KEPT = 6  # innermost frames named per sample: enough to tell a caller from a library


class StallSampler:
    """A watchdog thread over one event loop's heartbeat (`beat()`, called by the loop-lag probe)."""

    def __init__(self, threshold_seconds: float, loop_thread_id: int | None = None) -> None:
        self.threshold = threshold_seconds
        self.loop_thread_id = loop_thread_id or threading.get_ident()
        self.last_beat = time.monotonic()
        self.stalls_seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="voice-stall-sampler", daemon=True)

    def start(self) -> StallSampler:
        """Called once the event loop runs (server start-up)."""
        self._thread.start()
        return self

    def beat(self) -> None:
        """Called by the loop-lag probe on every tick: the loop is alive."""
        self.last_beat = time.monotonic()

    def stop(self) -> None:
        """Called at server shutdown."""
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.is_set():
            overdue_at = self.last_beat + self.threshold
            wait = overdue_at - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)
                continue
            stalled_beat = self.last_beat
            samples: Counter[str] = Counter()
            while self.last_beat == stalled_beat and not self._stop.is_set():
                frame = sys._current_frames().get(self.loop_thread_id)
                if frame is not None:
                    samples[_describe(frame)] += 1
                # Not kept past the sample (this local lives on between stalls): the frame would keep what the
                # loop was running then, an ended session's consumer say, alive until the next stall.
                frame = None
                time.sleep(SAMPLE_INTERVAL_SECONDS)
            if self._stop.is_set():
                return
            self.stalls_seen += 1
            stalled_ms = (time.monotonic() - stalled_beat) * 1000
            logger.warning("event loop stall of ~%.0f ms sampled %d times: %s", stalled_ms,
                           sum(samples.values()), _summary(samples) or "no sample (GIL held: a GC pause?)")


def _describe(frame: object) -> str:
    stack = traceback.extract_stack(frame)[-FRAMES_KEPT:]  # type: ignore[arg-type]
    return " < ".join(f"{_short(entry.filename)}:{entry.lineno} {entry.name}" for entry in reversed(stack))


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/voice/", "/lib/python"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def _summary(samples: Counter[str]) -> str:
    return " | ".join(f"{count}x {stack}" for stack, count in samples.most_common(3))
