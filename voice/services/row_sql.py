"""Precompiled SQL for the rows written as sessions run: a session's start row, its turn rows, its end record.

These writes run on the writer thread (voice.services.db), which holds the GIL whenever it runs Python. The
ORM spent most of such a write in Python building the statement (a turn row: 2.2 ms of CPU, 0.7–0.9 ms
precompiled; an end record 2.3–2.6 ms, 0.8 ms; docs/BENCHMARKS.md), and every one of those milliseconds is
one the event loop can wait for when it wakes with frames to relay. Each statement is built here once per
database by the ORM itself (so it follows the backend's dialect and the models), then executed with
parameters that the fields prepare as the ORM would (`get_db_prep_save`); UPDATEs are compiled with
sentinel values, whose places among the parameters receive the real values.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.db import connections, models
from django.db.models import Count, F, OuterRef, Q, Subquery
from django.db.models.constants import OnConflict
from django.db.models.functions import Coalesce
from django.db.models.sql import InsertQuery, UpdateQuery

from voice.models import VoiceSession, VoiceTurn

_PLACEHOLDER_ID = uuid.UUID(int=0)  # stands in for a session id while a statement is compiled
TURN_UNIQUE_FIELDS = ("session", "index")
TURN_UPDATE_FIELDS = tuple(f.name for f in VoiceTurn._meta.concrete_fields if f.name not in ("id", "session", "index"))


class Slot:
    """Where a value goes among a compiled statement's parameters (the statement was compiled with a sentinel)."""

    __slots__ = ("name", "wrap")

    def __init__(self, name: str, wrap: type | None = None) -> None:
        # wrap: the type the backend gave the sentinel's parameter (psycopg's Int4 for an integer in an
        # expression on PostgreSQL), given to the value too.
        self.name, self.wrap = name, wrap


class Statement:
    """One compiled statement and how to bind its parameters."""

    def __init__(self, sql: str, fields: Sequence[models.Field] = (), bind: Sequence[Any] = ()) -> None:
        self.sql, self.fields, self.bind = sql, tuple(fields), tuple(bind)

    def row_params(self, obj: models.Model, alias: str) -> list[Any]:
        """An INSERT's parameters for one model instance, prepared as the ORM's insert compiler does."""
        connection = connections[alias]
        return [field.get_db_prep_save(field.pre_save(obj, True), connection) for field in self.fields]

    def params(self, alias: str, session_id: Any, **values: Any) -> list[Any]:
        """An UPDATE or SELECT's parameters: the session id and the named values (datetimes prepared for the
        database, as the ORM prepares them) put where their sentinels were compiled."""
        connection = connections[alias]
        values["session"] = VoiceSession._meta.pk.get_db_prep_value(session_id, connection)
        for name, value in values.items():
            if isinstance(value, datetime):
                values[name] = _DATETIME.get_db_prep_value(value, connection)
        return [(values[p.name] if p.wrap is None or values[p.name] is None else p.wrap(values[p.name]))
                if isinstance(p, Slot) else p for p in self.bind]


_DATETIME = models.DateTimeField()
_SENTINEL_AT = datetime(2001, 2, 3, 4, 5, 6, 789, tzinfo=UTC)


def _compiled(query: Any, alias: str, **sentinels: Any) -> Statement:
    """Compile `query` and find each named sentinel (as the compiler prepared it) among its parameters."""
    connection = connections[alias]
    prepared = {"session": VoiceSession._meta.pk.get_db_prep_value(_PLACEHOLDER_ID, connection)}
    for name, value in sentinels.items():
        prepared[name] = _DATETIME.get_db_prep_value(value, connection) if isinstance(value, datetime) else value
    sql, params = query.get_compiler(alias).as_sql()
    bind: list[Any] = []
    for param in params:
        name = next((n for n, v in prepared.items() if isinstance(param, type(v)) and v == param), None)
        wrap = type(param) if name is not None and type(param) is not type(prepared[name]) else None
        bind.append(Slot(name, wrap) if name is not None else param)
    missing = set(prepared) - {p.name for p in bind if isinstance(p, Slot)}
    assert not missing, f"sentinels not found among the compiled parameters: {missing}"
    return Statement(sql, bind=bind)


