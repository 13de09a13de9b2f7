"""The voice WebSocket (`/v1/ws/voice`): a thin adapter between the browser and a GatewaySession.

Decisions live elsewhere: who may connect (voice.services.access), what a client may send
(voice.realtime.client_events), the turn logic (voice.realtime.session). This module authenticates,
admits, wires the session to the socket, runs the per-second supervision, and guarantees the metrics
row is written however the connection ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from typing import Any
from urllib.parse import parse_qs

from asgiref.sync import sync_to_async
from channels.consumer import AsyncConsumer
from channels.exceptions import StopConsumer
from channels.layers import get_channel_layer
from django.conf import settings

from voice import metrics
from voice.consumer_supervision import SessionSupervision
from voice.observability.logs import bind_session, clear_session
from voice.realtime import registry
from voice.realtime.accounting import TurnStats
from voice.realtime.admission import AdmissionClock, admission_gate
from voice.realtime.client_events import (
    ClientEventError,
    dump_event,
    fast_append_audio_bytes,
    parse_client_frame,
)
from voice.realtime.models_catalog import early_transcription_mode
from voice.realtime.openai_upstream import make_upstream, upstream_kind
from voice.realtime.session import GatewaySession
from voice.realtime.upstream import UpstreamConnectError
from voice.server_ws import FASTPATH_EXTENSION
from voice.services import sessions as session_services
from voice.services.access import (
    UNAUTHORIZED,
    Admission,
    Refusal,
    access_decide,
    session_window,
    slot_release_begin,
)
from voice.services.auth import AuthError, Identity, identity_from_jwt, ticket_redeem
from voice.services.db import run_db_write, submit_write

logger = logging.getLogger(__name__)

SUBPROTOCOL = "intelia.v1"
CLOSE_CODES = {
    "client_closed": 1000, "timeout": 4408, "upstream_unavailable": 4502, "upstream_error": 4502,
    "internal_error": 4500, "feature_disabled": 4503, "terminated": 4010, "draining": 4012,
}


class VoiceConsumer(SessionSupervision, AsyncConsumer):
    """One browser voice connection."""

    session: GatewaySession | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Called by the ASGI server per connection: a plain receive loop (no task per frame)."""
        self.scope = scope
        self.base_send = send
        self.channel_layer = get_channel_layer()
        self._control_joined: int | None = None  # the control channel's generation this session joined
        # The voice server's synchronous frame path (voice/server_ws.py); absent under daphne/runserver.
        self._fastpath: dict[str, Any] | None = scope.get("extensions", {}).get(FASTPATH_EXTENSION)
        self._ended = False
        self._finished = False
        self._superseded = False
        self._connection = ""  # this connection's id in its session's resume state (set when admitted)
        self._persisted = asyncio.Event()  # set once the session state (history) is saved at the end
        self._slots_released: asyncio.Task[None] | None = None
        self._gate: asyncio.Semaphore | None = None  # held until admitted (voice.realtime.admission)
        self._meta_saving = self._meta_dirty = False
        # Read once: Django's settings object costs a Python-level lookup per access, on every frame.
        self._max_frame_bytes: int = settings.VOICE_MAX_FRAME_BYTES
        self._frame_rate: float = settings.VOICE_MAX_FRAMES_PER_SECOND
        self._tokens, self._tokens_at = 4.0 * self._frame_rate, time.monotonic()
        try:
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass
        finally:
            self._admission_done()  # a connection that ends before it is ready (or fails) lets the next in
            self._supervision_stop()
            await self._finish("client_closed", None)
            self._fastpath = None

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Called per ASGI/channel-layer message. Unlike Channels' own dispatch, it does not hop to the
        DB thread before each message (aclose_old_connections): every audio frame would queue behind one
        thread. The rare ORM work closes its own connections."""
        handler = getattr(self, message["type"].replace(".", "_"), None)
        if handler is not None:
            await handler(message)

    # --- connect -------------------------------------------------------------------------------------
    async def websocket_connect(self, message: dict[str, Any]) -> None:
        """Called on the handshake: accept, authenticate, admit (through the admission gate, released as the
        upstream connection starts, or when the connection is refused or ends), open the upstream."""
        clock = self._admission_clock = AdmissionClock((self._fastpath or {}).get("connected_at"))
        gate = admission_gate()
        await gate.acquire()
        self._gate = gate
        clock.mark("gate")
        offered = self.scope.get("subprotocols") or []
        await self.base_send(
            {"type": "websocket.accept", "subprotocol": SUBPROTOCOL if SUBPROTOCOL in offered else None}
        )
        self.connected_at = time.monotonic()
        if registry.is_draining():
            await self._refuse(Refusal("draining", 4012, "This server is restarting; reconnect"))
            return
        query = parse_qs(self.scope.get("query_string", b"").decode("latin1"))
        try:
            self.identity = await self._authenticate(query, offered)
        except AuthError:
            await self._refuse(UNAUTHORIZED)
            return
        meta, resumed = await self._resume_or_new(query.get("resume", [""])[0])
        if meta is None:
            await self._refuse(Refusal("resume_forbidden", 4403, "This session belongs to another user"))
            return
        clock.mark("authenticate")
        decision = await access_decide(identity=self.identity, session_id=meta.session_id, resuming=resumed)
        if isinstance(decision, Refusal):
            await self._refuse(decision)
            return
        clock.mark("access")
        await self._start(meta, resumed, decision)

    async def _authenticate(self, query: dict[str, list[str]], offered: list[str]) -> Identity:
        for protocol in offered:
            if protocol.startswith("bearer."):
                return identity_from_jwt(protocol[len("bearer."):])
        if query.get("ticket"):
            return await ticket_redeem(query["ticket"][0])
        return identity_from_jwt(query.get("token", [""])[0])

    async def _resume_or_new(self, token: str) -> tuple[session_services.SessionMeta | None, bool]:
        """(meta, resumed); meta None means the token belongs to someone else."""
        if token:
            owner = session_services.resume_token_read(token)
            if owner is not None:
                session_id, user_id = owner
                if user_id != self.identity.user_id:
                    return None, False
                previous = registry.live_session(session_id)
                if previous is not None:  # its link died unnoticed (the client moved on): take over from it
                    await previous.supersede()
                    meta = await session_services.session_meta_load(session_id)
                else:  # the same, when that connection is on another instance
                    meta = await session_services.session_meta_take_over(session_id)
                if meta is not None and meta.user_id == self.identity.user_id and meta.remaining_s > 1:
                    return meta, True
        meta = session_services.SessionMeta(
            session_id=session_services.new_session_id(), user_id=self.identity.user_id, plan="", cohort="",
            started_at=time.time(), max_duration_s=0,
        )
        return meta, False

    async def _start(self, meta: session_services.SessionMeta, resumed: bool, admission: Admission) -> None:
        self.meta, self.resumed, self.admission = meta, resumed, admission
        if not resumed:
            meta.plan, meta.cohort = admission.plan.code, admission.cohort
            meta.max_duration_s = admission.plan.max_session_seconds
        self.session_id = meta.session_id
        # Saved at ready: a resume elsewhere knows to ask this connection to let go, and this connection's
        # later saves are dropped once another one owns the session.
        self._connection = meta.live_connection = uuid.uuid4().hex
        # Every log line of this connection (and of the tasks it starts) carries these.
        bind_session(meta.session_id, self.identity.user_id, meta.plan)
        self.deadline = time.monotonic() + meta.remaining_s
        self.warned = False
        self.instance = registry.instance_id()
        profile = admission.plan.realtime  # the plan's models and voice (validated when the plan was saved)
        prefetcher = _make_prefetcher()
        early = None
        if prefetcher is not None and early_transcription_mode(profile.transcription_model) == "openai":
            from voice.realtime.early_transcription import EarlyTranscriber

            early = EarlyTranscriber(prefetcher.on_partial_transcript, profile.transcription_model)
        self.session = GatewaySession(
            session_id=meta.session_id, send_client=self._send_text, listener=self,
            # The server's own write: nothing between the upstream's callback and the client's socket.
            send_client_nowait=self._fastpath["send_text_nowait"] if self._fastpath else None,
            upstream_factory=functools.partial(make_upstream, profile.model), prefetcher=prefetcher,
            early=early, history=meta.history, turn_offset=meta.turns, profile=profile,
        )
        if early is not None:  # the second session's transcriptions are billed too
            early.on_usage = functools.partial(self.session.stats.add_transcription, model=profile.transcription_model)
        registry.register(self)
        metrics.ACTIVE_SESSIONS.inc()
        self._counted_active = True
        # The upstream's set-up is network round trips to OpenAI (TLS, the upgrade, session.created, then
        # session.updated): a gate held through them admits a storm at (gate width / round trips) per second.
        self._admission_done()
        try:
            await self.session.start()
        except UpstreamConnectError as exc:
            logger.warning("upstream connect failed: %s", exc)
            await self._end("upstream_unavailable", "upstream_unavailable",
                            "The voice service is unavailable, please retry shortly", error=str(exc))
            return
        except Exception as exc:
            logger.exception("session start failed")
            await self._end("internal_error", "internal_error", "Internal error", error=type(exc).__name__)
            return
        self._supervision_start()
        if self._fastpath is not None:
            self._fastpath["set_text_handler"](self._relay_frame_nowait)

    async def session_ready(self) -> None:
        """Called by the GatewaySession once the upstream is configured."""
        meta = self.meta
        self._admission_clock.mark("upstream")
        # The row goes on the writer's queue without being awaited: in a reconnect storm every ready would
        # wait behind the rows of all the admissions before it. The writer is first in, first out, so this
        # row is written before any of the session's turn rows or its end record.
        submit_write(functools.partial(
            session_services.voice_session_start, meta=meta, user_pk=self.admission.user.pk,
            upstream=self.session.upstream_kind, instance=self.instance, model=self.session.model,
            resumed=self.resumed,
        ))
        # The resume state is stored before ready; a new session counts in its user's hourly window.
        window = None if self.resumed else session_window(identity=self.identity, plan=self.admission.plan)
        await session_services.session_meta_save(meta, window=window)
        remaining = max(0, int(self.deadline - time.monotonic()))
        await self._send_event({
            "type": "gateway.session.ready",
            "session_id": meta.session_id,
            "max_duration_s": int(meta.max_duration_s),
            "remaining_s": remaining,
            "expires_at": int(time.time() + remaining),
            "upstream": self.session.upstream_kind,
            "resume_token": session_services.resume_token_issue(
                session_id=meta.session_id, user_id=meta.user_id),
            "resumed": self.resumed,
        })
        self._admission_clock.mark("ready")
        self._admission_clock.observe()
        self._admission_done()

    async def session_failed(self, reason: str, error_code: str, message: str) -> None:
        """Called by the GatewaySession when the upstream is lost or refuses the session."""
        await self._end(reason, error_code, message, error=error_code)

    async def turn_completed(self, turn: TurnStats) -> None:
        """Called by the GatewaySession (in its reader) after each response: write the turn and keep the
        resume state current, both in the background: the reader waits on no thread, pool or lock."""
        session_services.turn_rows_put(session_id=self.session_id, stats=self.session.stats)
        self.meta.turns = turn.index + 1
        self.meta.history = self.session.history if self.session else []
        self.meta.used_s = self._used_seconds()
        if self._meta_saving:
            self._meta_dirty = True  # the save in flight is followed by one more with the latest state
        else:
            self._meta_saving = True
            self.session.spawn(self._save_meta())

    async def _save_meta(self) -> None:
        """The resume state to Redis, again while turns completed during the previous save."""
        try:
            while True:
                self._meta_dirty = False
                with contextlib.suppress(Exception):
                    await session_services.session_meta_save(self.meta, connection=self._connection)
                if not self._meta_dirty:
                    return
        finally:
            self._meta_saving = False

    # --- frames --------------------------------------------------------------------------------------
    async def websocket_receive(self, message: dict[str, Any]) -> None:
        """Called for every client frame: the hot path."""
        session = self.session
        if session is None or self._ended:
            return
        text = message.get("text")
        if text is None:
            await self._send_event({"type": "gateway.error", "code": "invalid_event",
                                    "message": "binary frames are not supported; send JSON text"})
            return
        stats = session.stats
        stats.frames_in += 1
        if not self._frame_allowed():
            await self._end("policy", "frame_rate_exceeded", "Too many frames per second", close_code=4008)
            return
        if len(text) > self._max_frame_bytes:
            await self._end("policy", "frame_too_large", "Frame exceeds the size limit", close_code=4009)
            return
        try:
            event = parse_client_frame(text)
        except ClientEventError as exc:
            await self._send_event(exc.event())
            return
        if event.type == "gateway.feedback":
            await self._feedback(event.data)
            return
        await session.on_client_event(event)

    def _relay_frame_nowait(self, payload: bytes) -> bool:
        """Called by the server for a client text frame (raw UTF-8) while this consumer is idle (the audio
        hot path): True when the frame was a canonical audio append and went upstream here; False hands it
        to `websocket_receive`, which applies every policy to anything else."""
        session = self.session
        if self._ended or session is None or len(payload) > self._max_frame_bytes:
            return False
        audio_bytes = fast_append_audio_bytes(payload)
        if audio_bytes < 0 or not self._frame_allowed():  # over the rate: `websocket_receive` closes 4008
            return False
        if not session.relay_audio_nowait(payload, audio_bytes):
            self._tokens += 1  # `websocket_receive` counts this frame again
            return False
        session.stats.frames_in += 1
        return True

    def _frame_allowed(self) -> bool:
        """Token bucket: VOICE_MAX_FRAMES_PER_SECOND sustained, a 4 s burst (queued audio after a stall)."""
        now = time.monotonic()
        rate = self._frame_rate
        tokens = min(4.0 * rate, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if tokens < 1:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1
        return True

    async def _feedback(self, data: dict[str, Any]) -> None:
        from voice.services.feedback import FeedbackError, feedback_submit

        try:
            await sync_to_async(feedback_submit, thread_sensitive=False)(
                session_id=self.session_id, external_user_id=self.identity.user_id,
                rating=data.get("rating"), comment=data.get("comment"),
            )
        except FeedbackError as exc:
            await self._send_event({"type": "gateway.error", "code": "invalid_feedback", "message": str(exc)})
            return
        await self._send_event({"type": "gateway.feedback.received", "session_id": self.session_id})

    async def _send_text(self, text: str) -> None:
        if not self._ended:
            with contextlib.suppress(OSError):  # closed under us: its websocket.disconnect ends the session
                await self.base_send({"type": "websocket.send", "text": text})

    def _stop_fast_path(self) -> None:
        """Called as the connection ends: from now on every frame takes the ASGI path (and is dropped)."""
        self._ended = True
        if self._fastpath is not None:
            self._fastpath["set_text_handler"](None)
            if self.session is not None:
                self.session.send_client_nowait = _never

    async def _send_event(self, event: dict[str, Any]) -> None:
        await self._send_text(dump_event(event))

    # --- ending ----------------------------------------------------------------------------------------
    def _admission_done(self) -> None:
        """Called once the session is admitted (its upstream starts connecting), refused or over: the next
        connection in line is let through the gate (idempotent)."""
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.release()

    async def _refuse(self, refusal: Refusal) -> None:
        self._admission_done()
        await self._send_event(refusal.event())
        # The reason is best-effort (some servers drop it); the gateway.error event is the contract.
        await self.base_send({"type": "websocket.close", "code": refusal.close_code, "reason": refusal.message[:120]})
        self._stop_fast_path()

    async def _end(
        self, reason: str, error_code: str | None, message: str, *, error: str = "", close_code: int | None = None
    ) -> None:
        if self._ended:
            return
        code = close_code or CLOSE_CODES.get(reason, 4500)
        self._give_back_slots(reason)  # before the client can see the close and redial
        self._admission_done()
        if error_code:
            await self._send_event({"type": "gateway.error", "code": error_code, "message": message})
        self._stop_fast_path()
        with contextlib.suppress(Exception):
            await self.base_send({"type": "websocket.close", "code": code, "reason": message[:120]})
        await self._finish(reason, code, error)

    async def supersede(self) -> None:
        """Called when the same session resumes on a new connection while this one still looks live (a
        network drop the server has not noticed yet): keep the unfinished turn, close, persist the history
        before the new connection loads it, and leave the slot to the new connection."""
        self._superseded = True
        await self._end("client_closed", None, "", close_code=1001)
        # It may already have been ending (its link's reset arrived first): wait until its history is saved.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._persisted.wait(), settings.VOICE_SUPERSEDE_WAIT_SECONDS)

    async def session_supersede(self, message: dict[str, Any]) -> None:
        """Called by the process's control channel: this session resumed on another instance."""
        # Named by its connection: the resume's own connection (same session, maybe on this instance, once
        # the old one let go) may be live by the time this process reads the message.
        if message.get("connection") == self._connection:
            await self.supersede()

    def _give_back_slots(self, reason: str) -> None:
        """Called synchronously as an admitted connection starts ending: its slots go back now, before the
        close handshake and anything slow (upstream close, rows), so a redial is never refused."""
        if self._slots_released is not None or self.session is None or reason == "draining" or self._superseded:
            # A drained client resumes elsewhere at once under the same session id: releasing here could
            # delete the slot the new instance just took. Unrefreshed slots expire in 30 s.
            return
        self._slots_released = slot_release_begin(external_user_id=self.identity.user_id,
                                                  session_id=self.session_id)

    def _used_seconds(self) -> float:
        return self.meta.used_s + (time.monotonic() - self.connected_at)

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        """Called when the socket closes (client, network, or the server shutting down)."""
        await self._finish("client_closed", message.get("code"))
        raise StopConsumer

    async def _finish(self, reason: str, close_code: int | None, error: str = "") -> None:
        """Runs exactly once per admitted connection, whatever ended it: persist everything."""
        if self._finished or self.session is None:
            return
        self._finished = True
        self._give_back_slots(reason)
        self._supervision_stop()
        self._stop_fast_path()
        session = self.session
        await session.close()
        if getattr(self, "_counted_active", False):
            metrics.ACTIVE_SESSIONS.dec()
        connected = time.monotonic() - self.connected_at
        meta = self.meta
        meta.used_s += connected
        session.keep_unfinished_turn()  # an answer cut by the end of the link: its question stays in the history
        meta.history, meta.turns = session.history, session.turn_offset + session.stats.turn_count
        meta.live_connection = ""  # this save is the session's latest state: a resume needs to wait for nothing
        if self._slots_released is not None:
            await self._slots_released
        with contextlib.suppress(Exception):
            await session_services.session_meta_save(meta, connection=self._connection)
        # Registered until its state is saved: a resume arriving meanwhile finds it and waits (supersede).
        registry.unregister(self)
        self._persisted.set()
        record = session_services.session_end_record(
            meta=meta, stats=session.stats, user_pk=self.admission.user.pk,
            upstream=session.upstream_kind or upstream_kind(), instance=self.instance,
            end_reason=reason, close_code=close_code, error=error, connected_s=connected, model=session.model,
        )
        await run_db_write(session_services.voice_session_end, record)
        metrics.record_session_end(
            outcome=reason, frames_in=session.stats.frames_in, frames_out=session.stats.frames_out,
            bytes_in=session.stats.bytes_in, bytes_out=session.stats.bytes_out, plan=meta.plan,
            cost=session.stats.cost_usd,
        )
        logger.info(
            "voice session ended session_id=%s user_id=%s plan=%s reason=%s duration_s=%.1f frames_in=%d "
            "frames_out=%d turns=%d rag_queries=%d cost_usd=%.6f",
            meta.session_id, meta.user_id, meta.plan, reason, connected, session.stats.frames_in,
            session.stats.frames_out, session.stats.turn_count, session.stats.rag_queries,
            session.stats.cost_usd,
        )
        clear_session()
        self.session = None  # the session refers back to this consumer (its listener): no cycle left


def _never(payload: bytes) -> bool:
    return False


def _make_prefetcher() -> Any:
    """The Option B prefetcher for a session (None when retrieval is off)."""
    if settings.RAG_BACKEND == "off":
        return None
    try:
        from voice.rag import get_retriever
        from voice.realtime.prefetch import ContextPrefetcher
    except ImportError:
        return None
    retriever = get_retriever()
    if retriever is None:
        return None
    return ContextPrefetcher(
        retriever,
        min_words=settings.RAG_PREFETCH_MIN_WORDS,
        debounce_ms=settings.RAG_REQUERY_DEBOUNCE_MS,
        top_k=settings.RAG_TOP_K,
    )
