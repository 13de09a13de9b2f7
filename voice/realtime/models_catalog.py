"""Which OpenAI models a session may use: price rows, streaming transcription, announced shutdowns.

The tables live in settings (VOICE_PRICES, VOICE_TRANSCRIPTION_PRICES, VOICE_MODEL_SHUTDOWNS); this module
is the one place that answers questions about them. A model without a price row is refused (system check
at start-up, validation error on a plan save), never priced as another model.
"""

from __future__ import annotations

import datetime as dt

from django.conf import settings

from voice.realtime.engine.protocol import STREAMING_TRANSCRIPTION_MODELS


class UnpricedModel(ValueError):
    """A model is used or configured that has no price row in settings."""


def realtime_price_row(model: str) -> dict[str, float]:
    """The VOICE_PRICES row of a realtime model; raises UnpricedModel when there is none."""
    row = settings.VOICE_PRICES.get(model)
    if row is None:
        raise UnpricedModel(f"realtime model {model!r} has no price row in VOICE_PRICES")
    return row


def transcription_price_row(model: str) -> dict[str, float]:
    """The VOICE_TRANSCRIPTION_PRICES row of an input transcription model; raises UnpricedModel without one."""
    row = settings.VOICE_TRANSCRIPTION_PRICES.get(model)
    if row is None:
        raise UnpricedModel(f"transcription model {model!r} has no price row in VOICE_TRANSCRIPTION_PRICES")
    return row


def realtime_model_problem(model: str) -> str | None:
    """Why `model` cannot be a session's realtime model (None when it can)."""
    if model not in settings.VOICE_PRICES:
        known = ", ".join(sorted(settings.VOICE_PRICES))
        return f"{model!r} has no price row (VOICE_PRICES): add one first. Priced models: {known}"
    return None


def transcription_model_problem(model: str) -> str | None:
    """Why `model` cannot be a session's input transcription model (None when it can)."""
    if model not in settings.VOICE_TRANSCRIPTION_PRICES:
        known = ", ".join(sorted(settings.VOICE_TRANSCRIPTION_PRICES))
        return f"{model!r} has no price row (VOICE_TRANSCRIPTION_PRICES): add one first. Priced models: {known}"
    return None


def transcription_streams(model: str) -> bool:
    """True when the transcription model sends deltas while the user speaks (inline early transcripts)."""
    return model in STREAMING_TRANSCRIPTION_MODELS


def shutdown_warning(model: str, today: dt.date | None = None) -> str | None:
    """A warning when `model` has an announced shutdown within VOICE_MODEL_SHUTDOWN_WARN_DAYS (or past)."""
    when = settings.VOICE_MODEL_SHUTDOWNS.get(model)
    if not when:
        return None
    shutdown = dt.date.fromisoformat(when)
    days = (shutdown - (today or dt.date.today())).days
    if days > settings.VOICE_MODEL_SHUTDOWN_WARN_DAYS:
        return None
    if days < 0:
        return f"{model} was shut down on {when}"
    return f"{model} shuts down on {when} ({days} days)"


def settings_problems() -> list[str]:
    """Problems of the environment defaults (OPENAI_REALTIME_MODEL, VOICE_TRANSCRIPTION_MODEL, VAD)."""
    problems = [realtime_model_problem(settings.OPENAI_REALTIME_MODEL),
                transcription_model_problem(settings.VOICE_TRANSCRIPTION_MODEL)]
    if settings.VOICE_VAD_TYPE not in VAD_TYPES:
        problems.append(f"VOICE_VAD_TYPE {settings.VOICE_VAD_TYPE!r} is not one of {', '.join(VAD_TYPES)}")
    if settings.VOICE_VAD_EAGERNESS not in VAD_EAGERNESS:
        problems.append(f"VOICE_VAD_EAGERNESS {settings.VOICE_VAD_EAGERNESS!r} is not one of "
                        f"{', '.join(VAD_EAGERNESS)}")
    if settings.VOICE_TRANSCRIPTION_DELAY not in ("", *TRANSCRIPTION_DELAYS):
        problems.append(f"VOICE_TRANSCRIPTION_DELAY {settings.VOICE_TRANSCRIPTION_DELAY!r} is not one of "
                        f"{', '.join(TRANSCRIPTION_DELAYS)}")
    if settings.EARLY_TRANSCRIPTION not in EARLY_MODES:
        problems.append(f"EARLY_TRANSCRIPTION {settings.EARLY_TRANSCRIPTION!r} is not one of {', '.join(EARLY_MODES)}")
    return [p for p in problems if p]


VAD_TYPES = ("server_vad", "semantic_vad")
VAD_EAGERNESS = ("auto", "low", "medium", "high")
EARLY_MODES = ("auto", "inline", "openai", "off")
TRANSCRIPTION_DELAYS = ("minimal", "low", "medium", "high", "xhigh")  # gpt-realtime-whisper's `delay`


def early_transcription_mode(transcription_model: str) -> str:
    """How a session gets its transcript during speech: "inline" (the conversation session's own deltas),
    "openai" (a second, transcription-only session) or "off". EARLY_TRANSCRIPTION=auto: inline when the
    transcription model streams, else off."""
    mode = settings.EARLY_TRANSCRIPTION
    if mode == "auto":
        return "inline" if transcription_streams(transcription_model) else "off"
    return mode

