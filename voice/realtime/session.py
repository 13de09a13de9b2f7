"""GatewaySession: one browser conversation and its upstream realtime session.

The core abstraction of the gateway (in the spirit of LiveKit's RealtimeSession / Pipecat's service):
it relays client frames to the upstream and upstream events to the client, owns the turn logic (the
upstream's VAD ends a turn, the gateway injects retrieved context and then asks for the response), tracks
the active response and the audio actually sent so barge-in truncation is always valid, counts everything
for metrics, and recycles the upstream before OpenAI's 60-minute cap. It knows nothing about Django
Channels: the consumer adapts it to a WebSocket. Its upstream-event handlers live in
voice/realtime/upstream_events.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from django.conf import settings

from voice import metrics
from voice.realtime import protocol_tap
from voice.realtime.accounting import SessionStats, TurnStats
from voice.realtime.client_events import ClientEvent, dump_event
from voice.realtime.profile import RealtimeProfile
from voice.realtime.upstream import Upstream, UpstreamClosed, UpstreamConnectError
from voice.realtime.upstream_events import CONTEXT_ITEM_PREFIX, GATEWAY_EVENT_PREFIX, UpstreamEventHandlers

logger = logging.getLogger(__name__)



class SessionListener(Protocol):
    async def session_ready(self) -> None: ...
    async def session_failed(self, reason: str, error_code: str, message: str) -> None: ...
    async def turn_completed(self, turn: TurnStats) -> None: ...


def _gateway_event_id() -> str:
    return GATEWAY_EVENT_PREFIX + uuid.uuid4().hex[:16]


class GatewaySession(UpstreamEventHandlers):
    """A browser conversation relayed to one upstream realtime session at a time."""

    def __init__(
        self,
        *,
        session_id: str,
        send_client: Callable[[str], Awaitable[None]],
        listener: SessionListener,
        send_client_nowait: Callable[[bytes], bool] | None = None,
        upstream_factory: Callable[[], Upstream],
        prefetcher: Any = None,
        early: Any = None,
        history: list[dict[str, str]] | None = None,
        turn_offset: int = 0,
        profile: RealtimeProfile | None = None,
    ) -> None:
        self.session_id = session_id
        self.send_client = send_client
        self.send_client_nowait = send_client_nowait  # the server's synchronous write, when it has one
        self.listener = listener
        self.upstream_factory = upstream_factory
        self.prefetcher = prefetcher
        self.early = early  # EarlyTranscriber (early transcription mode "openai") or None
        self.history: list[dict[str, str]] = list(history or [])
        self.turn_offset = turn_offset
        self.profile = profile or RealtimeProfile.resolve()  # models and voice: the plan's
        self.model = self.profile.model
        self.stats = SessionStats()
        self.upstream: Upstream | None = None
        self.upstream_kind = ""
        self.upstream_started = 0.0
        self.configured = False
        self.closing = False
        self._retiring: Upstream | None = None  # an upstream being replaced: its close is not a failure
        self.last_upstream_event = time.monotonic()
        self._ready_announced = False
        self._queue: list[str] = []
        self._queued_bytes = 0
        self._reader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # Response and item state.
        self.response_requested = False  # response.create sent, response.created not yet seen
        self.active_response_id: str | None = None
        self.cancelled_responses: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.assistant_audio: OrderedDict[str, int] = OrderedDict()  # item id → audio bytes sent
        self.item_turn: dict[str, TurnStats] = {}
        self.user_item_id: str | None = None
        self.context_items: list[str] = []
        self.partial_transcripts: dict[str, str] = {}
        self.turn: TurnStats | None = None
        self.turn_audio_start: int | None = None
        self.answering: TurnStats | None = None

    # --- lifecycle ------------------------------------------------------------------------------
    @property
    def response_in_flight(self) -> bool:
        return self.response_requested or self.active_response_id is not None

    async def start(self) -> None:
        """Called once by the consumer after admission: connect the upstream (raises UpstreamConnectError)."""
        await self._open_upstream()
        if self.early is not None:
            self.spawn(self.early.start())

    async def _open_upstream(self) -> None:
        upstream = self.upstream_factory()
        await upstream.connect()
        if self.send_client_nowait is not None:
            upstream.set_text_handler(self._relay_upstream_nowait)
        self.upstream, self.upstream_kind = upstream, upstream.kind
        self.upstream_started = time.monotonic()
        self.configured = False
        self.last_upstream_event = time.monotonic()
        self._reader = asyncio.get_running_loop().create_task(self._read_loop(upstream))

    async def close(self) -> None:
        """Called when the connection ends, whatever the reason; idempotent."""
        self.closing = True
        for task in list(self._tasks):
            task.cancel()
        if self.prefetcher is not None:
            self.prefetcher.close()
        if self.early is not None:
            await self.early.close()
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
        self._reader = None  # the cancelled reader's traceback refers to this session: no cycle through it
        if self.upstream is not None:
            self.upstream.set_text_handler(None)  # a bound method of this session: a cycle through the upstream
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.upstream.close(), 2)

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Called to run work tied to the session (its tasks are cancelled when it closes)."""
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_upstream(self, event: dict[str, Any]) -> None:
        event.setdefault("event_id", _gateway_event_id())
        await self._forward(dump_event(event))

    async def _forward(self, text: str) -> None:
        if self.upstream is None:
            return
        if protocol_tap.gateway_sent is not None:
            protocol_tap.gateway_sent(text)
        try:
            await self.upstream.send(text)
        except UpstreamClosed:
            pass  # the reader loop sees the close and ends or recycles the session

    async def _send_client_event(self, event: dict[str, Any]) -> None:
        await self.send_client(dump_event(event))

    # --- client → upstream -------------------------------------------------------------------------
    def relay_audio_nowait(self, payload: bytes, audio_bytes: int) -> bool:
        """Called by the consumer's fast path with a canonical audio append (raw): True when forwarded now."""
        upstream = self.upstream
        if not self.configured or self.early is not None or upstream is None or not upstream.send_nowait(payload):
            return False
        if protocol_tap.gateway_sent is not None:
            protocol_tap.gateway_sent(payload)
        self.stats.bytes_in += audio_bytes
        return True

    async def on_client_event(self, event: ClientEvent) -> None:
        """Called for every validated client event (the hot path for audio appends)."""
        if event.text is not None and event.type == "input_audio_buffer.append":
            self.stats.bytes_in += event.audio_bytes
            if self.configured:
                await self._forward(event.text)
            else:
                self._enqueue(event.text)
            if self.early is not None:
                await self.early.on_audio(event.text, event.audio_bytes)
            return
        handler = _CLIENT_HANDLERS.get(event.type)
        if handler is not None:
            await handler(self, event)
        elif event.text is not None:
            await self._forward_or_queue(event.text)

    def _enqueue(self, text: str) -> None:
        self._queue.append(text)
        self._queued_bytes += len(text)
        while self._queued_bytes > settings.VOICE_AUDIO_QUEUE_MAX_BYTES and self._queue:
            self._queued_bytes -= len(self._queue.pop(0))  # oldest audio is least useful

    async def _forward_or_queue(self, text: str) -> None:
        if self.configured:
            await self._forward(text)
        else:
            self._enqueue(text)

    async def _client_item_create(self, event: ClientEvent) -> None:
        item = event.data["item"]
        item.setdefault("id", "item_" + uuid.uuid4().hex[:20])
        text = " ".join(p["text"] for p in item["content"] if p["type"] == "input_text")
        if text:
            self.turn = self._new_turn()
            self.turn.user_text = text
            self.user_item_id = item["id"]
            if self.prefetcher is not None:
                self.prefetcher.on_speech_started()
                self.prefetcher.on_final_transcript(text)
        await self._forward_or_queue(dump_event({"type": "conversation.item.create", **event.data}))

    async def _client_response_create(self, event: ClientEvent) -> None:
        if self.response_in_flight:
            await self._send_client_event(
                {"type": "gateway.error", "code": "response_in_progress",
                 "message": "A response is already in progress; it was not duplicated"}
            )
            return
        turn = self.turn
        if turn is not None and turn.speech_end_mono is None:
            turn.speech_end_mono = time.monotonic()  # a text turn ends when the client asks for the answer
        self.response_requested = True
        self._idle.clear()
        self.spawn(self._answer_turn(self.user_item_id, event.data))

    async def _client_response_cancel(self, event: ClientEvent) -> None:
        if self.active_response_id is not None:
            self.cancelled_responses.add(self.active_response_id)
            await self._send_upstream({"type": "response.cancel"})

    async def _client_truncate(self, event: ClientEvent) -> None:
        item_id = event.data["item_id"]
        sent_bytes = self.assistant_audio.get(item_id)
        if sent_bytes is None:
            await self._send_client_event(
                {"type": "gateway.error", "code": "invalid_event", "message": "unknown assistant audio item"}
            )
            return
        received_ms = sent_bytes // 48
        audio_end_ms = min(event.data["audio_end_ms"], received_ms)
        turn = self.item_turn.get(item_id)
        playing = self.active_response_id is not None and turn is self.answering
        if not playing and event.data["audio_end_ms"] >= received_ms:
            return  # playback had finished: nothing to cut
        if playing:
            self.cancelled_responses.add(self.active_response_id)  # type: ignore[arg-type]
            await self._send_upstream({"type": "response.cancel"})
        if turn is not None and not turn.interrupted:
            turn.interrupted = True
            self.stats.interruptions += 1
            self.stats.turn_changed(turn)  # usually answered already: its row is rewritten
        if audio_end_ms <= 0:
            # A 0 ms truncate is rejected upstream; nothing was heard, so the item goes.
            self.assistant_audio.pop(item_id, None)
            await self._send_upstream({"type": "conversation.item.delete", "item_id": item_id})
        else:
            await self._send_upstream(
                {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                 "audio_end_ms": audio_end_ms}
            )

    # --- turn logic ----------------------------------------------------------------------------------
    def _new_turn(self) -> TurnStats:
        turn = TurnStats(index=self.turn_offset + self.stats.turn_count)
        self.stats.turn_count += 1
        self.stats.turn_changed(turn)
        return turn

    async def _answer_turn(self, user_item_id: str | None, response: dict[str, Any] | None = None) -> None:
        """Called at the user's turn end: bounded wait for context, inject it, then ask for the answer."""
        turn = self.turn
        try:
            await self._inject_context(turn, user_item_id)
            if not self._idle.is_set() and not self.response_requested:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), 3.0)
            self.response_requested = True
            self._idle.clear()
            self.answering = turn
            create: dict[str, Any] = {"type": "response.create"}
            if response:
                create["response"] = response
            await self._send_upstream(create)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("answering a turn failed")
            self.response_requested = False
            self._idle.set()

    async def _inject_context(self, turn: TurnStats | None, user_item_id: str | None) -> None:
        stale, self.context_items = self.context_items, []
        for item_id in stale:  # stale context is re-billed on every later response: remove it
            await self._send_upstream({"type": "conversation.item.delete", "item_id": item_id})
        if self.prefetcher is None or turn is None:
            return
        result = await self.prefetcher.wait(settings.RAG_WAIT_TIMEOUT_MS)
        if not result.ran:
            return
        from voice.realtime.prefetch import format_context

        self.stats.rag_queries += 1
        injected = bool(result.ready and result.passages and user_item_id)
        turn.retrieval_used = True
        turn.retrieval_started_ms = (
            int(result.started_after_speech_ms) if result.started_after_speech_ms is not None else None
        )
        turn.retrieval_latency_ms = result.latency_ms
        turn.retrieval_waited_ms = result.waited_ms
        turn.rag_injected = injected
        if result.latency_ms is not None:
            metrics.RETRIEVAL_LATENCY.observe(result.latency_ms / 1000)
        if injected:
            self.stats.rag_hits += 1
            item_id = CONTEXT_ITEM_PREFIX + uuid.uuid4().hex[:20]
            self.context_items.append(item_id)
            await self._send_upstream(
                {"type": "conversation.item.create", "previous_item_id": user_item_id,
                 "item": {"id": item_id, "type": "message", "role": "system",
                          "content": [{"type": "input_text", "text": format_context(result.passages)}]}}
            )
        await self._send_client_event(
            {"type": "gateway.rag.context",
             "sources": [{"title": p.title, "score": round(p.score, 3)} for p in result.passages],
             "latency_ms": round(result.latency_ms, 1) if result.latency_ms is not None else None,
             "injected": injected}
        )

    # --- recycle and supervision ---------------------------------------------------------------------
    async def recycle(self) -> None:
        """Called before the upstream's session cap (or on session_expired): swap in a fresh upstream."""
        if self.closing:
            return
        old = self.upstream
        self._retiring = old
        try:
            await self._open_upstream()
        except UpstreamConnectError:
            await self.listener.session_failed(
                "upstream_unavailable", "upstream_unavailable", "The voice service connection was lost"
            )
            return
        self.response_requested, self.active_response_id = False, None
        self._idle.set()
        self.context_items = []
        if old is not None:
            old.set_text_handler(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(old.close(), 2)

    def tick(self, now: float) -> bool:
        """Called every second by the consumer's supervision: planned recycling (started here), and stall
        detection: True when the upstream stopped responding (the caller ends the session)."""
        stalled = now - self.last_upstream_event > settings.VOICE_UPSTREAM_STALL_SECONDS
        if stalled and (self.response_in_flight or not self.configured):
            return True
        if (
            self.configured
            and not self.response_in_flight
            and now - self.upstream_started > settings.VOICE_UPSTREAM_RECYCLE_SECONDS
        ):
            self.upstream_started = now
            self.spawn(self.recycle())
        return False


_CLIENT_HANDLERS: dict[str, Callable[[GatewaySession, ClientEvent], Awaitable[None]]] = {
    "conversation.item.create": GatewaySession._client_item_create,
    "response.create": GatewaySession._client_response_create,
    "response.cancel": GatewaySession._client_response_cancel,
    "conversation.item.truncate": GatewaySession._client_truncate,
}
