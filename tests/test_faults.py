"""Issue 8 (faults): the upstream misbehaving in every documented way; the database failing at the end."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from django.db import OperationalError

from tests.live import LiveServer, VoiceClient
from voice.models import VoiceSession
from voice.realtime.engine.config import EngineConfig
from voice.realtime.engine.upstream import LocalUpstream

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def upstreams(monkeypatch):
    """Capture the in-process upstreams so a test can inject faults into them."""
    from voice import consumers

    created: list[LocalUpstream] = []
    configs: list[EngineConfig] = []

    def factory(model: str | None = None) -> LocalUpstream:
        upstream = LocalUpstream(configs.pop(0) if configs else EngineConfig(), model=model)
        created.append(upstream)
        return upstream

    monkeypatch.setattr(consumers, "make_upstream", factory)
    return created, configs


async def _row(session_id: str) -> VoiceSession:
    for _ in range(100):
        row = await VoiceSession.objects.filter(pk=session_id, ended_at__isnull=False).afirst()
        if row:
            return row
        await asyncio.sleep(0.05)
    raise AssertionError("session row not persisted")


async def _text_turn(client: VoiceClient, text: str = "How should I ventilate in winter?") -> None:
    await client.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
    await client.send({"type": "response.create"})


async def _open(server: LiveServer, token: str) -> tuple[VoiceClient, str]:
    client = await VoiceClient.open(server.ws_url, token=token)
    ready = await client.wait_for("gateway.session.ready")
    return client, ready["session_id"]


@pytest.mark.parametrize("code", ["insufficient_quota", "invalid_api_key", "account_deactivated",
                                  "billing_hard_limit_reached", "beta_api_shape_disabled"])
async def test_fatal_upstream_errors_end_the_session(gateway, token_for, upstreams, code) -> None:
    created, _ = upstreams
    client, session_id = await _open(gateway, token_for())
    gateway.loop.call_soon_threadsafe(created[0].inject, "error", code)
    assert (await client.wait_for("error"))["error"]["code"] == code  # relayed for the client's logs
    assert (await client.wait_for("gateway.error"))["code"] == "upstream_error"
    assert await client.wait_closed() == 4502
    row = await _row(session_id)
    assert row.end_reason == "upstream_error" and row.error


async def test_quota_failure_inside_response_done_is_fatal(gateway, token_for, upstreams) -> None:
    _, configs = upstreams
    configs.append(EngineConfig(fail_with="insufficient_quota"))
    client, session_id = await _open(gateway, token_for())
    await _text_turn(client)
    assert (await client.wait_for("gateway.error", timeout=10))["code"] == "upstream_error"
    assert await client.wait_closed() == 4502
    assert (await _row(session_id)).end_reason == "upstream_error"


# Every recoverable code of the protocol notes (§9). (Fatal codes: test_fatal_upstream_errors_end_the_session;
# session_expired: the recycle test.)
@pytest.mark.parametrize("code", ["server_error", "input_audio_buffer_commit_empty", "invalid_value",
                                  "conversation_already_has_active_response", "response_cancel_not_active",
                                  "unsupported_content_type", "missing_required_parameter"])
async def test_recoverable_errors_are_relayed_and_the_session_goes_on(gateway, token_for, upstreams, code):
    created, _ = upstreams
    client, session_id = await _open(gateway, token_for())
    gateway.loop.call_soon_threadsafe(created[0].inject, "error", code)
    assert (await client.wait_for("error"))["error"]["code"] == code
    await _text_turn(client)
    assert (await client.wait_for("response.done", timeout=15))["response"]["status"] == "completed"
    await client.close()
    assert (await _row(session_id)).end_reason == "client_closed"


async def test_failed_response_is_recorded_and_session_continues(gateway, token_for, upstreams) -> None:
    _, configs = upstreams
    configs.append(EngineConfig(fail_with="server_error"))
    client, session_id = await _open(gateway, token_for())
    await _text_turn(client)
    done = await client.wait_for("response.done", timeout=10)
    assert done["response"]["status"] == "failed"
    await _text_turn(client, "And litter moisture?")
    assert (await client.wait_for("response.done", timeout=15))["response"]["status"] == "completed"
    await client.close()
    row = await _row(session_id)
    assert row.turns == 2


async def test_session_expired_recycles_the_upstream_transparently(gateway, token_for, upstreams) -> None:
    created, _ = upstreams
    client, session_id = await _open(gateway, token_for())
    await _text_turn(client, "We raise Ross 308 broilers in Brittany")
    await client.wait_for("response.done", timeout=15)
    gateway.loop.call_soon_threadsafe(created[0].inject, "error", "session_expired")
    for _ in range(50):
        if len(created) == 2 and created[1].session is not None:
            break
        await asyncio.sleep(0.05)
    assert len(created) == 2  # a fresh upstream, with the conversation replayed
    await asyncio.sleep(0.3)
    replayed = [entry for entry in created[1].session.conversation.by_id.values()]
    assert replayed, "history replayed into the new upstream"
    assert "Ross 308" in repr(replayed)  # the turn's texts reached the history before the turn let go of them
    await _text_turn(client, "What about heat stress?")
    assert (await client.wait_for("response.done", timeout=15))["response"]["status"] == "completed"
    assert not client.seen("gateway.error") and not [e for e in client.seen("error")
                                                      if e["error"]["code"] == "session_expired"]
    assert len(client.seen("gateway.session.ready")) == 1
    await client.close()
    assert (await _row(session_id)).end_reason == "client_closed"


@pytest.mark.parametrize("fault", ["close_mid_response", "crash"])
async def test_upstream_closes_mid_response(gateway, token_for, upstreams, fault) -> None:
    created, configs = upstreams
    if fault == "close_mid_response":
        configs.append(EngineConfig(fail_with="close_mid_response"))
    client, session_id = await _open(gateway, token_for())
    await _text_turn(client)
    await client.wait_for("response.output_audio.delta", timeout=10)
    if fault == "crash":
        gateway.loop.call_soon_threadsafe(created[0].crash)
    assert (await client.wait_for("gateway.error", timeout=3))["code"] == "upstream_unavailable"
    assert await client.wait_closed() == 4502
    assert (await _row(session_id)).end_reason == "upstream_unavailable"


async def test_upstream_stall_is_detected(live_db, settings, token_for, upstreams) -> None:
    settings.VOICE_UPSTREAM_STALL_SECONDS = 1.5
    _, configs = upstreams
    configs.append(EngineConfig(fail_with="stall_mid_response"))
    server = LiveServer().start()
    try:
        client, session_id = await _open(server, token_for())
        await _text_turn(client)
        await client.wait_for("response.output_audio.delta", timeout=10)
        started = time.monotonic()
        assert (await client.wait_for("gateway.error", timeout=5))["code"] == "upstream_unavailable"
        assert await client.wait_closed() == 4502
        assert time.monotonic() - started < 4
        assert (await _row(session_id)).end_reason == "upstream_unavailable"
    finally:
        server.stop()


async def test_malformed_upstream_events_are_dropped(gateway, token_for, upstreams) -> None:
    created, _ = upstreams
    client, _ = await _open(gateway, token_for())
    for _ in range(5):
        gateway.loop.call_soon_threadsafe(created[0].inject, "malformed")
    await _text_turn(client)
    assert (await client.wait_for("response.done", timeout=15))["response"]["status"] == "completed"
    assert not client.seen("gateway.error")
    await client.close()


async def test_upstream_refuses_the_handshake(live_db, settings, token_for) -> None:
    from voice.realtime.engine.server import EngineServerThread

    engine = EngineServerThread(EngineConfig(fail_with="invalid_api_key")).start()
    settings.VOICE_UPSTREAM = "openai"
    settings.OPENAI_REALTIME_URL = engine.url
    settings.OPENAI_API_KEY = "sk-wrong-key-for-test"
    settings.RETRY_BASE_DELAY = 0.01
    server = LiveServer().start()
    try:
        client = await VoiceClient.open(server.ws_url, token=token_for())
        assert (await client.wait_for("gateway.error", timeout=5))["code"] == "upstream_unavailable"
        assert await client.wait_closed() == 4502
        assert "sk-wrong" not in str(client.events)
        for _ in range(100):
            row = await VoiceSession.objects.filter(ended_at__isnull=False).afirst()
            if row:
                break
            await asyncio.sleep(0.05)
        assert row.end_reason == "upstream_unavailable" and "sk-wrong" not in row.error
        # Unreachable upstream (closed port): retried RETRY_MAX_ATTEMPTS times, then the same answer.
        settings.OPENAI_REALTIME_URL = "ws://127.0.0.1:1/v1/realtime"
        client = await VoiceClient.open(server.ws_url, token=token_for())
        assert (await client.wait_for("gateway.error", timeout=10))["code"] == "upstream_unavailable"
        assert await client.wait_closed() == 4502
    finally:
        server.stop()
        engine.stop()


def test_database_unavailable_at_session_end_spools_then_replays(db, monkeypatch, settings) -> None:
    import uuid

    from voice.realtime.accounting import SessionStats, TurnStats
    from voice.services import sessions

    meta = sessions.SessionMeta(session_id=str(uuid.uuid4()), user_id="spool-user", plan="elite",
                                cohort="beta", started_at=time.time(), max_duration_s=600)
    stats = SessionStats(frames_in=10, turn_count=1, unsaved_turns=[TurnStats(index=0, first_audio_ms=500.0)])
    record = sessions.session_end_record(
        meta=meta, stats=stats, user_pk=None, upstream="local", instance="t", end_reason="client_closed",
        close_code=1000, error="", connected_s=3.0)
    original = sessions._write_record
    monkeypatch.setattr(sessions, "_write_record", lambda r: (_ for _ in ()).throw(OperationalError("down")))
    sessions.voice_session_end(record)
    spooled = list(__import__("pathlib").Path(settings.METRICS_SPOOL_DIR).glob("*.json"))
    assert len(spooled) == 1 and not VoiceSession.objects.filter(pk=meta.session_id).exists()
    monkeypatch.setattr(sessions, "_write_record", original)
    assert sessions.flush_spool() == 1
    row = VoiceSession.objects.get(pk=meta.session_id)
    assert row.frames_in == 10 and row.turn_set.count() == 1
    assert not list(__import__("pathlib").Path(settings.METRICS_SPOOL_DIR).glob("*.json"))


def test_turn_rows_are_written_as_turns_complete_and_counted_once(db) -> None:
    """A turn's row is written once it is answered, rewritten if it is interrupted later, and the end
    record's copy (a turn whose write was in flight at the end) does not count it twice."""
    import uuid

    from voice.realtime.accounting import SessionStats, TurnStats
    from voice.services import sessions

    session_id = str(uuid.uuid4())
    assert not sessions.voice_turns_save(session_id=session_id, rows=[TurnStats(index=0).row()])  # no row yet
    sessions.voice_session_end(_end_record(session_id))
    stats = SessionStats(turn_count=2)
    first, second = TurnStats(index=0, first_audio_ms=300.0), TurnStats(index=1)
    stats.turn_changed(first)
    stats.turn_changed(second)
    written = [(turn, turn.row()) for turn in stats.unsaved_turns]
    assert sessions.voice_turns_save(session_id=session_id, rows=[row for _, row in written])
    second.interrupted = True  # changed while its write was in flight: still due
    stats.turns_saved(written)
    assert stats.unsaved_turns == [second]
    assert VoiceSession.objects.get(pk=session_id).turns == 2
    stats.turn_changed(first)
    first.interrupted = True  # barge-in after the answer: rewritten, not added
    record = _end_record(session_id)
    record["turns"] = [turn.row() for turn in stats.unsaved_turns]
    sessions.voice_session_end(record)
    row = VoiceSession.objects.get(pk=session_id)
    assert row.turns == 2 and row.turn_set.filter(interrupted=True).count() == 2
    assert row.turn_set.get(index=0).first_audio_ms == 300.0


