"""EngineSession: the OpenAI Realtime GA server protocol state machine, one per connection.

Client events go in through `receive(text)` (synchronous: parsing and dispatch never await); server
events come out through `deliver` (by default `out.put_nowait`: an asyncio.Queue of JSON text, then one
`EngineClosed` when the session ends; a socket transport may point it at its own send instead).
Responses and delayed transcriptions run as tasks on the caller's event loop; speech recognition
(when installed, see recognition.py) runs in a worker process and reports back through callbacks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from voice.realtime import protocol_tap

from . import faults
from . import response as responses
from .config import PLACEHOLDER_TRANSCRIPT, EngineConfig
from .conversation import Conversation, Entry, ItemError, entry_from_client, message_item
from .protocol import (
    default_session,
    error_event,
    event_id,
    merge_session,
    new_id,
    text_tokens,
    transcribes_during_speech,
    vad_params,
    validate_session,
)  # fmt: skip
from .recognition import SpeechInput, TurnSpeech
from .stt.service import OK
from .vad import BYTES_PER_MS, EnergyVad

MIN_COMMIT_BYTES = 100 * BYTES_PER_MS
# The canonical audio append (as the gateway forwards it, and most SDKs write it): matched whole, so that
# it skips json.loads. Only shapes json.loads would parse to the same dict match: no escapes or control
# characters in the event id, only base64 alphabet bytes in the audio; anything else takes the full parser.
_APPEND = re.compile(
    r'\{"type":"input_audio_buffer\.append",(?:"event_id":"([^"\\\x00-\x1f]*)",)?"audio":"([A-Za-z0-9+/=]*)"\}'
)
# The gateway's form (no event id) is checked without the regex: its head and tail by string compares, the
# audio by deleting the base64 alphabet from its bytes (a C table scan, ~2x faster than the regex's).
_APPEND_HEAD = '{"type":"input_audio_buffer.append","audio":"'
_APPEND_MIN = len(_APPEND_HEAD) + 2  # head and the closing '"}' must not overlap
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


@dataclass(frozen=True)
class EngineClosed:
    """End-of-stream marker in `EngineSession.out`: the close code/reason a real server would send."""

    code: int
    reason: str = ""


@dataclass
class Turn:
    """The user turn being spoken: its item id and (scripted or recognised) transcript, for early deltas."""

    item_id: str
    start_ms: int
    transcript: str
    known: bool
    words_sent: int = 0
    speech: TurnSpeech | None = None  # being recognised (transcript known once speech.final is done)
    item: dict | None = None  # the committed item, whose transcript the recognition completes


class EngineSession:
    """One realtime conversation; see the package docstring for behaviour and test hooks."""

    def __init__(self, config: EngineConfig | None = None, *, model: str | None = None) -> None:
        self.config = config or EngineConfig()
        self.session = default_session(model or self.config.model)
        self.conversation = Conversation()
        self.out: asyncio.Queue[str | EngineClosed] = asyncio.Queue()
        # Where events go, in order, ending with one EngineClosed; must not re-enter the session.
        self.deliver: Callable[[str | EngineClosed], None] = self.out.put_nowait
        self.active: responses.ResponseState | None = None
        self.closed = False
        self.closed_with: EngineClosed | None = None  # set when the server side ended the session
        self.stalled = False
        self._script = self.config.transcripts()
        self._script_pos = 0
        self._slice_words: list[str] = []  # transcription sessions: words left of the current utterance
        self.pending_fail = self.config.fail_with  # one-shot fault for the next response
        self._prev_input = (0, 0)  # last response's (text, audio) input tokens: the cacheable prefix
        self._clock_bytes = 0  # every byte ever appended: the buffer clock
        self._buffer_bytes = 0  # bytes since the last commit/clear
        self._turn: Turn | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._expiry: asyncio.TimerHandle | None = None
        self._vad: EnergyVad | None = None
        self._partials = False  # whether spoken turns get transcript deltas during speech (see _configure)
        self._configure()
        self._speech: SpeechInput | None = None
        if self.config.recognises:
            self._speech = SpeechInput(
                Path(self.config.stt_model_dir), max_streams=self.config.stt_max_streams,
                max_lag_ms=self.config.stt_max_lag_ms, final_timeout_ms=self.config.stt_final_timeout_ms,
            )  # fmt: skip
        self._recognising: dict[str, Turn] = {}  # item id -> turns being recognised (final pending)

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Called once by the transport after connecting: announces the session, arms the 60-min cap."""
        self.session["expires_at"] = int(time.time() + self.config.max_session_seconds)
        self.emit({"type": "session.created", "event_id": event_id(), "session": self.session})
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_later(self.config.max_session_seconds, self._expire)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Called to end the session from the server side: queues the close, stops all work."""
        if self.closed:
            return
        self.shutdown()
        self.closed_with = EngineClosed(code, reason)
        self.deliver(self.closed_with)

    def shutdown(self) -> None:
        """Called when the peer is gone (or by close): cancels timers and tasks, emits nothing more."""
        self.closed = True
        if self._expiry is not None:
            self._expiry.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self.active is not None and self.active.task is not None:
            self.active.task.cancel()
        for turn in list(self._recognising.values()):
            turn.speech.cancel()
        self._recognising.clear()

    def _expire(self) -> None:
        self.inject("error", "session_expired")

    # --- output ----------------------------------------------------------------------------------
    def emit(self, event: dict[str, Any]) -> None:
        """Queue one server event (dropped once closed or while a stall is simulated)."""
        if not self.closed and not self.stalled:
            if protocol_tap.engine_emitted is not None:
                protocol_tap.engine_emitted(event)
            self.deliver(json.dumps(event))

    def emit_audio_delta(self, r: responses.ResponseState, chunk: str) -> None:
        """Called by a response for each audio chunk: the same text as `emit` of the delta event's dict, built
        around the ~13 KB of base64 instead of json.dumps scanning it (base64 needs no JSON escaping)."""
        if protocol_tap.engine_emitted is not None:  # the tap wants the event's dict: take the plain path
            self.emit({"type": "response.output_audio.delta", "event_id": event_id(), **r.base(), "delta": chunk})
            return
        if not self.closed and not self.stalled:
            if r.delta_template is None:  # once per response: the JSON around the event id and the audio
                head = json.dumps({"type": "response.output_audio.delta", "event_id": ""})[:-2]
                mid = json.dumps({**r.base(), "delta": ""})[1:-2]
                r.delta_template = (head, '", ' + mid)
            head, mid = r.delta_template
            self.deliver(f"{head}{event_id()}{mid}{chunk}\"}}")

    def emit_raw(self, text: str) -> None:
        """Queue raw text as an event (the malformed-event hook)."""
        if not self.closed and not self.stalled:
            self.deliver(text)

    def error(self, code: str, message: str, client: dict | None = None, param: str | None = None) -> None:
        """Emit a recoverable `error` event echoing the client event id."""
        cid = client.get("event_id") if client else None
        self.emit(error_event(code, message, param=param, client_event_id=cid))

    # --- input -----------------------------------------------------------------------------------
    def receive(self, text: str | bytes) -> None:
        """Called for every client event (JSON text); dispatches synchronously."""
        if self.closed:
            return
        if type(text) is str:  # the hot path: appends, ~25 per second per session
            audio: str | bytes | None = None
            if len(text) >= _APPEND_MIN and text.startswith(_APPEND_HEAD) and text.endswith('"}'):
                audio = text[len(_APPEND_HEAD) : -2].encode()
                if audio.translate(None, _B64_ALPHABET):  # something else than base64: the regex, or JSON
                    audio = None
            client_event_id = None
            if audio is None and (append := _APPEND.fullmatch(text)) is not None:
                audio, client_event_id = append[2], append[1]
            if audio is not None:
                self._audio_in(audio, client_event_id)
                return
        try:
            event = json.loads(text)
            kind = event["type"]
        except (ValueError, TypeError, KeyError):
            self.error("invalid_json", "The event could not be parsed as a JSON object with a 'type'.")
            return
        handler = self._handlers.get(kind)
        if handler is None or (kind == "engine.test_hook" and not self.config.test_hooks):
            self.error("invalid_event", f"Invalid value: '{kind}'. Unknown client event type.", event, "type")
            return
        handler(self, event)

    def _session_update(self, ev: dict) -> None:
        patch = ev.get("session")
        problem = validate_session(patch)
        if problem:
            self.error(*problem[:2], ev, problem[2])
            return
        merge_session(self.session, patch)
        self._configure()
        self.emit({"type": "session.updated", "event_id": event_id(), "session": self.session})

    def _configure(self) -> None:
        """Called at start and on each session.update: the VAD, and the settings the per-append path reads
        (derived here once rather than on every append: only a session.update changes them)."""
        td = self.session["audio"]["input"].get("turn_detection")
        self._vad = EnergyVad(*vad_params(td)) if td else None
        self._partials = self._transcribing() and self.config.partials_enabled(transcribes_during_speech(self.session))

    def _append(self, ev: dict) -> None:
        self._audio_in(ev.get("audio"), ev.get("event_id"))

    def _audio_in(self, audio: Any, client_event_id: Any) -> None:
        """An `input_audio_buffer.append`'s audio (base64) and event id, from either parser."""
        try:  # the fast path's audio is base64-alphabet bytes already: straight to the decoder
            pcm = binascii.a2b_base64(audio) if type(audio) is bytes else base64.b64decode(audio or "")
        except (binascii.Error, ValueError, TypeError):
            self.error("invalid_value", "Invalid base64 audio.", {"event_id": client_event_id}, "audio")
            return
        self._pcm_in(pcm)

    def _pcm_in(self, pcm: bytes) -> None:
        """An append's decoded audio: buffer clock, recogniser, VAD turns and early transcript words."""
        self._clock_bytes += len(pcm)
        self._buffer_bytes += len(pcm)
        if self._speech is not None:
            self._speech.heard(pcm)
            if self._turn is not None and self._turn.speech is not None and self._turn.speech.stream:
                self._turn.speech.stream.feed(pcm)
        if self._vad is None:
            return
        for kind, ms in self._vad.feed(pcm):
            if kind == "start":
                self._speech_started(ms)
            elif self._turn is not None:
                turn = self._turn
                self.emit({"type": "input_audio_buffer.speech_stopped", "event_id": event_id(),
                           "audio_end_ms": ms, "item_id": turn.item_id})  # fmt: skip
                self._commit(turn, ms - turn.start_ms, auto=True)
        if self._partials and self._turn is not None and self._vad.in_speech:
            self._early_words()

    def _next_transcript(self) -> tuple[str, bool]:
        if not self._script:
            return PLACEHOLDER_TRANSCRIPT, False  # honest: the engine cannot recognise speech
        text = self._script[self._script_pos % len(self._script)]
        self._script_pos += 1
        return text, True

    def _speech_started(self, start_ms: int) -> None:
        self._turn = Turn(new_id("item"), start_ms, *self._next_transcript())
        if self._speech is not None:
            self._start_recognition(self._turn)
        self.emit({"type": "input_audio_buffer.speech_started", "event_id": event_id(),
                   "audio_start_ms": start_ms, "item_id": self._turn.item_id})  # fmt: skip
        td = self.session["audio"]["input"]["turn_detection"] or {}
        if self.active is not None and td.get("interrupt_response"):
            responses.finish(self, self.active, "cancelled", {"type": "cancelled", "reason": "turn_detected"})

    def _start_recognition(self, turn: Turn) -> None:
        """Stream the turn's audio (from its padded start) to the recogniser, when its language has one."""
        language = (self.session["audio"]["input"].get("transcription") or {}).get("language")
        ago = self._clock_bytes // BYTES_PER_MS - turn.start_ms
        turn.speech = self._speech.start(language, ago, lambda words: self._recognising_words(turn, words),
                                         lambda text, why: self._recognised(turn, text, why))  # fmt: skip
        if turn.speech is not None:
            turn.transcript = ""
            self._recognising[turn.item_id] = turn

    def _recognising_words(self, turn: Turn, words: list[str]) -> None:
        """Called with each new hypothesis of the recogniser: stable new words become transcript deltas."""
        speech = turn.speech
        if speech is None or self.closed or speech.final is None or speech.final.done():
            return
        new = speech.stable_words(words)
        if not (new and self._partials):
            return
        for word in new:
            self._transcript_delta(turn.item_id, word if not speech.sent else " " + word)
            speech.sent.append(word)
        turn.words_sent = len(speech.sent)

    def _recognised(self, turn: Turn, text: str, reason: str) -> None:
        """Called with the recogniser's final (or a placeholder): completes the turn's transcript."""
        speech = turn.speech
        if speech is None or self.closed or speech.final is None or speech.final.done():
            return
        self._recognising.pop(turn.item_id, None)
        turn.transcript = speech.settle(text, reason)
        turn.known = bool(text) and reason == OK
        entry = self.conversation.by_id.get(turn.item_id)
        if entry is not None:
            entry.text, entry.known_text = turn.transcript, turn.known
        if turn.item is not None:
            self._transcribe_committed(turn, turn.item)

    async def recognition_settled(self) -> None:
        """Called by a response before reading the question: waits for the finals of committed turns (each
        bounded by `stt_final_timeout_ms`), not for a turn still being spoken."""
        pending = [t.speech.final for t in self._recognising.values() if t.item is not None and t.speech.final]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    def _transcribing(self) -> bool:
        return bool(self.session["audio"]["input"].get("transcription"))

    def _early_words(self) -> None:
        """Partial transcript while the user is still speaking: one word per `partial_word_ms` of speech."""
        turn = self._turn
        if turn is None or not (turn.known and self._partials):
            return
        words = turn.transcript.split()
        due = min(len(words), self._vad.speech_ms // max(1, self.config.partial_word_ms)) if self._vad else 0
        while turn.words_sent < due:
            word = words[turn.words_sent]
            self._transcript_delta(turn.item_id, word if turn.words_sent == 0 else " " + word)
            turn.words_sent += 1

    def _transcript_delta(self, item_id: str, delta: str) -> None:
        self.emit({"type": "conversation.item.input_audio_transcription.delta", "event_id": event_id(),
                   "item_id": item_id, "content_index": 0, "delta": delta})  # fmt: skip

    def _manual_commit(self, ev: dict) -> None:
        if self._buffer_bytes < MIN_COMMIT_BYTES:
            ms = self._buffer_bytes / BYTES_PER_MS
            self.error(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too "
                f"small. Expected at least 100ms of audio, but buffer only has {ms:.2f}ms of audio.",
                ev,
            )
            return
        if self.session.get("type") == "transcription":
            self._transcribe_slice()
            return
        turn = self._turn or Turn(new_id("item"), 0, *self._next_transcript())
        self._commit(turn, self._buffer_bytes // BYTES_PER_MS, auto=False)

    def _transcribe_slice(self) -> None:
        """Transcription-only sessions: each commit transcribes its slice, one script word per
        `partial_word_ms` of audio (the engine cannot recognise speech; the script stands in for it)."""
        slice_ms = self._buffer_bytes // BYTES_PER_MS
        if not self._slice_words:
            text, known = self._next_transcript()
            self._slice_words = text.split() if known else [text]
        count = max(1, slice_ms // max(1, self.config.partial_word_ms))
        piece, self._slice_words = self._slice_words[:count], self._slice_words[count:]
        item_id, self._buffer_bytes = new_id("item"), 0
        self.emit({"type": "input_audio_buffer.committed", "event_id": event_id(), "previous_item_id": None,
                   "item_id": item_id})  # fmt: skip
        self.emit({"type": "conversation.item.input_audio_transcription.completed", "event_id": event_id(),
                   "item_id": item_id, "content_index": 0, "transcript": " ".join(piece),
                   "usage": {"type": "duration", "seconds": round(slice_ms / 1000, 2)}})  # fmt: skip

    def _commit(self, turn: Turn, audio_ms: int, *, auto: bool) -> None:
        prev = self.conversation.last_id()
        self.emit({"type": "input_audio_buffer.committed", "event_id": event_id(), "previous_item_id": prev,
                   "item_id": turn.item_id})  # fmt: skip
        item = message_item(turn.item_id, "user", [{"type": "input_audio", "transcript": None}])
        self.conversation.insert(Entry(item, turn.transcript, max(audio_ms, 0), turn.known))
        self.emit({"type": "conversation.item.added", "event_id": event_id(), "previous_item_id": prev,
                   "item": item})  # fmt: skip
        self.emit({"type": "conversation.item.done", "event_id": event_id(), "previous_item_id": prev,
                   "item": item})  # fmt: skip
        self._turn, self._buffer_bytes = None, 0
        if self._vad is not None:
            self._vad.reset(self._clock_bytes // BYTES_PER_MS)
        turn.item = item
        if turn.speech is not None and turn.item_id in self._recognising:
            self._speech.finish(turn.speech)  # the transcript follows with the recogniser's final
        else:
            self._transcribe_committed(turn, item)
        td = self.session["audio"]["input"].get("turn_detection") or {}
        if auto and td.get("create_response") and self.active is None:
            self._start_response({}, None)

    def _transcribe_committed(self, turn: Turn, item: dict) -> None:
        """The input transcription of a committed turn, once its transcript is known."""
        if not self._transcribing():
            return
        if self.config.transcript_delay_ms > 0:
            self._spawn(self._transcribe_later(turn, item))
        else:
            self._transcribe(turn, item)

    async def _transcribe_later(self, turn: Turn, item: dict) -> None:
        await asyncio.sleep(self.config.transcript_delay_ms / 1000)
        self._transcribe(turn, item)

    def _transcribe(self, turn: Turn, item: dict) -> None:
        words = turn.transcript.split()
        rest = words[turn.words_sent :]
        if rest:  # whatever the early deltas did not cover, in one last delta
            self._transcript_delta(turn.item_id, (" " if turn.words_sent else "") + " ".join(rest))
        item["content"][0]["transcript"] = turn.transcript
        audio = self.conversation.by_id.get(turn.item_id)
        tokens_in = (audio.audio_ms if audio else 0) // 100
        out = text_tokens(turn.transcript)
        self.emit({"type": "conversation.item.input_audio_transcription.completed", "event_id": event_id(),
                   "item_id": turn.item_id, "content_index": 0, "transcript": turn.transcript,
                   "usage": {"type": "tokens", "total_tokens": tokens_in + out, "input_tokens": tokens_in,
                             "input_token_details": {"text_tokens": 0, "audio_tokens": tokens_in},
                             "output_tokens": out}})  # fmt: skip

    def _clear(self, ev: dict) -> None:
        if self._turn is not None and self._turn.speech is not None:
            self._turn.speech.cancel()
            self._recognising.pop(self._turn.item_id, None)
        self._buffer_bytes, self._turn, self._slice_words = 0, None, []
        if self._vad is not None:
            self._vad.reset(self._clock_bytes // BYTES_PER_MS)
        self.emit({"type": "input_audio_buffer.cleared", "event_id": event_id()})

    # --- conversation items ------------------------------------------------------------------------
    def _item_create(self, ev: dict) -> None:
        item = ev.get("item")
        item_id = (item.get("id") if isinstance(item, dict) else None) or new_id("item")
        try:
            if item_id in self.conversation.by_id:
                raise ItemError("invalid_value", f"Item with id '{item_id}' already exists.", "item.id")
            entry = entry_from_client(item, item_id)
            at_end = ev.get("previous_item_id") is None
            prev = self.conversation.insert(entry, ev.get("previous_item_id"), at_end=at_end)
        except ItemError as exc:
            self.error(exc.code, exc.message, ev, exc.param)
            return
        for kind in ("conversation.item.added", "conversation.item.done"):
            self.emit({"type": kind, "event_id": event_id(), "previous_item_id": prev, "item": entry.item})

    def _item_delete(self, ev: dict) -> None:
        item_id = ev.get("item_id")
        if not self.conversation.delete(item_id):
            self.error(
                "item_delete_invalid_item_id",
                f"Error deleting item: the item with id '{item_id}' does not exist.",
                ev,
                "item_id",
            )
            return
        self.emit({"type": "conversation.item.deleted", "event_id": event_id(), "item_id": item_id})

    def _item_truncate(self, ev: dict) -> None:
        item_id, end_ms = ev.get("item_id"), ev.get("audio_end_ms")
        entry = self.conversation.by_id.get(item_id)
        if entry is None:
            self.error(
                "item_truncate_invalid_item_id",
                f"Error truncating item: the item with id '{item_id}' does not exist.",
                ev,
                "item_id",
            )
        elif entry.role != "assistant" or entry.item["content"][:1] == [] or \
                entry.item["content"][0].get("type") != "output_audio":  # fmt: skip
            self.error("unsupported_content_type", "Only assistant audio content can be truncated.", ev)
        elif not isinstance(end_ms, int) or end_ms < 0:
            self.error("invalid_value", "audio_end_ms must be a non-negative integer.", ev, "audio_end_ms")
        elif end_ms == 0:
            self.error(
                "unsupported_content_type",
                "Cannot truncate audio to 0 ms; delete the item instead.",
                ev,
                "audio_end_ms",
            )
        elif end_ms > entry.audio_ms:
            self.error("invalid_value", f"Audio content of {entry.audio_ms} ms is already shorter than "
                       f"{end_ms} ms", ev, "audio_end_ms")  # fmt: skip
        else:
            keep = len(entry.text) * end_ms // max(entry.audio_ms, 1)  # transcript cut in proportion
            entry.audio_ms, entry.text = end_ms, entry.text[:keep]
            entry.item["content"][0]["transcript"] = entry.text
            self.emit({"type": "conversation.item.truncated", "event_id": event_id(), "item_id": item_id,
                       "content_index": ev.get("content_index", 0), "audio_end_ms": end_ms})  # fmt: skip

    # --- responses -------------------------------------------------------------------------------
    def _response_create(self, ev: dict) -> None:
        if self.active is not None:
            self.error("conversation_already_has_active_response", "Conversation already has an active "
                       f"response in progress: {self.active.id}. Wait until the response is finished before "
                       "creating a new one.", ev)  # fmt: skip
            return
        self._start_response(ev.get("response") or {}, ev)

    def _start_response(self, opts: dict, ev: dict | None) -> None:
        loop = asyncio.get_running_loop()
        instructions = opts.get("instructions") or self.session.get("instructions") or ""
        modalities = opts.get("output_modalities") or self.session.get("output_modalities") or ["audio"]
        r = responses.ResponseState(
            id=new_id("resp"), item_id=new_id("item"), modalities=list(modalities),
            instructions=instructions, in_conversation=opts.get("conversation", "auto") != "none",
            created_at=loop.time(), fail=self.pending_fail,
        )  # fmt: skip
        self.pending_fail = None
        text_in, audio_in = self.conversation.input_tokens(instructions)
        prev_text, prev_audio = self._prev_input
        r.tokens_in = (text_in, audio_in, min(prev_text, text_in), min(prev_audio, audio_in))
        self._prev_input = (text_in, audio_in)
        self.active = r
        r.task = loop.create_task(responses.run(self, r))

    def response_finished(self, r: responses.ResponseState) -> None:
        """Called by the response when its response.done is out: frees the one-response slot."""
        if self.active is r:
            self.active = None

    def _response_cancel(self, ev: dict) -> None:
        if self.active is None:
            self.error("response_cancel_not_active", "Cancellation failed: no active response found.", ev)
            return
        responses.finish(self, self.active, "cancelled", {"type": "cancelled", "reason": "client_cancelled"})

    # --- fault injection ---------------------------------------------------------------------------
    def _test_hook(self, ev: dict) -> None:
        action = ev.get("action")
        if action not in faults.HOOK_ACTIONS:
            self.error("invalid_value", f"Unknown test hook action: {action!r}.", ev, "action")
            return
        self.inject(action, ev.get("code"), ev.get("close_code"))

    def inject(self, action: str, code: str | None = None, close_code: int | None = None) -> None:
        """Called by tests (directly or via `engine.test_hook`) to simulate a fault; see package docs."""
        faults.inject(self, action, code, close_code)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    _handlers: dict[str, Any] = {
        "session.update": _session_update,
        "input_audio_buffer.append": _append,
        "input_audio_buffer.commit": _manual_commit,
        "input_audio_buffer.clear": _clear,
        "conversation.item.create": _item_create,
        "conversation.item.delete": _item_delete,
        "conversation.item.truncate": _item_truncate,
        "response.create": _response_create,
        "response.cancel": _response_cancel,
        "engine.test_hook": _test_hook,
    }
