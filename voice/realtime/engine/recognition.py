"""Spoken turns recognised for real (`stt`): the session's side of the recognition worker.

Used when a recogniser is installed, `EngineConfig.recognition` is "auto" and no script is set (a
script still wins: tests rely on exact transcripts). Audio of a turn streams to the worker from the
VAD's speech start (including the prefix padding kept here); hypotheses come back while the user is
still speaking and only words AGREE (3) successive hypotheses agree on (never the last, moving word)
become transcript deltas; the final transcript arrives shortly after commit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .stt import ENGLISH, unavailable_reason
from .stt.service import OK, OVERLOADED, UNAVAILABLE, Listener, RecognitionStream, get_service
from .vad import BYTES_PER_MS

OVERLOADED_TRANSCRIPT = "[speech not recognised: the local recogniser is at capacity]"
UNAVAILABLE_TRANSCRIPT = "[speech not recognised: the local recogniser is unavailable]"
PREROLL_MS = 1000  # audio kept before speech start: covers any VAD prefix padding
AGREE = 3  # successive hypotheses that must agree on a word before it is sent as a delta


def newly_stable(sent: list[str], history: list[list[str]], current: list[str]) -> list[str]:
    """Words to add to the partial transcript: the same in the last AGREE hypotheses, never the last word
    (it is still moving). Measured on the test questions, fewer agreeing hypotheses send revised words."""
    if current[: len(sent)] != sent or len(history) < AGREE - 1:
        return []  # the recogniser revised words already sent (or is just starting): wait
    recent = history[-(AGREE - 1) :]
    agreed: list[str] = []
    for i in range(len(sent), len(current) - 1):
        if any(i >= len(h) or h[i] != current[i] for h in recent):
            break
        agreed.append(current[i])
    return agreed


@dataclass
class TurnSpeech:
    """Recognition state of one user turn."""

    stream: RecognitionStream | None
    sent: list[str] = field(default_factory=list)  # words already emitted as deltas
    history: list[list[str]] = field(default_factory=list)  # the last hypotheses (AGREE - 1 of them)
    final: asyncio.Future[str] | None = None  # resolved with the transcript once recognised
    timer: asyncio.TimerHandle | None = None

    def stable_words(self, words: list[str]) -> list[str]:
        """Called with each new hypothesis: the words it makes stable (not yet sent); remembers it."""
        new = newly_stable(self.sent, self.history, words)
        self.history = [*self.history, words][-(AGREE - 1) :]
        return new

    def settle(self, text: str, reason: str) -> str:
        """Called with the worker's final (or a refusal): resolves the turn; returns its transcript."""
        if self.timer is not None:
            self.timer.cancel()
        transcript = text if reason == OK else OVERLOADED_TRANSCRIPT if reason == OVERLOADED else UNAVAILABLE_TRANSCRIPT
        if self.final is not None and not self.final.done():
            self.final.set_result(transcript)
        return transcript

    def cancel(self) -> None:
        """Called when the turn is cleared or the session ends: no final, no callbacks."""
        if self.timer is not None:
            self.timer.cancel()
        if self.stream is not None:
            self.stream.cancel()
        if self.final is not None and not self.final.done():
            self.final.cancel()


class SpeechInput:
    """One session's recognition: the pre-roll buffer and a stream per spoken turn."""

    def __init__(self, model_dir: Path, *, max_streams: int, max_lag_ms: float, final_timeout_ms: float) -> None:
        self.service = get_service(model_dir, max_streams=max_streams, max_lag_ms=max_lag_ms)
        self.final_timeout_ms = final_timeout_ms
        self._preroll = bytearray()
        self.service.start()  # the worker warms up while the session is set up

    @staticmethod
    def available() -> bool:
        """Whether a recogniser is installed (checked before creating a SpeechInput)."""
        return unavailable_reason(ENGLISH) is None

    def heard(self, pcm: bytes) -> None:
        """Called for every appended chunk, before the VAD: keeps the last PREROLL_MS of audio."""
        self._preroll += pcm
        excess = len(self._preroll) - PREROLL_MS * BYTES_PER_MS
        if excess > 0:
            del self._preroll[:excess]

    def start(self, language: str | None, speech_ms_ago: int, on_words: Callable[[list[str]], None],
              on_final: Callable[[str, str], None]) -> TurnSpeech | None:  # fmt: skip
        """Called at speech start; None when `language` is not recognised here. A full worker gives a
        turn without a stream (its transcript says so) rather than a wait."""
        if unavailable_reason(language or ENGLISH) is not None:
            return None
        loop = asyncio.get_running_loop()
        speech = TurnSpeech(None, final=loop.create_future())
        stream = self.service.open(language or ENGLISH, Listener(loop, on_words, on_final))
        if stream is None:  # full, or the worker could not start (then the transcript says unavailable)
            loop.call_soon(on_final, "", OVERLOADED if self.service.failed_reason is None else UNAVAILABLE)
            return speech
        speech.stream = stream
        keep = min(len(self._preroll), max(speech_ms_ago, 0) * BYTES_PER_MS)
        stream.feed(bytes(self._preroll[len(self._preroll) - keep :]))
        return speech

    def finish(self, speech: TurnSpeech) -> None:
        """Called at commit: ask for the final, bounded by `final_timeout_ms` (then a placeholder)."""
        if speech.stream is None:
            return
        speech.stream.finish()
        if speech.final is not None and not speech.final.done():
            stream = speech.stream
            speech.timer = asyncio.get_running_loop().call_later(
                self.final_timeout_ms / 1000, stream.abandon, OVERLOADED
            )