def _insert_fields(model: type[models.Model]) -> list[models.Field]:
    # As QuerySet.bulk_create with explicit primary keys or none: an auto primary key is left to the database.
    return [f for f in model._meta.concrete_fields if not isinstance(f, models.AutoField)]


@functools.cache
def turn_upsert(alias: str) -> Statement:
    """INSERT … ON CONFLICT (session, index) DO UPDATE: what bulk_create(update_conflicts=True) runs."""
    fields = _insert_fields(VoiceTurn)
    query = InsertQuery(
        VoiceTurn, on_conflict=OnConflict.UPDATE,
        update_fields=[VoiceTurn._meta.get_field(name) for name in TURN_UPDATE_FIELDS],
        unique_fields=[VoiceTurn._meta.get_field(name) for name in TURN_UNIQUE_FIELDS],
    )
    query.insert_values(fields, [VoiceTurn(session_id=_PLACEHOLDER_ID, index=0)])
    [(sql, _)] = query.get_compiler(alias).as_sql()
    return Statement(sql, fields)


@functools.cache
def session_insert(alias: str) -> Statement:
    """INSERT of a new session row (what VoiceSession.objects.create runs; the model has no save signals)."""
    fields = _insert_fields(VoiceSession)
    query = InsertQuery(VoiceSession)
    query.insert_values(fields, [VoiceSession(id=_PLACEHOLDER_ID)])
    [(sql, _)] = query.get_compiler(alias).as_sql()
    return Statement(sql, fields)


@functools.cache
def session_exists(alias: str) -> Statement:
    """SELECT of the session row (a turn row needs its session's row: written at the start, or at the end)."""
    return _compiled(VoiceSession.objects.using(alias).filter(pk=_PLACEHOLDER_ID).values("pk")[:1].query, alias)


@functools.cache
def session_turns_recount(alias: str) -> Statement:
    """UPDATE of the session's turn count from its turn rows (so a turn written twice is counted once)."""
    count = VoiceTurn.objects.filter(session_id=OuterRef("pk")).order_by().values("session_id").annotate(n=Count("id"))
    query = VoiceSession.objects.using(alias).filter(pk=_PLACEHOLDER_ID).query.chain(UpdateQuery)
    query.add_update_values({"turns": Coalesce(Subquery(count.values("n")), 0)})
    return _compiled(query, alias)


# What a connection adds to its session's row when it ends (a resumed session adds each connection's share).
END_COUNTERS = ("frames_in", "frames_out", "bytes_in", "bytes_out", "interruptions", "rag_queries", "rag_hits",
                "duration_s", "input_text_tokens", "input_audio_tokens", "cached_text_tokens", "cached_audio_tokens",
                "output_text_tokens", "output_audio_tokens", "cost_usd")


@functools.cache
def session_end_counters(alias: str) -> Statement:
    """UPDATE adding one connection's counters to the session row (column = column + value)."""
    sentinels = {name: 987_650_000 + i for i, name in enumerate(END_COUNTERS)}
    sentinels["duration_s"] = 98_765.4321
    sentinels["cost_usd"] = Decimal("98765.432101")
    query = VoiceSession.objects.using(alias).filter(pk=_PLACEHOLDER_ID).query.chain(UpdateQuery)
    query.add_update_values({name: F(name) + value for name, value in sentinels.items()})
    return _compiled(query, alias, **sentinels)


@functools.cache
def session_end_outcome(alias: str) -> Statement:
    """UPDATE of the session's outcome and the instance that served its latest connection, unless a later
    connection's outcome is already there (a drained connection's record may land after its resume's)."""
    query = VoiceSession.objects.using(alias).filter(
        Q(ended_at__isnull=True) | Q(ended_at__lte=_SENTINEL_AT), pk=_PLACEHOLDER_ID).query.chain(UpdateQuery)
    sentinels = {"ended_at": _SENTINEL_AT, "end_reason": "\x00reason", "close_code": 987_654_321,
                 "error": "\x00error", "instance": "\x00instance"}
    query.add_update_values(sentinels)
    return _compiled(query, alias, **sentinels)
