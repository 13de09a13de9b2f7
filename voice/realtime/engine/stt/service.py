"""The engine side of recognition: one worker process per engine process, streams multiplexed over its pipes.

Nothing here blocks the event loop: `RecognitionStream.feed` only queues a frame (a bounded queue that a
writer thread drains into the worker's stdin); a reader thread turns the worker's replies into callbacks
scheduled on the loop that opened the stream. Capacity is bounded twice: at most `max_streams`
utterances at once (`open` returns None beyond), and a stream whose audio the worker has not decoded
within `max_lag_ms` is dropped (its final reports "overloaded"): late words are useless to a live turn.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import wire

log = logging.getLogger(__name__)

BYTES_PER_MS = 48
QUEUE_FRAMES = 4000  # ~160 s of 40 ms appends across all streams: only a dead worker fills it
RESTART_BACKOFF_S = 5.0

# final callback reasons
OK, OVERLOADED, UNAVAILABLE = "ok", "overloaded", "unavailable"


@dataclass
class Listener:
    """Callbacks of one stream, run on the opener's event loop."""

    loop: asyncio.AbstractEventLoop
    on_hypothesis: Callable[[list[str]], None]
    on_final: Callable[[str, str], None]  # (text, reason): reason OK, OVERLOADED or UNAVAILABLE


class RecognitionStream:
    """One utterance sent to the worker; used on the event loop only."""

    def __init__(self, service: RecognitionService, sid: int, listener: Listener) -> None:
        self.service, self.sid, self.listener = service, sid, listener
        self.sent_ms = 0.0
        self.decoded_ms = 0  # written by the reader thread (an int store: atomic)
        self._undecoded: deque[tuple[float, float]] = deque()  # (audio end ms, monotonic time sent)
        self.finishing = False
        self.done = False

    def feed(self, pcm: bytes) -> None:
        """Called for each chunk of the turn's audio; drops the stream when the worker lags too far."""
        if self.done or self.finishing or not pcm:
            return
        now = time.monotonic()
        self.sent_ms += len(pcm) / BYTES_PER_MS
        self._undecoded.append((self.sent_ms, now))
        if self.lag_ms(now) > self.service.max_lag_ms:
            self.abandon(OVERLOADED)
        elif not self.service.send(wire.frame(wire.AUDIO, self.sid, pcm)):
            self.abandon(OVERLOADED)

    def lag_ms(self, now: float) -> float:
        """How long the oldest audio the worker has not decoded yet has waited (since it was up)."""
        while self._undecoded and self._undecoded[0][0] <= self.decoded_ms:
            self._undecoded.popleft()
        if not self._undecoded or not self.service.ready:
            return 0.0
        return (now - max(self._undecoded[0][1], self.service.ready_at)) * 1000

    def finish(self) -> None:
        """Called at commit: the final transcript comes back through `on_final`."""
        if self.done or self.finishing:
            return
        self.finishing = True
        if not self.service.send(wire.frame(wire.FINISH, self.sid)):
            self.abandon(OVERLOADED)

    def cancel(self) -> None:
        """Called when the turn is cleared or the session ends: no callbacks after this."""
        if not self.done:
            self.done = True
            self.service.forget(self.sid, cancel=True)

    def abandon(self, reason: str) -> None:
        """Give up on this utterance: the worker forgets it, the listener gets a placeholder final."""
        if self.done:
            return
        self.cancel()
        log.warning("speech: utterance dropped (%s) after %.0f ms of audio", reason, self.sent_ms)
        self.listener.on_final("", reason)


