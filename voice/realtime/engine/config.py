"""Configuration of the local realtime engine (`EngineConfig`), defaulting from Django settings."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# (question, context or None) -> answer text
Answerer = Callable[[str, str | None], Awaitable[str]]

log = logging.getLogger(__name__)

PLACEHOLDER_TRANSCRIPT = "[speech not recognised by the local engine]"


def setting(name: str, default: Any) -> Any:
    """Read a Django setting, falling back to `default` when Django is absent or unconfigured."""
    try:
        from django.conf import settings

        return getattr(settings, name, default)
    except Exception:  # noqa: BLE001 - ImproperlyConfigured, ImportError: the engine must run without Django
        return default


@dataclass
class EngineConfig:
    """Knobs of one engine (shared by all its sessions); read once, never mutated by sessions."""

    first_audio_ms: int = field(default_factory=lambda: int(setting("LOCAL_ENGINE_FIRST_AUDIO_MS", 0)))
    transcript_delay_ms: int = field(
        default_factory=lambda: int(setting("LOCAL_ENGINE_TRANSCRIPT_DELAY_MS", 0))
    )
    # Path to a JSON list of transcripts, or the list itself; "" / None / [] = no script.
    script: str | list[str] | None = field(default_factory=lambda: setting("LOCAL_ENGINE_SCRIPT", "") or None)
    speed: float = field(default_factory=lambda: float(setting("LOCAL_ENGINE_SPEED", 8.0)))  # <= 0: unpaced
    tts: str = field(default_factory=lambda: str(setting("LOCAL_ENGINE_TTS", "auto")))  # auto|espeak|tone
    # None: as OpenAI does, deltas during speech only when the session's transcription model streams
    # (gpt-realtime-whisper); True: for every transcription model; False: never (transcripts after commit).
    partial_transcripts: bool | None = field(
        default_factory=lambda: setting("LOCAL_ENGINE_PARTIAL_TRANSCRIPTS", None)
    )
    # "auto": recognise spoken turns (stt/) when a recogniser is installed and no script is set; "off".
    recognition: str = field(default_factory=lambda: str(setting("LOCAL_ENGINE_STT", "auto")))
    stt_model_dir: str = field(default_factory=lambda: str(setting("LOCAL_ENGINE_STT_MODEL_DIR", "var/speech")))
    stt_max_streams: int = field(default_factory=lambda: int(setting("LOCAL_ENGINE_STT_MAX_STREAMS", 8)))
    stt_max_lag_ms: int = field(default_factory=lambda: int(setting("LOCAL_ENGINE_STT_MAX_LAG_MS", 2000)))
    stt_final_timeout_ms: int = 3000  # commit -> final transcript, else a placeholder
    partial_word_ms: int = 250  # one early transcript word per this much detected speech
    answerer: Answerer | None = None
    use_rag: bool = True  # try voice.rag for questions with a known text
    fail_with: str | None = None  # one-shot fault for the next response.create (see package docstring)
    test_hooks: bool = False  # honour the `engine.test_hook` client event
    max_session_seconds: float = 3600.0
    audio_chunk_ms: int = 200  # size of each response.output_audio.delta
    model: str = field(default_factory=lambda: str(setting("OPENAI_REALTIME_MODEL", "gpt-realtime")))
    _transcripts: list[str] | None = field(default=None, init=False, repr=False)

    def transcripts(self) -> list[str]:
        """Called when a session starts; returns the scripted transcripts (loaded once, cached)."""
        if self._transcripts is None:
            script = self.script
            if isinstance(script, str | Path) and str(script):
                try:
                    script = json.loads(Path(script).read_text(encoding="utf-8"))
                except (OSError, ValueError) as exc:  # a bad dev knob must not take the gateway down
                    log.error("local engine: cannot read script %s (%s); using placeholders", script, exc)
                    script = []
            self._transcripts = [str(s) for s in (script or [])]
        return self._transcripts

    @property
    def recognises(self) -> bool:
        """Whether spoken turns are recognised for real (no script, recognition on, a recogniser installed)."""
        if self.recognition == "off" or self.transcripts():
            return False
        from .recognition import SpeechInput

        return SpeechInput.available()

    def partials_enabled(self, streaming_model: bool) -> bool:
        """Called per spoken chunk or hypothesis: whether a session whose transcription model streams (or
        not) gets transcript deltas during speech (scripted words, or recognised ones: recognition.py)."""
        return streaming_model if self.partial_transcripts is None else self.partial_transcripts
