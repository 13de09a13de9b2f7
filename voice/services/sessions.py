"""Voice session lifecycle services: resume metadata in Redis, metrics rows in the database.

Metrics are never lost: the row is created when the session starts, each turn's row is written once the
turn is answered, and the session row is completed when the connection ends (the consumer calls this from
`finally`, so SIGTERM and abrupt disconnects are covered); the end record carries every turn whose row
could not be written yet. When the database is unavailable, the record is spooled to METRICS_SPOOL_DIR as
JSON and replayed by the next successful write (or `voice_sessions --flush-spool`). Turn rows are upserts
and the session's turn count is recounted from them, so a turn written twice is counted once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import time
import uuid
import weakref
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core import signing
from django.db import DEFAULT_DB_ALIAS, DatabaseError, DataError, IntegrityError, connections, transaction
from django.db.models import F
from limits import RateLimitItem

from voice.models import VoiceSession, VoiceTurn
from voice.realtime.accounting import SessionStats
from voice.services import row_sql
from voice.services.db import submit_write
from voice.services.state import get_state
from voice.services.stats import ACTIVE_SESSIONS_KEY

logger = logging.getLogger(__name__)
RESUME_SALT = "intelia-voice.resume"
SUPERSEDE_POLL_SECONDS = 0.05  # how often a resume looks whether another instance's connection let go


@dataclass
class SessionMeta:
    """What a session needs to be resumed on any instance (kept in Redis for SESSION_TTL)."""

    session_id: str
    user_id: str
    plan: str
    cohort: str
    started_at: float
    max_duration_s: float
    used_s: float = 0.0
    turns: int = 0
    history: list[dict[str, str]] = field(default_factory=list)
    # The connection serving the session now, "" once it has ended and saved this: a resume on another
    # instance asks it to let go first (session_meta_take_over).
    live_connection: str = ""

    @property
    def remaining_s(self) -> float:
        return max(0.0, self.max_duration_s - self.used_s)


def new_session_id() -> str:
    return str(uuid.uuid4())


def resume_token_issue(*, session_id: str, user_id: str) -> str:
    """Called when a session is ready: a signed token naming the session and its owner."""
    return signing.dumps({"s": session_id, "u": user_id}, salt=RESUME_SALT, compress=True)


def resume_token_read(token: str) -> tuple[str, str] | None:
    """(session_id, user_id) from a resume token, or None when forged or older than SESSION_TTL."""
    if not token or len(token) > 512:
        return None
    try:
        data = signing.loads(token, salt=RESUME_SALT, max_age=settings.SESSION_TTL)
    except signing.BadSignature:
        return None
    return str(data.get("s")), str(data.get("u"))


async def session_meta_save(meta: SessionMeta, *, window: tuple[RateLimitItem, str] | None = None,
                            connection: str = "") -> None:
    """Called at start, after each turn and at the end of a connection; at a new session's start, `window`
    (its user's hourly window) counts it in the same round trip. A save by `connection` after its start is
    dropped once another connection has taken the session over (a resume elsewhere that could not wait for
    this one to let go): the newer connection's state is never overwritten by an older one's."""
    key = f"session:{meta.session_id}"
    if connection:
        if not await get_state().set_json_unless_owned(key, meta.__dict__, settings.SESSION_TTL,
                                                       field="live_connection", owner=connection):
            logger.info("resume state not saved: the session was taken over by another connection")
    elif window is None:
        await get_state().set_json(key, meta.__dict__, settings.SESSION_TTL)
    else:
        await get_state().set_json_and_hit(key, meta.__dict__, settings.SESSION_TTL, *window)


async def session_meta_load(session_id: str) -> SessionMeta | None:
    """Called on `?resume=`: the stored session, or None when unknown or expired."""
    data = await get_state().get_json(f"session:{session_id}")
    if not data:
        return None
    try:
        # Fields a newer version added are left out: a rolling deploy resumes in both directions.
        return SessionMeta(**{name: value for name, value in data.items() if name in _META_FIELDS})
    except TypeError:
        return None


_META_FIELDS = frozenset(SessionMeta.__dataclass_fields__)


async def session_meta_take_over(session_id: str) -> SessionMeta | None:
    """Called on a resume that found no connection of the session on its own event loop: when another
    instance still serves one (its link died unnoticed and the balancer chose another instance), ask that
    connection to let go and wait until it has saved the session (its unfinished turn, the time it used), so
    that this connection does not resume from an older state, nor is overwritten by it later."""
    meta = await session_meta_load(session_id)
    if meta is None or not meta.live_connection:
        return meta
    if not await get_state().slot_live(ACTIVE_SESSIONS_KEY, session_id):
        return meta  # its instance died without ending it: the state saved after its last turn is all there is
    from voice.realtime.control import control_broadcast

    superseding = {"type": "session.supersede", "session_id": session_id, "connection": meta.live_connection}
    if not await control_broadcast(superseding):
        return meta
    deadline = time.monotonic() + settings.VOICE_SUPERSEDE_WAIT_SECONDS
    while time.monotonic() < deadline:
        await asyncio.sleep(SUPERSEDE_POLL_SECONDS)
        latest = await session_meta_load(session_id)
        if latest is None or not latest.live_connection:
            return latest
    logger.warning("a session's previous connection did not let go in time; resuming from its last saved state")
    return meta


# --- metrics rows --------------------------------------------------------------------------------------


def voice_session_start(*, meta: SessionMeta, user_pk: int | None, upstream: str, instance: str,
                        model: str = "", resumed: bool = True) -> None:
    """Create the session's row when it starts, or count one more connection on resume (sync; ORM). On the
    writer thread, which keeps its connection (a connect per session start and end was most of these writes'
    cost; a connection the database dropped is replaced by voice.services.db)."""
    try:
        # A new session's id is new: no row to count a connection on (one query less per admission).
        counted = resumed and VoiceSession.objects.filter(pk=meta.session_id).update(connections=F("connections") + 1)
        if not counted:
            row = VoiceSession(
                id=meta.session_id,
                **_row_defaults(user_pk=user_pk, user_id=meta.user_id, plan=meta.plan, cohort=meta.cohort,
                                upstream=upstream, instance=instance, started_at=meta.started_at, model=model),
            )
            insert = row_sql.session_insert(DEFAULT_DB_ALIAS)  # what objects.create runs, compiled once
            with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
                cursor.execute(insert.sql, insert.row_params(row, DEFAULT_DB_ALIAS))
    except DatabaseError:
        logger.exception("could not create the session row; it will be created at the end")


def _row_defaults(*, user_pk: int | None, user_id: str, plan: str, cohort: str, upstream: str, instance: str,
                  started_at: float, model: str = "") -> dict[str, Any]:
    """The columns a session row is created with, whether at its start or (DB down then) at its end."""
    return {
        "user_id": user_pk, "external_user_id": user_id, "plan": plan, "cohort": cohort, "upstream": upstream,
        "instance": instance, "started_at": datetime.fromtimestamp(started_at, tz=UTC),
        # The model the session was priced at (its plan's); "local:" marks the offline engine standing in.
        "model": (model or settings.OPENAI_REALTIME_MODEL) if upstream == "openai" else f"local:{model}".rstrip(":"),
    }


def voice_session_end(record: dict[str, Any]) -> None:
    """Add one connection's counters and turns to the session row; spool when the DB fails (sync; on the
    writer thread, which keeps its connection)."""
    try:
        _write_record(record)
    except DatabaseError:
        logger.exception("database unavailable at session end; metrics spooled")
        spool_record(record)
        return
    try:
        flush_spool()  # the database answers again: replay what an outage left behind
    except DatabaseError:
        logger.warning("spooled session records not replayed yet (database error)")


def session_end_record(
    *, meta: SessionMeta, stats: SessionStats, user_pk: int | None, upstream: str, instance: str,
    end_reason: str, close_code: int | None, error: str, connected_s: float, model: str = "",
) -> dict[str, Any]:
    """A JSON-serialisable record of one connection, written by `voice_session_end`."""
    return {
        "id": meta.session_id, "user_pk": user_pk, "user_id": meta.user_id, "plan": meta.plan,
        "cohort": meta.cohort, "upstream": upstream, "instance": instance, "model": model,
        "started_at": meta.started_at, "ended_at": time.time(), "duration_s": connected_s,
        "end_reason": end_reason, "close_code": close_code, "error": error[:2000],
        "frames_in": stats.frames_in, "frames_out": stats.frames_out, "bytes_in": stats.bytes_in,
        "bytes_out": stats.bytes_out, "interruptions": stats.interruptions, "rag_queries": stats.rag_queries,
        "rag_hits": stats.rag_hits, "cost_usd": stats.cost_usd, "tokens": dict(stats.tokens),
        "turns": [turn.row() for turn in stats.unsaved_turns],
    }


class TurnRowQueue:
    """Turn rows handed from the event loop to the writer thread without waiting (one per event loop).

    Per turn, the loop only snapshots the rows and puts them on a SimpleQueue (never blocks): no task, no
    executor future, no await. One drain job at a time runs on the writer thread and takes every queued
    turn (of every session) in one go; its result comes back in one loop callback per batch, which marks the
    rows saved and schedules the next drain if more turns arrived meanwhile.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)  # the queue lives in a WeakKeyDictionary keyed by this loop
        self._queue: queue.SimpleQueue[tuple[str, SessionStats, list[tuple[Any, dict[str, Any]]]]] = (
            queue.SimpleQueue())
        self._draining = False  # a drain job is queued or running (read and written on the loop only)

    def put(self, session_id: str, stats: SessionStats) -> None:
        """Called on the loop after each answered turn: the turns whose latest state has no row yet."""
        written = [(turn, turn.row()) for turn in stats.unsaved_turns]
        if not written:
            return
        self._queue.put((session_id, stats, written))
        if not self._draining:
            self._draining = True
            submit_write(self._drain)

    def _drain(self) -> None:
        """On the writer thread: write every queued turn, then report back to the loop once."""
        saved: list[tuple[SessionStats, list[tuple[Any, dict[str, Any]]]]] = []
        try:
            while True:
                try:
                    session_id, stats, written = self._queue.get_nowait()
                except queue.Empty:
                    break
                if voice_turns_save(session_id=session_id, rows=[row for _, row in written]):
                    saved.append((stats, written))
        finally:
            loop = self._loop()
            if loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to tell
                    loop.call_soon_threadsafe(self._drained, saved)

    def _drained(self, saved: list[tuple[SessionStats, list[tuple[Any, dict[str, Any]]]]]) -> None:
        """On the loop, once per drain: rows written; drain again if turns came in after the last take."""
        for stats, written in saved:
            stats.turns_saved(written)
        self._draining = False
        if not self._queue.empty():
            self._draining = True
            submit_write(self._drain)


