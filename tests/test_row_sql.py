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


def test_end_records_add_each_connections_counters_and_keep_the_latest_outcome() -> None:
    from voice.realtime.accounting import SessionStats

    session_id = str(uuid.uuid4())
    meta = _meta(session_id)
    sessions.voice_session_start(meta=meta, user_pk=None, upstream="local", instance="t", resumed=False)

    def record(*, frames_in: int, cost: float, reason: str, ended_at: float, turns: list[TurnStats],
               instance: str = "t") -> dict:
        stats = SessionStats(frames_in=frames_in, frames_out=7, bytes_in=1000, rag_queries=2, cost_usd=cost)
        stats.tokens["input_audio_tokens"] = 120
        for turn in turns:
            stats.turn_changed(turn)
        end = sessions.session_end_record(meta=meta, stats=stats, user_pk=None, upstream="local", instance=instance,
                                          end_reason=reason, close_code=1000, error="", connected_s=2.5)
        end["ended_at"] = ended_at
        return end

    now = time.time()
    sessions.voice_session_end(record(frames_in=10, cost=0.25, reason="drained", ended_at=now + 10,
                                      turns=[TurnStats(index=0)]))
    # A resumed connection's record (on another instance) that lands first carries the later outcome: kept.
    sessions.voice_session_end(record(frames_in=5, cost=0.125, reason="client_closed", ended_at=now + 20,
                                      turns=[TurnStats(index=1)], instance="b"))
    sessions.voice_session_end(record(frames_in=1, cost=0.0, reason="upstream_unavailable", ended_at=now + 15,
                                      turns=[]))
    row = VoiceSession.objects.get(pk=session_id)
    assert (row.frames_in, row.frames_out, row.bytes_in, row.rag_queries) == (16, 21, 3000, 6)
    assert row.cost_usd == Decimal("0.375") and row.input_audio_tokens == 360 and row.duration_s == 7.5
    assert row.end_reason == "client_closed" and abs(row.ended_at.timestamp() - (now + 20)) < 0.01
    assert row.turns == 2 and row.close_code == 1000 and row.instance == "b"

    # An end record whose start row was never written (database down at the start) creates the row.
    orphan = str(uuid.uuid4())
    end = record(frames_in=3, cost=0.5, reason="client_closed", ended_at=now, turns=[TurnStats(index=0)])
    end["id"] = orphan
    sessions.voice_session_end(end)
    row = VoiceSession.objects.get(pk=orphan)
    assert row.frames_in == 3 and row.cost_usd == Decimal("0.5") and row.turns == 1 and row.plan == "elite"
