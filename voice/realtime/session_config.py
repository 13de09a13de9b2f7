"""The session configuration the gateway owns (instructions, voice, audio formats, turn detection)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from django.conf import settings

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


def input_transcription() -> dict[str, Any]:
    """The input transcription settings (model, and language when pinned)."""
    transcription: dict[str, Any] = {"model": settings.VOICE_TRANSCRIPTION_MODEL}
    if settings.VOICE_INPUT_LANGUAGE:
        transcription["language"] = settings.VOICE_INPUT_LANGUAGE
    return transcription


def session_update_event() -> dict[str, Any]:
    """The one GA `session.update` sent when an upstream session is created."""
    return {
        "type": "session.update",
        "session": {
            "type": "realtime",
            "model": settings.OPENAI_REALTIME_MODEL,
            "instructions": instructions(),
            "output_modalities": ["audio"],
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": input_transcription(),
                    "noise_reduction": {"type": "near_field"},
                    "turn_detection": {
                        "type": "server_vad",
                        "threshold": settings.VOICE_VAD_THRESHOLD,
                        "prefix_padding_ms": settings.VOICE_VAD_PREFIX_MS,
                        "silence_duration_ms": settings.VOICE_VAD_SILENCE_MS,
                        # The gateway decides when to answer, after injecting retrieved context.
                        "create_response": False,
                        "interrupt_response": True,
                    },
                },
                "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": settings.VOICE_NAME},
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