class RecognitionService:
    """The worker process and its two pipe threads; shared by every session of this process."""

    def __init__(self, model_dir: Path, *, max_streams: int = 8, max_lag_ms: float = 2000) -> None:
        self.model_dir = Path(model_dir)
        self.max_streams = max_streams
        self.max_lag_ms = max_lag_ms
        self.ready = False
        self.ready_at = 0.0  # monotonic time the worker said it was ready
        self.failed_reason: str | None = None
        self._proc: subprocess.Popen | None = None
        self._queue: queue.Queue[bytes | None] = queue.Queue(QUEUE_FRAMES)
        self._streams: dict[int, RecognitionStream] = {}
        self._next_sid = 1
        self._started_at = 0.0
        self._lock = threading.Lock()
        self._stopping = False

    # --- engine side (event loop) ----------------------------------------------------------------
    def start(self) -> None:
        """Called when a session may need recognition: starts the worker unless it runs or just failed."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return
            if self._started_at and time.monotonic() - self._started_at < RESTART_BACKOFF_S:
                return
            self._started_at = time.monotonic()
            self.ready, self._queue = False, queue.Queue(QUEUE_FRAMES)
            self.model_dir.mkdir(parents=True, exist_ok=True)
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "voice.realtime.engine.stt.worker", str(self.model_dir)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[4],
            )  # fmt: skip
            proc, frames = self._proc, self._queue
        threading.Thread(target=self._write, args=(proc, frames), name="stt-writer", daemon=True).start()
        threading.Thread(target=self._read, args=(proc,), name="stt-reader", daemon=True).start()

    def open(self, language: str, listener: Listener) -> RecognitionStream | None:
        """Called at speech start; None when the worker is down or `max_streams` utterances are open."""
        self.start()
        if self.failed_reason is not None or len(self._streams) >= self.max_streams:
            return None
        with self._lock:
            sid, self._next_sid = self._next_sid, self._next_sid + 1
            stream = RecognitionStream(self, sid, listener)
            self._streams[sid] = stream
        if not self.send(wire.frame(wire.OPEN, sid, language.encode())):
            self.forget(sid)
            return None
        return stream

    def send(self, message: bytes) -> bool:
        """Queue one frame for the worker; False (never a wait) when the queue is full."""
        try:
            self._queue.put_nowait(message)
            return True
        except queue.Full:
            return False

    def forget(self, sid: int, *, cancel: bool = False) -> None:
        """Drop a stream (finished, cancelled or abandoned)."""
        with self._lock:
            self._streams.pop(sid, None)
        if cancel:
            self.send(wire.frame(wire.CANCEL, sid))

    def send_stop(self) -> None:
        """Ask the writer thread to end (it closes nothing; the worker exits on stdin EOF or kill)."""
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)

    @property
    def open_streams(self) -> int:
        """Utterances being recognised now."""
        return len(self._streams)

    def stop(self) -> None:
        """Called at exit (and by tests): ends the worker."""
        proc, self._stopping = self._proc, True
        self.send_stop()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)

    # --- threads ---------------------------------------------------------------------------------
    def _write(self, proc: subprocess.Popen, frames: queue.Queue) -> None:
        """Writer thread: drains the frame queue into the worker's stdin (blocking here is fine)."""
        assert proc.stdin is not None
        try:
            while (message := frames.get()) is not None:
                batch = [message]
                while len(batch) < 64:
                    try:
                        more = frames.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        return
                    batch.append(more)
                proc.stdin.write(b"".join(batch))
                proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass

    def _read(self, proc: subprocess.Popen) -> None:
        """Reader thread: turns the worker's replies into callbacks on each stream's loop."""
        assert proc.stdout is not None
        reader = wire.FrameReader(proc.stdout.fileno())
        try:
            while (messages := reader.read()) is not None:
                for op, sid, payload in messages:
                    self._dispatch(op, sid, json.loads(payload or b"{}"))
        except (OSError, ValueError):
            pass
        self._worker_gone(proc)

    def _dispatch(self, op: int, sid: int, body: dict) -> None:
        if sid == 0:
            if op == wire.READY:
                self.ready_at, self.failed_reason = time.monotonic(), None
                self.ready = True
                log.info("speech: recognition worker ready (%s)", body.get("recogniser"))
            elif op == wire.FAILED:
                self.failed_reason = str(body.get("reason"))
                log.warning("speech: recognition unavailable: %s", self.failed_reason)
            return
        stream = self._streams.get(sid)
        if stream is None or stream.done:
            return
        if op == wire.HYP:
            stream.decoded_ms = int(body.get("audio_ms") or 0)
            if body.get("changed"):
                self._call(stream, stream.listener.on_hypothesis, list(body.get("words") or []))
        elif op in (wire.FINAL, wire.FAILED):
            stream.done = True
            self.forget(sid)
            if op == wire.FINAL:
                self._call(stream, stream.listener.on_final, str(body.get("text") or ""), OK)
            else:
                log.warning("speech: utterance failed in the worker: %s", body.get("reason"))
                self._call(stream, stream.listener.on_final, "", UNAVAILABLE)

    def _call(self, stream: RecognitionStream, fn: Callable, *args: object) -> None:
        try:
            stream.listener.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the session's loop is closed: nobody is listening any more
            self.forget(stream.sid)

    def _worker_gone(self, proc: subprocess.Popen) -> None:
        """The worker exited: every open utterance gets an 'unavailable' final; the next open restarts it."""
        if proc is self._proc:
            self.ready = False
            if not self._stopping:  # refused (a placeholder at once) until a restarted worker is ready
                self.failed_reason = "the recognition worker exited"
        with self._lock:
            orphans, self._streams = list(self._streams.values()), {}
        for stream in orphans:
            if not stream.done:
                stream.done = True
                self._call(stream, stream.listener.on_final, "", UNAVAILABLE)
        code = proc.wait()
        if code and not self._stopping:
            log.warning("speech: recognition worker exited with status %s", code)


_services: dict[tuple[Path, int, float], RecognitionService] = {}
_services_lock = threading.Lock()


def get_service(model_dir: Path, *, max_streams: int, max_lag_ms: float) -> RecognitionService:
    """The process-wide service for these settings (one worker process each; created on first use)."""
    key = (Path(model_dir).resolve(), max_streams, max_lag_ms)
    with _services_lock:
        service = _services.get(key)
        if service is None:
            service = _services[key] = RecognitionService(key[0], max_streams=max_streams, max_lag_ms=max_lag_ms)
        return service


@atexit.register
def stop_services() -> None:
    """Called at exit (and by tests that used their own model directory): ends and forgets every worker."""
    with _services_lock:
        services = list(_services.values())
        _services.clear()
    for service in services:
        with contextlib.suppress(Exception):  # exiting anyway
            service.stop()
