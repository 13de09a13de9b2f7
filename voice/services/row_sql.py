"""Precompiled SQL for the rows written while sessions run: a session's start row and its turn rows.

These writes run on the writer thread (voice.services.db), which holds the GIL whenever it runs Python. The
ORM spends most of such a write in Python building the statement (a turn row: ~1.5 ms of compiling and
field preparation for ~0.1 ms of SQLite), and every one of those milliseconds is one the event loop can
wait for when it wakes with frames to relay. Each statement is built here once per database by the ORM
itself (so it follows the backend's dialect and the models), then executed with parameters that the
fields prepare exactly as the ORM would (`get_db_prep_save`).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from django.db import connections, models
from django.db.models import Count, OuterRef, Subquery
from django.db.models.constants import OnConflict
from django.db.models.functions import Coalesce
from django.db.models.sql import InsertQuery, UpdateQuery

from voice.models import VoiceSession, VoiceTurn

_PLACEHOLDER_ID = uuid.UUID(int=0)  # stands in for a session id while a statement is compiled
TURN_UNIQUE_FIELDS = ("session", "index")
TURN_UPDATE_FIELDS = tuple(f.name for f in VoiceTurn._meta.concrete_fields if f.name not in ("id", "session", "index"))


class Statement:
    """One compiled statement and how to bind its parameters."""

    def __init__(self, sql: str, fields: Sequence[models.Field] = (), bind: Sequence[Any] = ()) -> None:
        self.sql, self.fields, self.bind = sql, tuple(fields), tuple(bind)

    def row_params(self, obj: models.Model, alias: str) -> list[Any]:
        """An INSERT's parameters for one model instance, prepared as the ORM's insert compiler does."""
        connection = connections[alias]
        return [field.get_db_prep_save(field.pre_save(obj, True), connection) for field in self.fields]

    def session_params(self, session_id: Any, alias: str) -> list[Any]:
        """An UPDATE or SELECT's parameters with the session id put where the placeholder was compiled."""
        value = VoiceSession._meta.pk.get_db_prep_value(session_id, connections[alias])
        return [value if p is _SESSION else p for p in self.bind]


_SESSION = object()  # marks the session id's place among a statement's parameters


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


def _with_session_marked(params: Iterable[Any], alias: str) -> list[Any]:
    placeholder = VoiceSession._meta.pk.get_db_prep_value(_PLACEHOLDER_ID, connections[alias])
    marked = [_SESSION if p == placeholder else p for p in params]
    assert _SESSION in marked, "the session id is not a parameter of the compiled statement"
    return marked


@functools.cache
def session_exists(alias: str) -> Statement:
    """SELECT of the session row (a turn row needs its session's row: written at the start, or at the end)."""
    query = VoiceSession.objects.using(alias).filter(pk=_PLACEHOLDER_ID).values("pk")[:1].query
    sql, params = query.get_compiler(alias).as_sql()
    return Statement(sql, bind=_with_session_marked(params, alias))


@functools.cache
def session_turns_recount(alias: str) -> Statement:
    """UPDATE of the session's turn count from its turn rows (so a turn written twice is counted once)."""
    count = VoiceTurn.objects.filter(session_id=OuterRef("pk")).order_by().values("session_id").annotate(n=Count("id"))
    query = VoiceSession.objects.using(alias).filter(pk=_PLACEHOLDER_ID).query.chain(UpdateQuery)
    query.add_update_values({"turns": Coalesce(Subquery(count.values("n")), 0)})
    sql, params = query.get_compiler(alias).as_sql()
    return Statement(sql, bind=_with_session_marked(params, alias))
