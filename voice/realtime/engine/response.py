"""One assistant response: answer, synthesize, stream deltas at `speed`× real time, finish or cancel."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import faults
from .answers import compose_reply
from .conversation import Entry, message_item
from .protocol import audio_tokens, event_id, text_tokens, usage_object
from .tts import synthesize

if TYPE_CHECKING:
    from .session import EngineSession

log = logging.getLogger(__name__)


@dataclass
class ResponseState:
    """Everything one response needs, from response.create to response.done."""

    id: str
    item_id: str
    modalities: list[str]
    instructions: str
    in_conversation: bool
    created_at: float  # loop time of response.create: first_audio_ms counts from here
    fail: str | None = None
    tokens_in: tuple[int, int, int, int] = (0, 0, 0, 0)  # text, audio, cached text, cached audio
    item: dict[str, Any] | None = None
    entry: Entry | None = None
    sent_text: str = ""  # transcript / text streamed so far
    sent_ms: int = 0  # audio streamed so far
    finished: bool = False
    delta_template: tuple[str, str] | None = None  # the audio delta's JSON around event id and audio (session.py)
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def audio(self) -> bool:
        """Whether this response speaks (else it streams text)."""
        return "audio" in self.modalities

    def base(self) -> dict[str, Any]:
        """The fields every delta/done event of this response carries."""
        return {"response_id": self.id, "item_id": self.item_id, "output_index": 0, "content_index": 0}


def response_object(r: ResponseState, status: str, details: dict | None, usage: dict | None) -> dict:
    """The `response` object of response.created / response.done."""
    return {
        "object": "realtime.response", "id": r.id, "status": status, "status_details": details,
        "output": [r.item] if r.item else [], "conversation_id": "conv_local" if r.in_conversation else None,
        "output_modalities": r.modalities, "max_output_tokens": "inf", "metadata": None, "usage": usage,
        "audio": {"output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin"}},
    }  # fmt: skip


def _split_words(text: str, parts: int) -> list[str]:
    """Spread the words of `text` over `parts` transcript deltas (some may be empty)."""
    words = text.split(" ")
    out = [""] * max(parts, 1)
    for i, word in enumerate(words):
        slot = i * len(out) // len(words)
        out[slot] += word if i == 0 else " " + word
    return out


async def run(s: EngineSession, r: ResponseState) -> None:
    """The response task: started by response.create (or an auto-created turn)."""
    try:
        await _run(s, r)
    except asyncio.CancelledError:
        finish(s, r, "cancelled", {"type": "cancelled", "reason": "client_cancelled"})
        raise
    except Exception:  # a bug or a broken answerer must fail the response, not wedge the session
        log.exception("local engine: response %s failed", r.id)
        if not r.finished:
            faults.fail_response(s, r, "server_error")


async def _run(s: EngineSession, r: ResponseState) -> None:
    cfg = s.config
    s.emit(
        {
            "type": "response.created",
            "event_id": event_id(),
            "response": response_object(r, "in_progress", None, None),
        }
    )
    if r.fail and r.fail not in faults.IN_STREAM:
        return faults.fail_response(s, r, r.fail)
    await s.recognition_settled()  # a spoken question's transcript follows its commit by a few ms
    question, context = s.conversation.current_turn()
    base_instructions = s.session.get("instructions") or ""
    if not context and base_instructions and r.instructions.startswith(base_instructions):
        # Context injected as per-response instructions (base prompt + knowledge, since they replace).
        context = r.instructions[len(base_instructions) :].strip() or None
    transcription = s.session["audio"]["input"].get("transcription") or {}
    reply = await compose_reply(question, context, answerer=cfg.answerer, use_rag=cfg.use_rag,
                                language=transcription.get("language"))  # fmt: skip
    text = reply.text
    clip = None
    if r.audio:  # the voice follows the answer's language, not the session's transcription hint
        clip = await synthesize(text, backend=cfg.tts, language=reply.language, chunk_ms=cfg.audio_chunk_ms)
    loop = asyncio.get_running_loop()
    wait = r.created_at + cfg.first_audio_ms / 1000 - loop.time()
    if wait > 0:
        await asyncio.sleep(wait)
    content_type = "output_audio" if r.audio else "output_text"
    r.item = message_item(r.item_id, "assistant", [], status="in_progress")
    s.emit({"type": "response.output_item.added", "event_id": event_id(), "response_id": r.id,
            "output_index": 0, "item": r.item})  # fmt: skip
    if r.in_conversation:
        r.entry = Entry(r.item, "", 0)
        prev = s.conversation.insert(r.entry)
        s.emit({"type": "conversation.item.added", "event_id": event_id(), "previous_item_id": prev,
                "item": r.item})  # fmt: skip
    part = {"type": "audio", "transcript": ""} if r.audio else {"type": "text", "text": ""}
    s.emit({"type": "response.content_part.added", "event_id": event_id(), **r.base(), "part": part})
    r.item["content"] = [{"type": content_type, "transcript" if r.audio else "text": ""}]
    if r.fail == "malformed":
        s.emit_raw('{"type": "response.output_audio.delta", "delta": ')  # truncated JSON on purpose
    pieces = _split_words(text, len(clip.chunks) if clip else max(1, len(text) // 24))
    speed, elapsed_ms, t0 = cfg.speed, 0, loop.time()
    for i, piece in enumerate(pieces):
        if i:  # pace on the audio clock; always yield so a cancel can land between chunks
            delay = t0 + elapsed_ms / 1000 / speed - loop.time() if speed > 0 and clip else 0
            await asyncio.sleep(max(delay, 0))
        if piece:
            r.sent_text += piece
            kind = "response.output_audio_transcript.delta" if r.audio else "response.output_text.delta"
            s.emit({"type": kind, "event_id": event_id(), **r.base(), "delta": piece})
        if clip:
            s.emit_audio_delta(r, clip.chunks[i])
            r.sent_ms += clip.chunk_ms[i]
            elapsed_ms += clip.chunk_ms[i]
            if r.entry:
                r.entry.audio_ms = r.sent_ms
        if i == 0 and r.fail in faults.MID_RESPONSE:
            if r.fail == "stall_mid_response":
                s.inject("stall")
            else:
                s.close(1006, "simulated crash mid-response")
            return
    finish(s, r, "completed", None)


def finish(s: EngineSession, r: ResponseState, status: str, details: dict | None) -> None:
    """Emit the closing events once (completed, cancelled or failed) and free the response slot."""
    if r.finished:
        return
    r.finished = True
    if r.item is not None:
        sent = r.sent_text
        if r.audio:
            s.emit({"type": "response.output_audio.done", "event_id": event_id(), **r.base()})
            s.emit({"type": "response.output_audio_transcript.done", "event_id": event_id(), **r.base(),
                    "transcript": sent})  # fmt: skip
            part, content = (
                {"type": "audio", "transcript": sent},
                {"type": "output_audio", "transcript": sent},
            )
        else:
            s.emit({"type": "response.output_text.done", "event_id": event_id(), **r.base(), "text": sent})
            part, content = {"type": "text", "text": sent}, {"type": "output_text", "text": sent}
        s.emit({"type": "response.content_part.done", "event_id": event_id(), **r.base(), "part": part})
        r.item["status"] = "completed" if status == "completed" else "incomplete"
        r.item["content"] = [content]
        if r.entry is not None:
            r.entry.text = sent
        s.emit({"type": "response.output_item.done", "event_id": event_id(), "response_id": r.id,
                "output_index": 0, "item": r.item})  # fmt: skip
        if r.in_conversation:
            s.emit({"type": "conversation.item.done", "event_id": event_id(), "item": r.item})
    text_in, audio_in, cached_text, cached_audio = r.tokens_in
    usage = usage_object(text_in, audio_in, cached_text, cached_audio, text_tokens(r.sent_text),
                         audio_tokens(r.sent_ms, 20))  # fmt: skip
    s.emit({"type": "response.done", "event_id": event_id(), "response": response_object(r, status, details,
                                                                                        usage)})  # fmt: skip
    s.response_finished(r)
    if r.task is not None and r.task is not asyncio.current_task():
        r.task.cancel()  # cancelled from outside: stop streaming now, the events are already out