_turn_queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TurnRowQueue] = weakref.WeakKeyDictionary()


def turn_rows_put(*, session_id: str, stats: SessionStats) -> None:
    """Called on the event loop after each answered turn: its row is written in the background, never
    awaited (voice_turns_save on the writer thread; the end record carries what is not written yet)."""
    loop = asyncio.get_running_loop()
    turn_queue = _turn_queues.get(loop)
    if turn_queue is None:
        turn_queue = _turn_queues[loop] = TurnRowQueue(loop)
    turn_queue.put(session_id, stats)


def voice_turns_save(*, session_id: str, rows: list[dict[str, Any]]) -> bool:
    """Write answered turns' rows during the session (sync; ORM). False leaves them to the end record:
    database down, or the session row not created yet (it could not be at the start). The writer thread
    keeps its connection between these (a turn every few seconds per session): no connect per turn."""
    exists = row_sql.session_exists(DEFAULT_DB_ALIAS)
    try:
        with transaction.atomic(), connections[DEFAULT_DB_ALIAS].cursor() as cursor:
            cursor.execute(exists.sql, exists.params(DEFAULT_DB_ALIAS, session_id))
            if cursor.fetchone() is None:
                return False
            _upsert_turns(session_id, rows)
        return True
    except DatabaseError:
        logger.warning("turn rows not written yet (database error): they go with the session's end record")
        return False


