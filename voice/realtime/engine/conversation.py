"""The ordered item list of one engine session, with what usage and answering need to know."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from .protocol import audio_tokens, text_tokens
from .vad import BYTES_PER_MS

USER_AUDIO_TPS = 10  # tokens per second of user speech
ASSISTANT_AUDIO_TPS = 20  # tokens per second of assistant speech


class ItemError(ValueError):
    """A client item the conversation refuses: carries the error code and param."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


@dataclass
class Entry:
    """One conversation item: its GA item object plus what the engine tracks about it."""

    item: dict[str, Any]
    text: str = ""  # input_text / transcript (for audio turns: the scripted transcript, known at commit)
    audio_ms: int = 0  # user audio length, or assistant audio sent so far
    known_text: bool = True  # False for audio turns the engine could not "recognise"

    @property
    def role(self) -> str:
        """The item's role ("" for non-message items)."""
        return str(self.item.get("role") or "")


def message_item(item_id: str, role: str, content: list[dict[str, Any]], status: str = "completed") -> dict:
    """A GA `realtime.item` message object."""
    return {"id": item_id, "type": "message", "object": "realtime.item", "status": status, "role": role,
            "content": content}  # fmt: skip


def entry_from_client(item: Any, item_id: str) -> Entry:
    """Validate a `conversation.item.create` item; raises ItemError for what GA refuses."""
    if not isinstance(item, dict):
        raise ItemError("missing_required_parameter", "Missing required parameter: 'item'.", "item")
    kind = item.get("type", "message")
    if kind != "message":  # function_call(_output): stored as-is, no audio/text semantics
        return Entry({**item, "id": item_id, "object": "realtime.item", "status": "completed"}, "")
    role = item.get("role")
    if role not in ("user", "system", "assistant"):
        raise ItemError("invalid_value", f"Invalid value: '{role}'.", "item.role")
    allowed = {"user": ("input_text", "input_audio"), "system": ("input_text",),
               "assistant": ("output_text", "text")}[role]  # fmt: skip
    content, texts, audio_ms = [], [], 0
    for i, part in enumerate(item.get("content") or []):
        ptype = part.get("type") if isinstance(part, dict) else None
        if ptype not in allowed:
            msg = f"Content type '{ptype}' is not supported for {role} messages."
            if role == "assistant" and ptype in ("output_audio", "audio"):
                msg = "Assistant audio content cannot be created by the client."
            raise ItemError("invalid_value", msg, f"item.content[{i}].type")
        if ptype == "input_audio":
            try:
                audio_ms += len(base64.b64decode(part.get("audio") or "")) // BYTES_PER_MS
            except (binascii.Error, ValueError) as exc:
                raise ItemError("invalid_value", "Invalid base64 audio.", f"item.content[{i}].audio") from exc
            content.append({"type": "input_audio", "transcript": part.get("transcript")})
            texts.append(part.get("transcript") or "")
        else:  # only what the server keeps is echoed (a client's stray keys are not part of the item)
            content.append({"type": ptype, "text": str(part.get("text") or "")})
            texts.append(content[-1]["text"])
    if not content:
        raise ItemError("missing_required_parameter", "Missing required parameter: 'item.content'.",
                        "item.content")  # fmt: skip
    return Entry(message_item(item_id, role, content), " ".join(t for t in texts if t), audio_ms)


class Conversation:
    """Items in order; previous_item_id positioning as in the GA protocol."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.by_id: dict[str, Entry] = {}

    def last_id(self) -> str | None:
        """Id of the last item (the `previous_item_id` of an appended item)."""
        return self.entries[-1].item["id"] if self.entries else None

    def insert(self, entry: Entry, previous_item_id: str | None = None, *, at_end: bool = True) -> str | None:
        """Insert after `previous_item_id` ("root": first; at_end: append); returns the real previous id."""
        if at_end:
            prev, pos = self.last_id(), len(self.entries)
        elif previous_item_id == "root":
            prev, pos = None, 0
        elif previous_item_id in self.by_id:
            prev, pos = previous_item_id, self.entries.index(self.by_id[previous_item_id]) + 1
        else:
            raise ItemError("invalid_value", f"Previous item with id '{previous_item_id}' does not exist.",
                            "previous_item_id")  # fmt: skip
        self.entries.insert(pos, entry)
        self.by_id[entry.item["id"]] = entry
        return prev

    def delete(self, item_id: str) -> bool:
        """Remove an item; False when unknown."""
        entry = self.by_id.pop(item_id, None)
        if entry is None:
            return False
        self.entries.remove(entry)
        return True

    def current_turn(self) -> tuple[str | None, str | None]:
        """(question, context) for the next answer: the last user item and system items placed after it."""
        for index in range(len(self.entries) - 1, -1, -1):
            entry = self.entries[index]
            if entry.role == "user":
                context = "\n".join(
                    e.text for e in self.entries[index + 1 :] if e.role == "system" and e.text
                )
                return (entry.text if entry.known_text else None), (context or None)
        return None, None

    def input_tokens(self, instructions: str) -> tuple[int, int]:
        """(text, audio) input tokens if the whole conversation were sent now (it is, every response)."""
        text, audio = text_tokens(instructions), 0
        for entry in self.entries:
            if entry.audio_ms:
                tps = ASSISTANT_AUDIO_TPS if entry.role == "assistant" else USER_AUDIO_TPS
                audio += audio_tokens(entry.audio_ms, tps)
            elif entry.text:
                text += text_tokens(entry.text)
        return text, audio
