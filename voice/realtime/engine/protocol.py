"""GA protocol shapes for the local engine: ids, error events, session defaults, validation, usage."""

from __future__ import annotations

import copy
import itertools
import secrets
import time
from typing import Any

DEFAULT_INSTRUCTIONS = "You are a helpful voice assistant. Answer briefly."
DEFAULT_TURN_DETECTION: dict[str, Any] = {
    "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
    "idle_timeout_ms": None, "create_response": True, "interrupt_response": True,
}  # fmt: skip
# Input transcription models that stream `conversation.item.input_audio_transcription.delta` while the user
# is still speaking (GA; the `delay` knob tunes them). The others transcribe a turn only after its commit.
STREAMING_TRANSCRIPTION_MODELS = frozenset({"gpt-realtime-whisper"})
# The session object of a transcription-only session (`session.type: "transcription"`) has only these.
TRANSCRIPTION_SESSION_FIELDS = ("type", "object", "id", "expires_at", "audio", "include")
SEMANTIC_SILENCE_MS = {"low": 1000, "medium": 500, "auto": 500, "high": 250}
# Beta-era names GA rejects as a whole update (protocol notes §3).
BETA_FIELDS = (
    "voice", "modalities", "input_audio_format", "output_audio_format", "turn_detection", "temperature",
    "input_audio_transcription", "input_audio_noise_reduction",
)  # fmt: skip
GA_FIELDS = {
    "type", "model", "instructions", "output_modalities", "audio", "tools", "tool_choice",
    "max_output_tokens", "tracing", "truncation", "prompt", "include", "object", "id", "expires_at",
}  # fmt: skip
REPLACED_WHOLE = {
    "turn_detection",
    "transcription",
    "noise_reduction",
    "format",
    "tools",
    "output_modalities",
}

_PREFIX = secrets.token_hex(4)
_counter = itertools.count(1)


def event_id() -> str:
    """A cheap unique server event id (counter, no randomness per event)."""
    return f"event_{_PREFIX}{next(_counter):x}"


def new_id(prefix: str) -> str:
    """An OpenAI-looking object id: sess_, item_, resp_."""
    return f"{prefix}_{secrets.token_hex(10)}"


def error_event(
    code: str, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
    client_event_id: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """An `error` server event; error.event_id echoes the offending client event's id."""
    return {
        "type": "error",
        "event_id": event_id(),
        "error": {
            "type": kind,
            "code": code,
            "message": message,
            "param": param,
            "event_id": client_event_id,
        },
    }


def default_session(model: str) -> dict[str, Any]:
    """The session object announced in `session.created` (OpenAI's defaults, GA shape)."""
    return {
        "type": "realtime", "object": "realtime.session", "id": new_id("sess"), "model": model,
        "output_modalities": ["audio"], "instructions": DEFAULT_INSTRUCTIONS,
        "tools": [], "tool_choice": "auto", "max_output_tokens": "inf", "tracing": None,
        "truncation": "auto", "prompt": None, "include": None, "expires_at": int(time.time()) + 3600,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000}, "transcription": None,
                "noise_reduction": None, "turn_detection": dict(DEFAULT_TURN_DETECTION),
            },
            "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin", "speed": 1.0},
        },
    }  # fmt: skip


def validate_session(patch: Any) -> tuple[str, str, str] | None:
    """(code, message, param) when a `session.update` payload is not acceptable GA, else None."""
    if not isinstance(patch, dict):
        return "missing_required_parameter", "Missing required parameter: 'session'.", "session"
    for name in BETA_FIELDS:
        if name in patch:
            return "unknown_parameter", f"Unknown parameter: 'session.{name}'.", f"session.{name}"
    for name in patch:
        if name not in GA_FIELDS:
            return "unknown_parameter", f"Unknown parameter: 'session.{name}'.", f"session.{name}"
    if "type" not in patch:
        return "missing_required_parameter", "Missing required parameter: 'session.type'.", "session.type"
    if patch["type"] not in ("realtime", "transcription"):
        return "invalid_value", f"Invalid value: '{patch['type']}'.", "session.type"
    modalities = patch.get("output_modalities")
    if modalities is not None and modalities not in (["audio"], ["text"]):
        msg = "output_modalities must be ['audio'] or ['text']."
        return "invalid_value", msg, "session.output_modalities"
    audio_in = (patch.get("audio") or {}).get("input") or {}
    fmt = audio_in.get("format") or {}
    if fmt and (fmt.get("type") != "audio/pcm" or fmt.get("rate", 24000) != 24000):
        msg = "The local engine only supports audio/pcm at 24000 Hz."
        return "invalid_value", msg, "session.audio.input.format"
    td = audio_in.get("turn_detection")
    if td is not None and td.get("type") not in ("server_vad", "semantic_vad"):
        return "invalid_value", "Invalid turn_detection type.", "session.audio.input.turn_detection.type"
    return None


def _merge(into: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict) and key not in REPLACED_WHOLE:
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def merge_session(session: dict[str, Any], patch: dict[str, Any]) -> None:
    """Apply a validated update in place; turn_detection is replaced whole with defaults filled in. A
    transcription session keeps only its own fields (no model, instructions or audio output)."""
    _merge(session, {k: v for k, v in patch.items() if k not in ("id", "object", "expires_at")})
    if session.get("type") == "transcription":
        for name in [name for name in session if name not in TRANSCRIPTION_SESSION_FIELDS]:
            del session[name]
        session["audio"] = {"input": session["audio"]["input"]}
    audio_in = session["audio"]["input"]
    td = audio_in.get("turn_detection")
    if td:
        base = {"create_response": True, "interrupt_response": True}
        if td.get("type") == "server_vad":
            base = {**DEFAULT_TURN_DETECTION}
        audio_in["turn_detection"] = {**base, **td}


def transcribes_during_speech(session: dict[str, Any]) -> bool:
    """True when the session's input transcription model streams deltas while the user speaks."""
    transcription = session["audio"]["input"].get("transcription") or {}
    return transcription.get("model") in STREAMING_TRANSCRIPTION_MODELS


def vad_params(td: dict[str, Any]) -> tuple[float, int, int]:
    """(threshold, prefix_padding_ms, silence_duration_ms) for a server or semantic VAD config."""
    if td.get("type") == "semantic_vad":
        return 0.5, 300, SEMANTIC_SILENCE_MS.get(td.get("eagerness") or "auto", 500)
    return (
        float(td.get("threshold", 0.5)),
        int(td.get("prefix_padding_ms", 300)),
        int(td.get("silence_duration_ms", 500)),
    )


def text_tokens(text: str) -> int:
    """Text tokens, about four characters each."""
    return (len(text) + 3) // 4


def audio_tokens(ms: int, per_second: int) -> int:
    """Audio tokens: ~10/s of user speech, ~20/s of assistant speech."""
    return (ms * per_second + 999) // 1000


def usage_object(
    text_in: int, audio_in: int, cached_text: int, cached_audio: int, text_out: int, audio_out: int
) -> dict[str, Any]:
    """The `response.done.response.usage` object."""
    return {
        "total_tokens": text_in + audio_in + text_out + audio_out,
        "input_tokens": text_in + audio_in,
        "output_tokens": text_out + audio_out,
        "input_token_details": {
            "text_tokens": text_in, "audio_tokens": audio_in, "cached_tokens": cached_text + cached_audio,
            "cached_tokens_details": {"text_tokens": cached_text, "audio_tokens": cached_audio},
        },
        "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
    }  # fmt: skip