def _upsert_turns(session_id: str, rows: list[dict[str, Any]]) -> None:
    """Insert or update turn rows, then recount the session's turns (idempotent: a replay changes nothing).
    Precompiled statements (voice.services.row_sql): this runs once per answered turn on the writer thread."""
    upsert, recount = row_sql.turn_upsert(DEFAULT_DB_ALIAS), row_sql.session_turns_recount(DEFAULT_DB_ALIAS)
    params = []
    for row in rows:
        row = dict(row)
        started = row.pop("started_at", None)
        row["cost_usd"] = Decimal(str(round(row["cost_usd"], 6)))
        turn = VoiceTurn(session_id=session_id, started_at=datetime.fromtimestamp(started, tz=UTC) if started else None,
                         **row)
        params.append(upsert.row_params(turn, DEFAULT_DB_ALIAS))
    with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
        if params:
            cursor.executemany(upsert.sql, params)
        cursor.execute(recount.sql, recount.params(DEFAULT_DB_ALIAS, session_id))


def _write_record(record: dict[str, Any]) -> None:
    """Add one connection's counters, outcome and unwritten turns to its session row (precompiled statements:
    voice.services.row_sql; sessions often end in bursts, each end on the writer thread)."""
    alias = DEFAULT_DB_ALIAS
    tokens = record["tokens"]
    counters = {name: tokens.get(name, 0) if name.endswith("_tokens") else record[name]
                for name in row_sql.END_COUNTERS}
    counters["cost_usd"] = Decimal(str(round(record["cost_usd"], 6)))
    pk = record["id"]
    add, outcome = row_sql.session_end_counters(alias), row_sql.session_end_outcome(alias)
    with transaction.atomic(), connections[alias].cursor() as cursor:
        # The row usually exists (created at the start): add to it first, create it only when that found none.
        cursor.execute(add.sql, add.params(alias, pk, **counters))
        if not cursor.rowcount:
            VoiceSession.objects.get_or_create(id=pk, defaults=_row_defaults(
                user_pk=record["user_pk"], user_id=record["user_id"], plan=record["plan"], cohort=record["cohort"],
                upstream=record["upstream"], instance=record["instance"], started_at=record["started_at"],
                model=record.get("model", ""),  # spooled by an older version: no model
            ))
            cursor.execute(add.sql, add.params(alias, pk, **counters))
        # The outcome and the instance are the latest connection's (a drained connection's record may land
        # after the resume's, which ran on another instance).
        cursor.execute(outcome.sql, outcome.params(
            alias, pk, ended_at=datetime.fromtimestamp(record["ended_at"], tz=UTC), end_reason=record["end_reason"],
            close_code=record["close_code"], error=record["error"], instance=record["instance"]))
        if record["turns"]:  # rows written during the session were recounted then
            _upsert_turns(pk, record["turns"])


