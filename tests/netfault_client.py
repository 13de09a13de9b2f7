"""A voice client on a shaped link: text turns, audio arrival times, automatic resume, playback model.

Follows the client contract of docs/PROTOCOL.md the way voice/static/voice/voice-client.js does: keep the
latest resume token; on a resumable close (1006, 1001, 1012, 4012) reconnect with `?resume=` after the
same backoff; play answer audio through the same jitter buffer (`playback_gaps` models `_onAudioDelta`,
`_flushPending` and `_schedule`). Used by tests/test_netfaults.py and bench/netfaults.py.
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import websockets

from tests.live import VoiceClient

RESUMABLE_CLOSE_CODES = {4012, 1012, 1011, 1006, 1001}  # voice-client.js RESUMABLE_CLOSE_CODES
BYTES_PER_MS = 48


@dataclass
class Backoff:
    """voice-client.js's resume schedule: attempt 1 within `first_ms` (jitter only), then base·2^(n-1) ±25 %."""

    first_ms: float = 250
    base_ms: float = 400
    max_ms: float = 2000
    attempts: int = 15

    def delay_s(self, attempt: int) -> float:
        """Seconds to wait before resume attempt `attempt` (1-based)."""
        if attempt == 1:
            return random.random() * self.first_ms / 1000
        backoff = min(self.max_ms, self.base_ms * 2 ** (attempt - 1))
        return backoff * (0.75 + random.random() * 0.5) / 1000


@dataclass
class Turn:
    """One question and what came back, with client-clock arrival times (time.monotonic())."""

    question: str
    sent_at: float
    deltas: list[tuple[float, float]] = field(default_factory=list)  # (arrival, audio ms)
    transcript: str = ""
    done: dict[str, Any] | None = None
    done_at: float | None = None

    @property
    def first_audio_s(self) -> float | None:
        """Turn latency as the user hears it begins: question sent → first answer audio received."""
        return self.deltas[0][0] - self.sent_at if self.deltas else None

    @property
    def audio_ms(self) -> float:
        return sum(ms for _, ms in self.deltas)

    def final_transcript(self) -> str:
        """The transcript response.done says was spoken (to compare with the deltas received)."""
        for item in (self.done or {}).get("response", {}).get("output", []):
            for part in item.get("content", []):
                if part.get("transcript") is not None:
                    return part["transcript"]
        return ""


class LinkClient:
    """One user's session over `make_socket()` sockets, resuming by itself after a resumable close."""

    def __init__(self, url: str, token: str, make_socket: Callable[[], Any], backoff: Backoff | None = None) -> None:
        self.url, self.token, self.make_socket = url, token, make_socket
        self.backoff = backoff or Backoff()
        self.client: VoiceClient | None = None
        self.readies: list[dict[str, Any]] = []
        self.resume_token: str | None = None
        self.closes: list[tuple[float, int]] = []  # (when, close code)
        self.resumes: list[dict[str, Any]] = []  # {closed_at, ready_at, attempts}

    async def connect(self, resume: str | None = None, timeout: float = 30) -> dict[str, Any]:
        """Open a connection (resuming when a token is given) and wait for gateway.session.ready."""
        client = await VoiceClient.open(self.url, token=self.token, query=f"resume={resume}" if resume else "",
                                        sock=self.make_socket())
        ready = await client.wait_for("gateway.session.ready", timeout=timeout)
        self.client = client
        self.readies.append(ready)
        self.resume_token = ready["resume_token"]
        return ready

    async def _resume(self, code: int) -> None:
        closed_at = time.monotonic()
        self.closes.append((closed_at, code))
        for attempt in range(1, self.backoff.attempts + 1):
            await asyncio.sleep(self.backoff.delay_s(attempt))
            try:
                await self.connect(resume=self.resume_token, timeout=15)
            except (OSError, TimeoutError, websockets.WebSocketException):
                continue
            self.resumes.append({"closed_at": closed_at, "ready_at": time.monotonic(), "attempts": attempt})
            return
        raise ConnectionError(f"no resume after {self.backoff.attempts} attempts")

    async def next_event(self, timeout: float) -> dict[str, Any] | None:
        """The next event; after a resumable close, resume first and return None (the turn is cut)."""
        assert self.client is not None
        try:
            return await self.client.next_event(timeout)
        except websockets.ConnectionClosed:
            code = self.client.close_code or 1006
            if code not in RESUMABLE_CLOSE_CODES:
                raise
            await self._resume(code)
            return None

    async def ask(self, text: str, *, on_audio: Callable[[Turn], None] | None = None,
                  timeout: float = 60) -> Turn:
        """A typed turn (conversation.item.create + response.create), recorded until response.done."""
        assert self.client is not None
        await self.client.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
        await self.client.send({"type": "response.create"})
        turn = Turn(question=text, sent_at=time.monotonic())
        deadline = turn.sent_at + timeout
        while time.monotonic() < deadline:
            event = await self.next_event(max(0.1, deadline - time.monotonic()))
            if event is None:
                return turn  # the connection was replaced mid-answer: the rest of this answer is gone
            kind = event["type"]
            if kind == "response.output_audio.delta":
                turn.deltas.append((time.monotonic(), len(base64.b64decode(event["delta"])) / BYTES_PER_MS))
                if on_audio is not None:
                    on_audio(turn)
            elif kind == "response.output_audio_transcript.delta":
                turn.transcript += event["delta"]
            elif kind == "response.done":
                turn.done, turn.done_at = event, time.monotonic()
                return turn
        raise TimeoutError(f"no response.done within {timeout}s")

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


def playback_gaps(deltas: list[tuple[float, float]], initial_buffer_ms: float, done_at: float | None = None,
                  max_buffer_ms: float | None = None) -> dict[str, Any]:
    """Replay arrivals through voice-client.js's jitter buffer: when playback starts, and every silence
    inside the answer (an underrun: the buffer ran dry, then refilled before playing on).

    The JS client buffers `initialBufferMs` before the first sample, schedules chunks back to back while
    audio is playing, and after an underrun buffers again, twice as much each time up to `maxBufferMs`
    (`max_buffer_ms` None: a fixed buffer, the client before the adaptive one); response.done flushes.
    """
    buffer_ms = initial_buffer_ms
    playhead = 0.0  # when the audio scheduled so far ends
    started_at: float | None = None
    pending: list[float] = []
    gaps: list[dict[str, float]] = []

    def flush(now: float) -> None:
        nonlocal playhead, started_at
        start = max(playhead, now + 0.02)
        if started_at is None:
            started_at = start
        elif start > playhead:
            gaps.append({"at": playhead, "ms": (start - playhead) * 1000})
        playhead = start + sum(pending) / 1000
        pending.clear()

    for arrival, ms in deltas:
        if started_at is not None and playhead > arrival and not pending:
            playhead += ms / 1000  # playing: appended behind what is scheduled
            continue
        if started_at is not None and not pending and max_buffer_ms is not None:
            buffer_ms = min(max_buffer_ms, buffer_ms * 2)  # an underrun: buffer more from now on
        pending.append(ms)
        if sum(pending) >= buffer_ms:
            flush(arrival)
    if pending:
        flush(done_at if done_at is not None else deltas[-1][0])
    return {
        "started_at": started_at,
        "ended_at": playhead,
        "gaps": gaps,
        "gap_count": len(gaps),
        "gap_ms": sum(g["ms"] for g in gaps),
        "buffer_ms": buffer_ms,
    }
