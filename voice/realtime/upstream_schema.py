"""What the gateway accepts from the upstream: the fields its handlers read, and the JSON type of each.

OpenAI sends these fields with these types. An event that breaks the rule (a proxy's mangling, a bug, a
shape change) is dropped and counted as `malformed_event` before any handler sees it, instead of raising
inside the session's reader loop and ending the session (or reaching the browser, whose client reads the
same fields). The object an event is about (`response`, `error`, `item`, `session`) must be there; other
fields may be absent or null (the handlers have defaults). Fields nobody reads are not checked, and an
event type nobody handles is relayed as it is (forward compatibility), so a new server event reaches the
client without a gateway release.
"""

from __future__ import annotations

from typing import Any

_ID = str
_TOKENS = int
_USAGE = {
    "response.usage": dict,
    "response.usage.input_tokens": _TOKENS,
    "response.usage.output_tokens": _TOKENS,
    "response.usage.input_token_details": dict,
    "response.usage.input_token_details.text_tokens": _TOKENS,
    "response.usage.input_token_details.audio_tokens": _TOKENS,
    "response.usage.input_token_details.cached_tokens_details": dict,
    "response.usage.input_token_details.cached_tokens_details.text_tokens": _TOKENS,
    "response.usage.input_token_details.cached_tokens_details.audio_tokens": _TOKENS,
    "response.usage.output_token_details": dict,
    "response.usage.output_token_details.text_tokens": _TOKENS,
    "response.usage.output_token_details.audio_tokens": _TOKENS,
}
_ITEM = {"item": dict, "item.id": _ID, "item_id": _ID}

# Event type -> {dotted path: type}. A parent is listed before its children.
SERVER_EVENT_FIELDS: dict[str, dict[str, type]] = {
    "session.created": {"session": dict},
    "session.updated": {"session": dict},
    "input_audio_buffer.speech_started": {"audio_start_ms": int, "item_id": _ID},
    "input_audio_buffer.speech_stopped": {"audio_end_ms": int, "item_id": _ID},
    "input_audio_buffer.committed": {"item_id": _ID},
    "conversation.item.input_audio_transcription.delta": {"item_id": _ID, "delta": str},
    "conversation.item.input_audio_transcription.completed": {"item_id": _ID, "transcript": str},
    "response.created": {"response": dict, "response.id": _ID},
    "response.output_audio.delta": {"response_id": _ID, "item_id": _ID, "delta": str},
    "response.output_audio_transcript.delta": {"response_id": _ID},
    "response.output_text.delta": {"response_id": _ID},
    "response.output_audio_transcript.done": {"item_id": _ID, "transcript": str},
    "response.done": {
        "response": dict, "response.id": _ID, "response.status": str, "response.status_details": dict,
        "response.status_details.error": dict, "response.status_details.error.code": str, **_USAGE,
    },
    "conversation.item.added": _ITEM,
    "conversation.item.done": _ITEM,
    "conversation.item.deleted": _ITEM,
    "error": {"error": dict, "error.code": str, "error.type": str, "error.event_id": _ID},
}
# The object each event is about: without it the event means nothing (and a client would trip on it).
REQUIRED_OBJECT = {"session.created": "session", "session.updated": "session", "response.created": "response",
                   "response.done": "response", "conversation.item.added": "item", "conversation.item.done": "item",
                   "error": "error"}
_PATHS = {kind: [(path, path.split("."), expected) for path, expected in fields.items()]
          for kind, fields in SERVER_EVENT_FIELDS.items()}


def malformed_field(event: Any) -> str | None:
    """Called for each parsed upstream event before dispatch: the first field of the wrong type, else None."""
    if type(event) is not dict or type(event.get("type")) is not str:
        return "type"
    required = REQUIRED_OBJECT.get(event["type"])
    if required is not None and type(event.get(required)) is not dict:
        return required
    for path, keys, expected in _PATHS.get(event["type"], ()):
        value: Any = event
        for key in keys:
            value = value.get(key) if type(value) is dict else None  # a wrong parent is its own entry
        if value is not None and not isinstance(value, expected):
            return path
    return None
