"""The session configuration the gateway owns (instructions, voice, audio formats, turn detection)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from django.conf import settings

from voice.realtime.models_catalog import transcription_streams
from voice.realtime.profile import RealtimeProfile

logger = logging.getLogger(__name__)

_FALLBACK_INSTRUCTIONS = (
    "You are Intelia Expert, a concise voice assistant for poultry producers. Answer in the user's language."
)
_PRIVATE_SESSION_FIELDS = ("instructions", "tools", "tool_choice", "prompt")


@functools.cache
def instructions() -> str:
    """The system prompt: VOICE_INSTRUCTIONS, else the prompt file, else a short fallback."""
    if settings.VOICE_INSTRUCTIONS:
        return settings.VOICE_INSTRUCTIONS
    try:
        return Path(settings.VOICE_PROMPT_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        logger.warning("prompt file not readable, using the built-in instructions")
        return _FALLBACK_INSTRUCTIONS


def input_transcription(model: str) -> dict[str, Any]:
    """The input transcription settings (model; language when pinned; `delay` for a streaming model)."""
    transcription: dict[str, Any] = {"model": model}
    if settings.VOICE_INPUT_LANGUAGE:
        transcription["language"] = settings.VOICE_INPUT_LANGUAGE
    if settings.VOICE_TRANSCRIPTION_DELAY and transcription_streams(model):
        transcription["delay"] = settings.VOICE_TRANSCRIPTION_DELAY
    return transcription


def turn_detection(profile: RealtimeProfile) -> dict[str, Any]:
    """The VAD: server_vad with the VOICE_VAD_* knobs, or semantic_vad with the profile's eagerness."""
    if profile.vad_type == "semantic_vad":
        detection: dict[str, Any] = {"type": "semantic_vad", "eagerness": profile.vad_eagerness}
    else:
        detection = {"type": "server_vad", "threshold": settings.VOICE_VAD_THRESHOLD,
                     "prefix_padding_ms": settings.VOICE_VAD_PREFIX_MS,
                     "silence_duration_ms": settings.VOICE_VAD_SILENCE_MS}
    # The gateway decides when to answer, after injecting retrieved context.
    return {**detection, "create_response": False, "interrupt_response": True}


def session_update_event(profile: RealtimeProfile) -> dict[str, Any]:
    """The one GA `session.update` sent when an upstream session is created (models and voice: the plan's)."""
    return {
        "type": "session.update",
        "session": {
            "type": "realtime",
            "model": profile.model,
            "instructions": instructions(),
            "output_modalities": ["audio"],
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": input_transcription(profile.transcription_model),
                    "noise_reduction": {"type": "near_field"},
                    "turn_detection": turn_detection(profile),
                },
                "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": profile.voice},
            },
            "tools": [],
            "tool_choice": "auto",
        },
    }


def strip_private_session_fields(event: dict[str, Any]) -> dict[str, Any]:
    """Remove the prompt and tools from session.created/updated before they reach the browser."""
    session = event.get("session")
    if isinstance(session, dict):
        event["session"] = {k: v for k, v in session.items() if k not in _PRIVATE_SESSION_FIELDS}
    return event
