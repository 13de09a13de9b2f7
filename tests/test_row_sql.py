"""Issue 18: the precompiled statements of the writer thread (voice.services.row_sql) write exactly what the
ORM writes, column for column, on the database the tests run on (SQLite here; PostgreSQL with DATABASE_URL)."""

from __future__ import annotations

import time
import uuid
from decimal import Decimal

import pytest
from django.forms.models import model_to_dict

from voice.models import VoiceSession, VoiceTurn
from voice.realtime.accounting import TurnStats
from voice.services import sessions

pytestmark = pytest.mark.django_db


def _meta(session_id: str) -> sessions.SessionMeta:
    return sessions.SessionMeta(session_id=session_id, user_id="row-sql-user", plan="elite", cohort="beta",
                                started_at=time.time() - 5.25, max_duration_s=600)


def _columns(obj: VoiceSession | VoiceTurn) -> dict:
    data = model_to_dict(obj, fields=[f.name for f in obj._meta.concrete_fields])
    data.pop("id", None)
    data.pop("session", None)
    return data


def test_a_session_start_row_is_the_one_the_orm_creates() -> None:
    ours, orms = str(uuid.uuid4()), str(uuid.uuid4())
    sessions.voice_session_start(meta=_meta(ours), user_pk=None, upstream="openai", instance="i-1",
                                 model="gpt-realtime", resumed=False)
    meta = _meta(orms)
    VoiceSession.objects.create(id=orms, **sessions._row_defaults(
        user_pk=None, user_id=meta.user_id, plan=meta.plan, cohort=meta.cohort, upstream="openai",
        instance="i-1", started_at=meta.started_at, model="gpt-realtime"))
    mine, theirs = _columns(VoiceSession.objects.get(pk=ours)), _columns(VoiceSession.objects.get(pk=orms))
    assert abs((mine.pop("started_at") - theirs.pop("started_at")).total_seconds()) < 1
    assert mine == theirs and mine["connections"] == 1 and mine["model"] == "gpt-realtime"
    # A resume counts one more connection on the same row instead of inserting one.
    sessions.voice_session_start(meta=_meta(ours), user_pk=None, upstream="openai", instance="i-2")
    assert VoiceSession.objects.get(pk=ours).connections == 2


def test_turn_rows_are_the_ones_the_orm_writes_and_a_rewrite_updates_them() -> None:
    ours, orms = str(uuid.uuid4()), str(uuid.uuid4())
    for session_id in (ours, orms):
        sessions.voice_session_start(meta=_meta(session_id), user_pk=None, upstream="local", instance="t",
                                     resumed=False)
    turns = [
        TurnStats(index=0, speech_ms=1830, retrieval_used=True, retrieval_started_ms=240, retrieval_latency_ms=3.5,
                  retrieval_waited_ms=0.0, rag_injected=True, first_audio_ms=312.25, input_tokens=812,
                  output_tokens=96, cost_usd=0.0123456789, response_status="completed"),
        TurnStats(index=1, cost_usd=0.0, interrupted=True, response_status="cancelled"),
    ]
    assert sessions.voice_turns_save(session_id=ours, rows=[turn.row() for turn in turns])
    VoiceTurn.objects.bulk_create([
        VoiceTurn(session_id=orms, **{**turn.row(), "started_at": None,
                                      "cost_usd": Decimal(str(round(turn.cost_usd, 6)))})
        for turn in turns
    ])
    for index in (0, 1):
        mine = _columns(VoiceTurn.objects.get(session_id=ours, index=index))
        theirs = _columns(VoiceTurn.objects.get(session_id=orms, index=index))
        assert mine.pop("started_at") is not None and theirs.pop("started_at") is None
        assert mine == theirs
    assert VoiceTurn.objects.get(session_id=ours, index=0).cost_usd == Decimal("0.012346")
    assert VoiceSession.objects.get(pk=ours).turns == 2

    # The same turn written again (interrupted after its answer) is updated in place and counted once.
    turns[0].interrupted = True
    assert sessions.voice_turns_save(session_id=ours, rows=[turns[0].row()])
    assert VoiceTurn.objects.filter(session_id=ours).count() == 2
    assert VoiceTurn.objects.get(session_id=ours, index=0).interrupted
    assert VoiceSession.objects.get(pk=ours).turns == 2


def test_turn_rows_wait_for_their_session_row() -> None:
    assert not sessions.voice_turns_save(session_id=str(uuid.uuid4()), rows=[TurnStats(index=0).row()])
    assert not VoiceTurn.objects.exists()