def _end_record(session_id: str, *, user_pk: int | None = None, frames_in: int = 10) -> dict:
    from voice.realtime.accounting import SessionStats
    from voice.services import sessions

    meta = sessions.SessionMeta(session_id=session_id, user_id="spool-user", plan="elite", cohort="beta",
                                started_at=time.time(), max_duration_s=600)
    return sessions.session_end_record(
        meta=meta, stats=SessionStats(frames_in=frames_in), user_pk=user_pk, upstream="local", instance="t",
        end_reason="client_closed", close_code=1000, error="", connected_s=3.0)


def test_a_poison_spool_record_is_set_aside_and_never_double_counts(db, settings) -> None:
    """A spooled record the database refuses for good (its user is gone) must neither block the replay of
    the others nor make a later session's own, already written, record be spooled again (counted twice)."""
    import uuid
    from pathlib import Path

    from voice.services import sessions

    spool = Path(settings.METRICS_SPOOL_DIR)
    poison = sessions.spool_record(_end_record(str(uuid.uuid4()), user_pk=987654321))  # no such user
    good_id = str(uuid.uuid4())
    sessions.spool_record(_end_record(good_id, frames_in=7))
    live_id = str(uuid.uuid4())
    sessions.voice_session_end(_end_record(live_id, frames_in=5))  # written, then the spool replays
    assert VoiceSession.objects.get(pk=live_id).frames_in == 5
    assert VoiceSession.objects.get(pk=good_id).frames_in == 7
    assert not list(spool.glob("*.json"))  # nothing left to retry at every session end
    assert [p.name for p in (spool / "rejected").iterdir()] == [poison.name]
    sessions.voice_session_end(_end_record(str(uuid.uuid4())))
    assert VoiceSession.objects.get(pk=live_id).frames_in == 5  # never re-spooled, never counted twice


