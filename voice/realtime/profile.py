"""RealtimeProfile: the OpenAI models and voice settings one session uses (its plan's, else the environment's)."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings


@dataclass(frozen=True, slots=True)
class RealtimeProfile:
    """What a plan chooses for its sessions; every blank choice takes the environment default."""

    model: str
    transcription_model: str
    voice: str
    vad_type: str  # server_vad | semantic_vad
    vad_eagerness: str  # semantic_vad only: auto | low | medium | high

    @classmethod
    def resolve(cls, *, model: str = "", transcription_model: str = "", voice: str = "", vad_type: str = "",
                vad_eagerness: str = "") -> RealtimeProfile:
        """Called per plan when plans are loaded (and with no arguments for the environment defaults)."""
        return cls(
            model=model or settings.OPENAI_REALTIME_MODEL,
            transcription_model=transcription_model or settings.VOICE_TRANSCRIPTION_MODEL,
            voice=voice or settings.VOICE_NAME,
            vad_type=vad_type or settings.VOICE_VAD_TYPE,
            vad_eagerness=vad_eagerness or settings.VOICE_VAD_EAGERNESS,
        )
