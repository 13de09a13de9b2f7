"""Upstream → client: how a GatewaySession handles each server event of the realtime protocol.

A mixin of GatewaySession (voice/realtime/session.py), split out to keep each module about one thing:
the session module owns the lifecycle, client events and turn logic; this one owns the reader loop and
the handlers named after the server events (`response.done` → `_on_response_done`). Handlers return
False to drop the event, a dict to send a rewritten event, or None to relay the original text verbatim.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from voice import metrics
from voice.realtime.client_events import dump_event
from voice.realtime.session_config import session_update_event, strip_private_session_fields
from voice.realtime.upstream import Upstream, UpstreamClosed
from voice.realtime.upstream_schema import malformed_field

logger = logging.getLogger(__name__)

FATAL_ERROR_CODES = frozenset(
    {"invalid_api_key", "insufficient_quota", "account_deactivated", "billing_hard_limit_reached",
     "beta_api_shape_disabled"}
)
GATEWAY_EVENT_PREFIX = "gw_"  # event ids of what the gateway sends itself: their errors stay internal
CONTEXT_ITEM_PREFIX = "ctx_"  # items the gateway injects (context, history): hidden from the client
_DELTA_TYPES = frozenset(
    {"response.output_audio.delta", "response.output_audio_transcript.delta", "response.output_text.delta"}
)
_HISTORY_CHARS = 6000
HISTORY_TURNS = 20  # turns a session remembers for a new upstream (recycle, resume)
# Per-item bookkeeping (audio sent per assistant item, partial transcripts) keeps only the most recent items:
# a session lasts up to an hour, and only recent items can still be truncated or completed.
RECENT_ITEMS = 16
# The turn an assistant item answers (to flag it interrupted when the client truncates it) is kept for the
# newest items only: a barge-in cuts what is playing now. Kept for all 16, each session held 16 turns.
TURN_ITEMS = 2
_AUDIO_DELTA_HEAD = re.compile(rb'\{"type": ?"response\.output_audio\.delta"')
# OpenAI's own field order, read in one match; other orders and spacings fall back to _DELTA_IDS.
_OPENAI_DELTA_HEAD = re.compile(
    rb'\{"type":"response\.output_audio\.delta","event_id":"[^"\\]*","response_id":"([^"\\]*)",'
    rb'"item_id":"([^"\\]*)",'
)
_DELTA_IDS = re.compile(rb'"(response_id|item_id)": ?"([^"\\]*)"')


def audio_delta_fields(payload: bytes) -> tuple[str, str, int] | None:
    """(response_id, item_id, pcm bytes) of a `response.output_audio.delta` (raw UTF-8) whose delta is its
    last field and which is all ASCII, read without decoding or parsing the JSON (12.8 KB for 200 ms of
    audio); None for anything else."""
    if not payload.endswith(b'"}') or not payload.isascii():
        return None
    openai = _OPENAI_DELTA_HEAD.match(payload)
    if openai is None and _AUDIO_DELTA_HEAD.match(payload) is None:
        return None
    at = payload.rfind(b'"delta":')
    if at < 0:
        return None
    quote = at + 8 + (payload[at + 8] == 0x20)
    if payload[quote] != 0x22 or payload.find(b'"', quote + 1, len(payload) - 2) >= 0:
        return None
    if openai is not None:
        response_id, item_id = openai.group(1).decode(), openai.group(2).decode()
    else:
        ids = {key.decode(): value.decode() for key, value in _DELTA_IDS.findall(payload, 0, at)}
        response_id, item_id = ids.get("response_id", ""), ids.get("item_id", "")
    b64_chars = len(payload) - 2 - (quote + 1)
    pad = 2 if payload.endswith(b'=="}') else 1 if payload.endswith(b'="}') else 0
    return response_id, item_id, b64_chars * 3 // 4 - pad


def history_append(history: list[dict[str, str]], entry: dict[str, str]) -> None:
    """Called after each answered turn: keep the newest HISTORY_TURNS turns, and of those only what the
    replay can use (its last _HISTORY_CHARS characters): older text is dead weight in memory and in Redis."""
    history.append(entry)
    del history[:-HISTORY_TURNS]
    chars = sum(len(e.get("user", "")) + len(e.get("assistant", "")) for e in history)
    while len(history) > 1 and chars > _HISTORY_CHARS:
        oldest = history.pop(0)
        chars -= len(oldest.get("user", "")) + len(oldest.get("assistant", ""))


class UpstreamEventHandlers:
    """Server-event handlers of GatewaySession (they use its state and its send/turn methods)."""

    async def _read_loop(self, upstream: Upstream) -> None:
        try:
            while True:
                text = await upstream.recv()
                self.last_upstream_event = time.monotonic()
                await self._on_upstream_text(text)
        except UpstreamClosed as exc:
            if upstream is self.upstream and not self.closing and upstream is not self._retiring:
                logger.warning("upstream closed (code %s)", exc.code)
                await self.listener.session_failed(
                    "upstream_unavailable", "upstream_unavailable", "The voice service connection was lost"
                )
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("upstream reader crashed")
            if not self.closing:
                await self.listener.session_failed("internal_error", "internal_error", "Internal error")

    def _relay_upstream_nowait(self, payload: bytes) -> bool:
        """Called by the upstream for each server event (raw UTF-8) while the reader is parked: relays an
        audio delta to the client synchronously (True); anything else goes through `_on_upstream_text`."""
        fields = audio_delta_fields(payload)
        if fields is None or fields[0] in self.cancelled_responses or not self.send_client_nowait(payload):
            return False
        self.last_upstream_event = time.monotonic()
        self._account_audio_delta(fields[1], fields[2])
        self.stats.frames_out += 1
        self.stats.bytes_out += len(payload)
        return True

    async def _on_upstream_text(self, text: str) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            event = None
        wrong = malformed_field(event)
        if wrong is not None:
            logger.warning("malformed upstream event dropped (%s)", wrong)
            metrics.UPSTREAM_ERRORS.labels(code="malformed_event").inc()
            return
        kind = event["type"]
        if kind in _DELTA_TYPES and event.get("response_id") in self.cancelled_responses:
            return  # late deltas of a cancelled response must not be played
        handler = _UPSTREAM_HANDLERS.get(kind)
        if handler is not None:
            forward = await handler(self, event)
            if forward is False:
                return
            if isinstance(forward, dict):
                text = dump_event(forward)
        if kind == "response.output_audio.delta":
            self.stats.frames_out += 1
            self.stats.bytes_out += len(text)
        await self.send_client(text)

    async def _on_session_created(self, event: dict[str, Any]) -> dict[str, Any]:
        await self._send_upstream(session_update_event(self.profile))
        return strip_private_session_fields(event)

    async def _on_session_updated(self, event: dict[str, Any]) -> dict[str, Any] | bool:
        first = not self.configured
        if first:
            if self.history:
                await self._replay_history()
            # Until `configured`, client frames (fast path included) join the queue: none overtakes it.
            while self._queue:
                queued, self._queue, self._queued_bytes = self._queue, [], 0
                for text in queued:
                    await self._forward(text)
            self.configured = True
            if not self._ready_announced:
                self._ready_announced = True
                await self.listener.session_ready()
            else:
                return False  # a recycled upstream: the client already has its session
        return strip_private_session_fields(event)

    async def _replay_history(self) -> None:
        lines = []
        for entry in self.history:
            if entry.get("user"):
                lines.append(f"User: {entry['user']}")
            if entry.get("assistant"):
                lines.append(f"Assistant: {entry['assistant']}")
        transcript = "\n".join(lines)[-_HISTORY_CHARS:]
        if not transcript:
            return
        await self._send_upstream(
            {"type": "conversation.item.create",
             "item": {"id": CONTEXT_ITEM_PREFIX + "history_" + uuid.uuid4().hex[:12], "type": "message",
                      "role": "system",
                      "content": [{"type": "input_text",
                                   "text": "Conversation so far (continue it naturally):\n" + transcript}]}}
        )

    async def _on_speech_started(self, event: dict[str, Any]) -> None:
        if self.active_response_id is not None:
            # interrupt_response: the upstream cancels the answer; its late deltas must not play.
            self.cancelled_responses.add(self.active_response_id)
            if self.answering is not None and not self.answering.interrupted:
                self.answering.interrupted = True
                self.stats.interruptions += 1
                self.stats.turn_changed(self.answering)
        self.turn = self._new_turn()
        self.turn.speech_start_mono = time.monotonic()
        self.turn_audio_start = event.get("audio_start_ms")
        if self.prefetcher is not None:
            self.prefetcher.on_speech_started()
        if self.early is not None:
            self.early.speech_started()

    async def _on_speech_stopped(self, event: dict[str, Any]) -> None:
        if self.early is not None:
            await self.early.speech_stopped()
        turn = self.turn
        if turn is not None:
            turn.speech_end_mono = time.monotonic()
            start, end = self.turn_audio_start, event.get("audio_end_ms")
            if isinstance(start, int) and isinstance(end, int):
                turn.speech_ms = max(0, end - start)

    async def _on_committed(self, event: dict[str, Any]) -> None:
        self.user_item_id = event.get("item_id")
        self.spawn(self._answer_turn(self.user_item_id))

    async def _on_transcript_delta(self, event: dict[str, Any]) -> None:
        item_id = event.get("item_id") or ""
        text = self.partial_transcripts.get(item_id, "") + str(event.get("delta") or "")
        self.partial_transcripts[item_id] = text
        if len(self.partial_transcripts) > RECENT_ITEMS:  # an item whose completion never came
            del self.partial_transcripts[next(iter(self.partial_transcripts))]
        if self.prefetcher is not None:
            self.prefetcher.on_partial_transcript(text)

    async def _on_transcript_completed(self, event: dict[str, Any]) -> None:
        self.stats.add_transcription(event.get("usage"), self.profile.transcription_model)
        text = str(event.get("transcript") or "")
        self.partial_transcripts.pop(event.get("item_id") or "", None)
        if self.turn is not None and not self.turn.user_text:
            self.turn.user_text = text
        if self.prefetcher is not None:
            self.prefetcher.on_final_transcript(text)

    async def _on_response_created(self, event: dict[str, Any]) -> None:
        response = event.get("response") or {}
        self.response_requested = False
        self.active_response_id = response.get("id")
        self._idle.clear()

    async def _on_audio_delta(self, event: dict[str, Any]) -> None:
        delta = str(event.get("delta") or "")
        size = len(delta) * 3 // 4 - (2 if delta.endswith("==") else 1 if delta.endswith("=") else 0)
        self._account_audio_delta(str(event.get("item_id") or ""), size)

    def _account_audio_delta(self, item_id: str, size: int) -> None:
        """Audio bytes sent per assistant item (bounds barge-in truncation) and the turn's first audio."""
        if item_id not in self.assistant_audio:
            self.assistant_audio[item_id] = 0
            if len(self.assistant_audio) > RECENT_ITEMS:
                self.assistant_audio.popitem(last=False)
            if self.answering is not None:
                self.item_turn[item_id] = self.answering
                if len(self.item_turn) > TURN_ITEMS:
                    del self.item_turn[next(iter(self.item_turn))]
        self.assistant_audio[item_id] += size
        turn = self.answering
        if turn is not None and turn.first_audio_ms is None and turn.speech_end_mono is not None:
            turn.first_audio_ms = (time.monotonic() - turn.speech_end_mono) * 1000
            metrics.FIRST_AUDIO.observe(turn.first_audio_ms / 1000)

    async def _on_assistant_transcript_done(self, event: dict[str, Any]) -> None:
        if self.answering is not None:
            self.answering.assistant_text = str(event.get("transcript") or "")

    async def _on_response_done(self, event: dict[str, Any]) -> bool | None:
        response = event.get("response") or {}
        response_id = response.get("id")
        status = response.get("status") or ""
        self.active_response_id = None
        self.response_requested = False
        self._idle.set()
        input_tokens, output_tokens, cost = self.stats.add_usage(response.get("usage"), self.model)
        turn = self.answering
        if turn is not None:
            turn.input_tokens += input_tokens
            turn.output_tokens += output_tokens
            turn.cost_usd += cost
            turn.response_status = status
            if status == "cancelled":
                turn.interrupted = True
            self.stats.turn_changed(turn)
            if turn.user_text or turn.assistant_text:
                history_append(self.history, {"user": turn.user_text, "assistant": turn.assistant_text})
            # The texts live on in the (capped) history only: a 10-minute session keeps all its turns.
            turn.user_text = turn.assistant_text = ""
            await self.listener.turn_completed(turn)
        if status == "failed":
            details = response.get("status_details") or {}
            code = str(((details.get("error") or {}).get("code")) or "response_failed")[:48]
            metrics.UPSTREAM_ERRORS.labels(code=code).inc()
            if code in FATAL_ERROR_CODES:
                logger.error("upstream fatal error in a failed response: %s", code)
                await self.send_client(dump_event(event))
                await self.listener.session_failed(
                    "upstream_error", "upstream_error", "The voice service rejected the session"
                )
                return False
        self.cancelled_responses.discard(response_id)  # no delta follows its response.done

    async def _on_item_event(self, event: dict[str, Any]) -> bool:
        item = event.get("item") or {}
        item_id = item.get("id") or event.get("item_id") or ""
        return not str(item_id).startswith(CONTEXT_ITEM_PREFIX)

    async def _on_error(self, event: dict[str, Any]) -> bool:
        error = event.get("error") or {}
        code = str(error.get("code") or error.get("type") or "unknown")[:48]
        metrics.UPSTREAM_ERRORS.labels(code=code).inc()
        if code in FATAL_ERROR_CODES:
            logger.error("upstream fatal error: %s", code)
            await self.send_client(dump_event(event))
            await self.listener.session_failed("upstream_error", "upstream_error",
                                               "The voice service rejected the session")
            return False
        if code == "session_expired":
            # OpenAI's 60-minute cap: the close that follows is expected; a fresh upstream takes over.
            self._retiring = self.upstream
            self.spawn(self.recycle())
            return False
        ours = str(error.get("event_id") or "").startswith(GATEWAY_EVENT_PREFIX)
        if code == "conversation_already_has_active_response":
            self.response_requested = False
        logger.info("upstream error %s%s", code, " (gateway event)" if ours else "")
        return not ours  # errors caused by the gateway's own events are handled here, not shown