async def test_rollout_reads_are_single_flight(db, monkeypatch) -> None:
    """A thousand ticks finding the cache stale share one database read."""
    from voice.services import rollout

    reads = []
    real = rollout.rollout_read
    monkeypatch.setattr(rollout, "rollout_read", lambda: reads.append(1) or real())
    rollout.rollout_cache_clear()
    snapshots = await asyncio.gather(*(rollout.rollout_snapshot() for _ in range(1000)))
    assert len(reads) == 1 and len({id(s) for s in snapshots}) == 1


def test_redis_client_version_lookup_is_cached() -> None:
    """redis-py parses its package metadata per new connection unless cached (voice/apps.py)."""
    import redis.utils

    assert redis.utils.get_lib_version() == redis.utils.get_lib_version()
    assert redis.utils.get_lib_version.cache_info().hits >= 1


UNEXPECTED_UPSTREAM_EVENTS = [
    "[]", '"text"', "42", "null", '{"type": 42}', '{"no_type": true}',
    '{"type": "response.done"}', '{"type": "response.done", "response": "oops"}',
    '{"type": "response.done", "response": {"id": 7, "status": ["x"], "usage": "many", "status_details": 1}}',
    '{"type": "response.created", "response": null}', '{"type": "response.created", "response": {"id": {}}}',
    '{"type": "error"}', '{"type": "error", "error": "boom"}', '{"type": "error", "error": {"code": ["x"]}}',
    '{"type": "response.output_audio.delta", "delta": 5, "response_id": ["r"], "item_id": null}',
    '{"type": "response.output_audio.delta", "delta": "!!!not base64", "response_id": "r", "item_id": "i"}',
    '{"type": "input_audio_buffer.speech_started", "audio_start_ms": "soon", "item_id": {}}',
    '{"type": "input_audio_buffer.speech_stopped", "audio_end_ms": "soon", "item_id": 3}',
    '{"type": "input_audio_buffer.committed", "item_id": []}',
    '{"type": "conversation.item.input_audio_transcription.delta", "item_id": 1, "delta": {"a": 1}}',
    '{"type": "conversation.item.input_audio_transcription.completed", "item_id": "x", "transcript": {"a": 1}}',
    '{"type": "response.output_audio_transcript.done", "transcript": null, "item_id": 9}',
    '{"type": "conversation.item.added", "item": "str"}', '{"type": "conversation.item.deleted", "item_id": 5}',
    '{"type": "session.updated", "session": []}',
    '{"type": "a.future.event", "payload": {"nested": [1, 2, 3]}}',
]