def spool_record(record: dict[str, Any]) -> Path:
    """Write a record to the spool directory (atomic rename), to be replayed later."""
    spool = Path(settings.METRICS_SPOOL_DIR)
    spool.mkdir(parents=True, exist_ok=True)
    path = spool / f"{record['id']}-{time.time_ns()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    os.replace(tmp, path)
    return path


def flush_spool() -> int:
    """Replay spooled records (after each successful write, and `voice_sessions --flush-spool`).

    A record the database refuses for good (its user was deleted, a corrupt file) moves to
    `rejected/` beside the spool and is logged: left in place, it would block every later replay and be
    retried at every session end. Any other database error stops the replay (raised): still down.
    """
    spool = Path(settings.METRICS_SPOOL_DIR)
    if not spool.is_dir():
        return 0
    flushed = 0
    for path in sorted(spool.glob("*.json")):
        try:
            _write_record(json.loads(path.read_text(encoding="utf-8")))
        except (IntegrityError, DataError, ValueError, KeyError, TypeError) as exc:
            rejected = spool / "rejected"
            rejected.mkdir(exist_ok=True)
            os.replace(path, rejected / path.name)
            logger.error("spooled session record %s rejected (%s); moved to %s", path.name,
                         type(exc).__name__, rejected)
            continue
        path.unlink()
        flushed += 1
    if flushed:
        logger.info("replayed %d spooled session records", flushed)
    return flushed

