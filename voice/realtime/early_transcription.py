"""Early transcript while the user speaks: a parallel transcription-only upstream session.

With a streaming transcription model (gpt-realtime-whisper) the conversation session itself sends
transcript deltas during speech (early transcription mode "inline": nothing here is used). Other models
transcribe the turn only after it is committed, too late to search the knowledge base while the user
speaks (Option B). With EARLY_TRANSCRIPTION=openai the
gateway opens a second, transcription-only session (`?intent=transcription`, GA `session.type:
"transcription"`, no turn detection), copies the user's audio into it, and commits it in short slices
(EARLY_TRANSCRIPTION_SLICE_MS) while the conversation session's VAD says the user is speaking. Each slice's
`…input_audio_transcription.completed` extends the partial transcript handed to the prefetcher.

It is an optimisation: any failure here disables it for the session and never affects the conversation.
It costs a second transcription of the user's speech and a second socket (docs/DEPLOYMENT.md, section 11).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from django.conf import settings

from voice.realtime import protocol_tap
from voice.realtime.client_events import dump_event
from voice.realtime.session_config import input_transcription
from voice.realtime.upstream import Upstream, UpstreamError

logger = logging.getLogger(__name__)
MIN_COMMIT_MS = 100  # OpenAI refuses smaller commits (input_audio_buffer_commit_empty)
IDLE_CLEAR_MS = 3000  # silence between turns is dropped, not transcribed


def transcription_upstream() -> Upstream:
    """The transcription-only upstream for the configured VOICE_UPSTREAM (`?intent=transcription`)."""
    from voice.realtime.openai_upstream import OpenAIUpstream, upstream_kind, upstream_url

    if upstream_kind() == "local":
        from voice.realtime.engine.upstream import LocalUpstream

        return LocalUpstream()

    return OpenAIUpstream(url=upstream_url() + "&intent=transcription")


def transcription_session_update(model: str) -> dict[str, Any]:
    """GA session.update of a transcription-only session with manual commits."""
    return {
        "type": "session.update",
        "session": {
            "type": "transcription",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": input_transcription(model),
                    "noise_reduction": {"type": "near_field"},
                    "turn_detection": None,
                }
            },
        },
    }


class EarlyTranscriber:
    """Feeds a transcription-only session and reports the growing transcript of the current turn."""

    def __init__(self, on_transcript: Callable[[str], None], transcription_model: str,
                 upstream_factory: Callable[[], Upstream] = transcription_upstream) -> None:
        self.on_transcript = on_transcript
        self.transcription_model = transcription_model
        self.on_usage: Callable[[dict[str, Any]], Any] | None = None  # each slice's usage, for the session cost
        self.upstream_factory = upstream_factory
        self.upstream: Upstream | None = None
        self.ready = False
        self.failed = False
        self.speaking = False
        self.pending_ms = 0.0
        self.text = ""
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Called once when the conversation upstream is up; failures only disable early transcripts."""
        try:
            self.upstream = self.upstream_factory()
            await self.upstream.connect()
        except UpstreamError as exc:
            self._fail(exc)
            return
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def on_audio(self, text: str, audio_bytes: int) -> None:
        """Called for every client audio append (the frame is copied verbatim)."""
        if not self.ready or self.failed:
            return
        await self._send_text(text)
        self.pending_ms += audio_bytes / 48
        if self.speaking and self.pending_ms >= settings.EARLY_TRANSCRIPTION_SLICE_MS:
            await self._commit()
        elif not self.speaking and self.pending_ms >= IDLE_CLEAR_MS:
            self.pending_ms = 0
            await self._send({"type": "input_audio_buffer.clear"})

    def speech_started(self) -> None:
        """Called on the conversation's speech_started: a new transcript begins."""
        self.speaking, self.text = True, ""

    async def speech_stopped(self) -> None:
        """Called on the conversation's speech_stopped: transcribe the tail, then go idle."""
        if self.speaking and self.pending_ms >= MIN_COMMIT_MS:
            await self._commit()
        self.speaking = False

    async def close(self) -> None:
        """Called when the session ends."""
        if self._reader is not None:
            self._reader.cancel()
        if self.upstream is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.upstream.close(), 2)

    async def _commit(self) -> None:
        self.pending_ms = 0
        await self._send({"type": "input_audio_buffer.commit"})

    async def _send(self, event: dict[str, Any]) -> None:
        await self._send_text(dump_event(event))

    async def _send_text(self, text: str) -> None:
        if self.upstream is None or self.failed:
            return
        if protocol_tap.gateway_sent is not None:
            protocol_tap.gateway_sent(text)
        try:
            await self.upstream.send(text)
        except UpstreamError as exc:
            self._fail(exc)

    async def _read(self) -> None:
        assert self.upstream is not None
        try:
            while True:
                event = json.loads(await self.upstream.recv())
                kind = event.get("type")
                if kind == "session.created":
                    await self._send(transcription_session_update(self.transcription_model))
                elif kind in ("session.updated", "transcription_session.updated"):
                    self.ready = True
                elif kind == "conversation.item.input_audio_transcription.completed":
                    if self.on_usage is not None:
                        self.on_usage(event.get("usage"))
                    piece = str(event.get("transcript") or "").strip() if self.speaking else ""
                    if piece:
                        self.text = f"{self.text} {piece}".strip()
                        self.on_transcript(self.text)
                elif kind == "error":
                    code = (event.get("error") or {}).get("code")
                    if code != "input_audio_buffer_commit_empty":
                        logger.info("early transcription error: %s", code)
        except asyncio.CancelledError:
            raise
        except (UpstreamError, ValueError, AttributeError) as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if not self.failed:
            logger.warning("early transcription disabled for this session: %s", type(exc).__name__)
        self.failed = True