async def test_unexpected_upstream_events_never_break_the_session(gateway, token_for, upstreams) -> None:
    """Valid JSON of the wrong shape (a field of another type, a missing object, an event type from the
    future) must not end the session: the gateway drops or relays it and the next turn is answered."""
    created, _ = upstreams
    client, session_id = await _open(gateway, token_for())
    for raw in UNEXPECTED_UPSTREAM_EVENTS:
        gateway.loop.call_soon_threadsafe(created[0].session.emit_raw, raw)
    await _text_turn(client)
    assert (await client.wait_for("response.done", timeout=15))["response"]["status"] == "completed"
    assert not client.seen("gateway.error")
    await client.close()
    assert (await _row(session_id)).end_reason == "client_closed"


def _fuzzed_upstream_event(data) -> dict:
    """A known server event type whose schema fields each get the right type, any JSON value, or nothing."""
    from hypothesis import strategies as st

    from voice.realtime.upstream_schema import SERVER_EVENT_FIELDS

    leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
    any_json = st.recursive(leaf, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
    right = {str: st.sampled_from(["r1", "item_1", "", "server_error", "session_expired", "insufficient_quota",
                                   "completed", "failed", "cancelled", "gw_1"]) | st.text(max_size=12),
             int: st.integers(min_value=-10, max_value=10**7), dict: st.builds(dict)}
    kind = data.draw(st.sampled_from(sorted(SERVER_EVENT_FIELDS)))
    event: dict = {"type": kind}
    for path, expected in SERVER_EVENT_FIELDS[kind].items():
        choice = data.draw(st.sampled_from(["absent", "right", "right", "any"]))
        if choice == "absent":
            continue
        *parents, leaf_key = path.split(".")
        node = event
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                break
        else:
            node[leaf_key] = data.draw(right[expected] if choice == "right" else any_json)
    return event


def test_fuzzed_upstream_event_sequences_never_crash_the_session() -> None:
    """Hypothesis: sequences of server events of every handled type with fields of the right type, of any
    JSON type, or missing. No handler raises; only a fatal code ends the session (the reader loop turns any
    handler exception into internal_error, so one would show here as a raise)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from voice.realtime.session import GatewaySession
    from voice.realtime.upstream_events import FATAL_ERROR_CODES

    class Listener:
        def __init__(self) -> None:
            self.failed: list[str] = []

        async def session_ready(self) -> None: ...

        async def session_failed(self, reason: str, error_code: str, message: str) -> None:
            self.failed.append(reason)

        async def turn_completed(self, turn) -> None: ...

    async def feed(events: list[dict]) -> Listener:
        relayed: list[str] = []

        async def send_client(text: str) -> None:
            relayed.append(text)

        listener = Listener()
        session = GatewaySession(session_id="s", send_client=send_client, listener=listener,  # type: ignore[arg-type]
                                 upstream_factory=None, send_client_nowait=lambda payload: True)  # type: ignore[arg-type]
        session.spawn = lambda coro: coro.close()  # turn answers and recycles: not this test's subject
        for event in events:
            await session._on_upstream_text(json.dumps(event))
            session._relay_upstream_nowait(json.dumps(event, separators=(",", ":")).encode())
        for text in relayed:
            assert isinstance(json.loads(text), dict)
        return listener

    @settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data) -> None:
        events = [_fuzzed_upstream_event(data) for _ in range(data.draw(st.integers(1, 6)))]
        listener = asyncio.run(feed(events))
        fatal = any(e["type"] in ("error", "response.done") and FATAL_ERROR_CODES & set(map(str, _codes(e)))
                    for e in events)
        assert set(listener.failed) <= ({"upstream_error"} if fatal else set()), (events, listener.failed)

    run()


def _codes(event: dict) -> list:
    """The error code(s) an error or failed response.done carries, whatever the shape of the rest."""
    path = ["error"] if event["type"] == "error" else ["response", "status_details", "error"]
    node = event
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        return []
    return [node.get("code") or (node.get("type") if event["type"] == "error" else None)]  # as the gateway reads it