_UPSTREAM_HANDLERS: dict[str, Callable[[Any, dict[str, Any]], Awaitable[Any]]] = {
    "session.created": UpstreamEventHandlers._on_session_created,
    "session.updated": UpstreamEventHandlers._on_session_updated,
    "input_audio_buffer.speech_started": UpstreamEventHandlers._on_speech_started,
    "input_audio_buffer.speech_stopped": UpstreamEventHandlers._on_speech_stopped,
    "input_audio_buffer.committed": UpstreamEventHandlers._on_committed,
    "conversation.item.input_audio_transcription.delta": UpstreamEventHandlers._on_transcript_delta,
    "conversation.item.input_audio_transcription.completed": UpstreamEventHandlers._on_transcript_completed,
    "response.created": UpstreamEventHandlers._on_response_created,
    "response.output_audio.delta": UpstreamEventHandlers._on_audio_delta,
    "response.output_audio_transcript.done": UpstreamEventHandlers._on_assistant_transcript_done,
    "response.done": UpstreamEventHandlers._on_response_done,
    "conversation.item.added": UpstreamEventHandlers._on_item_event,
    "conversation.item.done": UpstreamEventHandlers._on_item_event,
    "conversation.item.deleted": UpstreamEventHandlers._on_item_event,
    "error": UpstreamEventHandlers._on_error,
}
