"""Issue 18 (capacity v2): redial never refused, ended sessions freed without the cyclic collector."""

from __future__ import annotations

import time

import pytest

from tests.conftest import unique_user
from tests.live import VoiceClient
from tests.live import session_with_a_turn as live_session_with_a_turn

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def slow_end_write(monkeypatch):
    """The database write at session end takes 0.5 s (on the writer thread, like a slow database)."""
    from voice.services import sessions

    original = sessions.voice_session_end

    def slow(record):
        time.sleep(0.5)
        return original(record)

    monkeypatch.setattr(sessions, "voice_session_end", slow)


@pytest.fixture
def slow_upstream_close(monkeypatch):
    """Closing the upstream takes 0.5 s (a far-away server's close handshake)."""
    import asyncio

    from voice.realtime.engine.upstream import LocalUpstream

    original = LocalUpstream.close

    async def slow(self):
        await asyncio.sleep(0.5)
        await original(self)

    monkeypatch.setattr(LocalUpstream, "close", slow)


@pytest.mark.parametrize("slow", [None, "slow_end_write", "slow_upstream_close"])
async def test_a_user_who_redials_at_once_is_never_refused(gateway, token_for, settings, request, slow) -> None:
    """Close and reconnect at once, again and again: the slot is back before anything slow at session end."""
    settings.MAX_SESSIONS_PER_USER_PER_HOUR = 1000
    if slow:
        request.getfixturevalue(slow)
    user_id = unique_user("redial")
    codes = []
    for _ in range(15):
        client = await VoiceClient.open(gateway.ws_url, token=token_for(user_id))
        event = await client.next_event(30)
        while event["type"] not in ("gateway.session.ready", "gateway.error"):
            event = await client.next_event(30)
        codes.append(event.get("code", "ready"))
        await client.close()  # and at once the next connection: no pause for the server's end-of-session work
    assert codes == ["ready"] * 15


SESSION_TYPES = frozenset({"VoiceConsumer", "GatewaySession", "SessionStats", "TurnStats", "LocalUpstream",
                           "OpenAIUpstream", "_Listener", "EngineSession", "ContextPrefetcher",
                           "VoiceWebSocketProtocol", "Inbox"})


@pytest.mark.parametrize("upstream", ["in_process", "websocket"])
async def test_ended_sessions_are_freed_without_the_cyclic_collector(live_db, token_for, settings, request,
                                                                     upstream) -> None:
    """With the collector off, sessions that ran a turn and ended (cleanly or abruptly) are freed by reference
    counting alone: their consumer, session and upstream die, and a collection afterwards finds none of the
    session's objects (it found ~300 objects per ended session, consumer to transports, before)."""
    import asyncio
    import collections
    import gc
    import weakref

    from tests.live import LiveServer
    from voice import metrics
    from voice.realtime import registry

    if upstream == "websocket":  # the production path: picows client, fast paths both ways
        request.getfixturevalue("websocket_engine")
    server = LiveServer().start()

    async def session_with_a_turn() -> VoiceClient:
        return await live_session_with_a_turn(server.ws_url, token_for())

    async def live_objects() -> list[object]:
        return [obj for consumer in registry.live_sessions()
                for obj in (consumer, consumer.session, consumer.session.upstream)]

    async def idle() -> None:
        for _ in range(200):
            if metrics.ACTIVE_SESSIONS._value.get() == 0:
                return
            await asyncio.sleep(0.05)

    try:
        await (await session_with_a_turn()).close()  # warm-up: process-wide pools, caches, the control channel
        await idle()
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            clients = [await session_with_a_turn() for _ in range(4)]
            refs = [weakref.ref(obj) for obj in server.call(live_objects())]
            assert len(refs) == 12
            for client in clients[:2]:
                await client.close()
            for client in clients[2:]:
                client.ws.transport.abort()  # abrupt disconnect: no close handshake
            await idle()
            for _ in range(100):  # the end's last steps (rows, logs) finish on the server's loop
                if all(ref() is None for ref in refs):
                    break
                await asyncio.sleep(0.05)
            alive = [ref() for ref in refs if ref() is not None]
            assert alive == [], f"kept alive without a collection: {_holders(alive)}"
            gc.collect()
            leftovers = collections.Counter(type(o).__name__ for o in gc.garbage
                                            if type(o).__name__ in SESSION_TYPES)
            assert not leftovers, leftovers
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    finally:
        server.stop()


def _holders(alive: list[object], depth: int = 4) -> str:
    """What keeps each of `alive` alive: its referrers, theirs, and so on (frames by function and line), and
    whether a collection would have found it (a cycle) or not (something live holds it)."""
    import gc
    import types

    def describe(obj: object) -> str:
        if isinstance(obj, types.FrameType):
            return f"frame {obj.f_code.co_name} ({obj.f_code.co_filename.rsplit('/', 2)[-1]}:{obj.f_lineno})"
        if isinstance(obj, dict):
            return "dict(" + ",".join(map(str, list(obj)[:8])) + ")"
        return type(obj).__qualname__

    lines: list[str] = []
    seen = {id(alive)}

    def walk(obj: object, level: int) -> None:
        if level > depth or len(lines) >= 120:
            return
        for referrer in gc.get_referrers(obj):
            if id(referrer) in seen or (isinstance(referrer, types.FrameType) and referrer.f_code.co_name in (
                    "walk", "_holders")):
                continue
            seen.add(id(referrer))
            lines.append("  " * level + "<- " + describe(referrer))
            walk(referrer, level + 1)

    for obj in alive:
        state = {name: getattr(obj, name, None) for name in ("session_id", "_ended", "_finished")}
        lines.append(f"{type(obj).__name__} {state}")
        walk(obj, 1)
    garbage_before = len(gc.garbage)
    gc.collect()
    found = {id(o) for o in gc.garbage[garbage_before:]}
    lines.append("in a cycle (found by a collection): " + str([id(o) in found for o in alive]))
    return "\n".join(lines[:120])


async def test_turn_rows_reach_the_writer_without_the_loop_waiting(monkeypatch) -> None:
    """Per turn the loop only queues the rows (no task, no executor future): with the writer thread stuck,
    every put returns at once; the queued turns of several sessions are written by at most two drains and
    marked saved on the loop afterwards."""
    import asyncio
    import threading

    from voice.realtime.accounting import SessionStats, TurnStats
    from voice.services import sessions

    gate = threading.Event()
    written: list[str] = []
    submits: list[object] = []
    real_submit = sessions.submit_write

    def stuck_save(*, session_id: str, rows: list) -> bool:
        gate.wait(10)
        written.append(session_id)
        return True

    monkeypatch.setattr(sessions, "voice_turns_save", stuck_save)
    monkeypatch.setattr(sessions, "submit_write", lambda fn, *a: submits.append(fn) or real_submit(fn, *a))
    tasks_before = len(asyncio.all_tasks())
    stats = []
    for i in range(3):
        session_stats = SessionStats()
        session_stats.turn_changed(TurnStats(index=0))
        stats.append(session_stats)
        sessions.turn_rows_put(session_id=f"s{i}", stats=session_stats)
    assert written == [] and len(asyncio.all_tasks()) == tasks_before  # queued, nothing awaited or spawned
    gate.set()
    for _ in range(200):
        if not any(s.unsaved_turns for s in stats):
            break
        await asyncio.sleep(0.02)
    assert sorted(written) == ["s0", "s1", "s2"]
    assert not any(s.unsaved_turns for s in stats)
    assert 1 <= len(submits) <= 2


async def test_the_admission_gate_is_given_back_on_every_path(gateway, token_for, settings) -> None:
    """One admission at a time: refused, failed and abandoned connections all let the next one in, and the
    gate holds nothing once they are over."""
    import asyncio

    from voice.realtime.admission import admission_gate

    settings.VOICE_ADMISSION_CONCURRENCY = 1
    settings.MAX_SESSIONS_PER_USER_PER_HOUR = 1000
    phases_before = _admission_phase_counts()
    refused = await VoiceClient.open(gateway.ws_url, token="not-a-jwt")
    assert (await refused.wait_for("gateway.error"))["code"] == "unauthorized"
    plan_refused = await VoiceClient.open(gateway.ws_url, token=token_for(plan="essential"))
    assert (await plan_refused.wait_for("gateway.error"))["code"] == "plan_not_allowed"
    abandoned = await VoiceClient.open(gateway.ws_url, token=token_for())
    abandoned.ws.transport.abort()  # gone before its session is ready
    clients = await asyncio.gather(*(VoiceClient.open(gateway.ws_url, token=token_for()) for _ in range(4)))
    for client in clients:  # admitted one after another
        await client.wait_for("gateway.session.ready", timeout=30)
    for client in clients:
        await client.close()
    await asyncio.sleep(0.5)
    gate = gateway.call(_gate_value(admission_gate))
    assert gate == 1
    # Every step of the 4 admissions is timed (voice_admission_phase_seconds), the refused ones' are not.
    counts = _admission_phase_counts()
    assert {phase: counts[phase] - phases_before[phase] for phase in counts} == dict.fromkeys(counts, 4)


async def _gate_value(admission_gate) -> int:
    return admission_gate()._value


def _admission_phase_counts() -> dict[str, float]:
    from voice.metrics import ADMISSION_PHASE
    from voice.realtime.admission import ADMISSION_PHASES

    samples = {(s.name, s.labels.get("phase")): s.value for m in ADMISSION_PHASE.collect() for s in m.samples}
    return {phase: samples.get(("voice_admission_phase_seconds_count", phase), 0.0) for phase in ADMISSION_PHASES}


async def test_sessions_admitted_together_each_get_their_own_terminate(gateway, token_for) -> None:
    """One control channel per process: sessions that join it at the same moment all receive the messages
    addressed to them (and only those)."""
    import asyncio

    from voice.services.rollout import broadcast_terminate

    clients = await asyncio.gather(*(VoiceClient.open(gateway.ws_url, token=token_for()) for _ in range(4)))
    ids = [(await c.wait_for("gateway.session.ready", timeout=30))["session_id"] for c in clients]
    await asyncio.sleep(0.5)  # presence published: joined the control channel's groups
    assert await asyncio.to_thread(broadcast_terminate, code="terminated", session_id=ids[0])
    assert await clients[0].wait_closed(5) == 4010
    await asyncio.sleep(0.3)
    assert all(not c.seen("gateway.error") for c in clients[1:])  # the others are untouched
    for session_id in ids[1:]:
        assert await asyncio.to_thread(broadcast_terminate, code="terminated", session_id=session_id)
    assert await asyncio.gather(*(c.wait_closed(5) for c in clients[1:])) == [4010] * 3


async def test_a_terminate_reaches_the_session_on_whichever_instance_holds_it(gateway, token_for) -> None:
    """Sessions join no group of their own (two Redis round trips per admission): an operator's terminate
    goes to every instance, and only the one holding the session ends it. The other instance is a real
    process (channels_redis shares one receive buffer among the event loops of a process)."""
    import asyncio

    from tests.conftest import free_port
    from tests.test_drain import start_gateway_process
    from voice.services.rollout import broadcast_terminate

    port = free_port()
    proc = start_gateway_process(port)
    try:
        other_url = f"ws://127.0.0.1:{port}/v1/ws/voice"
        clients = [await VoiceClient.open(url, token=token_for()) for url in (gateway.ws_url, other_url, other_url)]
        ids = [(await c.wait_for("gateway.session.ready", timeout=30))["session_id"] for c in clients]
        await asyncio.sleep(0.5)  # both processes joined the broadcast group
        for target in (1, 0):
            assert await asyncio.to_thread(broadcast_terminate, code="terminated", session_id=ids[target])
            assert await clients[target].wait_closed(5) == 4010
        await asyncio.sleep(0.3)
        assert not clients[2].seen("gateway.error")  # the other session of that instance is untouched
        await clients[2].close()
    finally:
        proc.terminate()
        proc.wait(20)


async def test_a_redial_to_another_instance_is_not_refused(live_db, token_for, settings, monkeypatch) -> None:
    """Hang up on one instance and redial at once through the load balancer to the other: the first
    instance's slot release may still be in flight (here it takes 0.15 s); the second retries briefly
    instead of refusing."""
    import asyncio

    from tests.live import LiveServer
    from voice.services import access

    release = access._release_slots

    async def slow_release(*args):
        await asyncio.sleep(0.15)
        await release(*args)

    monkeypatch.setattr(access, "_release_slots", slow_release)
    settings.MAX_SESSIONS_PER_USER_PER_HOUR = 1000
    first, second = LiveServer().start(), LiveServer().start()
    try:
        user_id = unique_user("redial-lb")
        codes = []
        for n in range(10):
            server = first if n % 2 == 0 else second
            client = await VoiceClient.open(server.ws_url, token=token_for(user_id))
            event = await client.next_event(30)
            while event["type"] not in ("gateway.session.ready", "gateway.error"):
                event = await client.next_event(30)
            codes.append(event.get("code", "ready"))
            await client.close()
        assert codes == ["ready"] * 10
    finally:
        first.stop()
        second.stop()


@pytest.mark.parametrize("token", ["", "scrape-secret-123"])
async def test_the_first_http_request_is_made_at_start_up(settings, token) -> None:
    """The one-off work of a process's first request (URLconf, Sentry's patches and module scan) runs before
    the server accepts anything, not on the loop of live sessions."""
    from django.urls import clear_url_caches, get_resolver

    from intelia_voice.asgi import application
    from voice.server import first_request_warm_up

    settings.METRICS_TOKEN = token
    clear_url_caches()
    assert "url_patterns" not in vars(get_resolver())
    assert await first_request_warm_up(application, token=token) == 200  # through every middleware to the view
    assert "url_patterns" in vars(get_resolver())  # the URLconf was loaded by it


async def test_concurrent_admissions_share_one_identity_lookup(monkeypatch) -> None:
    """The identities of admissions waiting for the database thread are resolved in one job (one query);
    each admission gets its own user, and one identity's failure is only its own."""
    import asyncio

    from voice.services import access, users
    from voice.services.auth import Identity

    jobs: list[int] = []
    resolve_identities = access._resolve_identities

    def counted(identities):
        jobs.append(len(identities))
        return resolve_identities(identities)

    local_user = users._local_user

    def failing_for_one(row, *, external_id, email, plan):
        if external_id.startswith("broken"):
            raise ValueError("a profile this test breaks")
        return local_user(row, external_id=external_id, email=email, plan=plan)

    monkeypatch.setattr(access, "_resolve_identities", counted)
    monkeypatch.setattr(users, "_local_user", failing_for_one)
    identities = [Identity(user_id=unique_user("batch"), plan="elite") for _ in range(11)]
    identities.insert(5, Identity(user_id=unique_user("broken"), plan="elite"))
    lookups = access.IdentityLookups()
    results = await asyncio.gather(*(lookups.resolve(identity) for identity in identities), return_exceptions=True)
    assert jobs == [12]
    assert isinstance(results[5], ValueError)
    assert [user.external_id for user, _ in results[:5] + results[6:]] == [
        identity.user_id for identity in identities[:5] + identities[6:]]
    assert all(plans is results[0][1] for _, plans in results[:5] + results[6:])  # one plans read per batch
    # Later admissions start a new job (the first is done), known users now: no new rows.
    again = await lookups.resolve(identities[0])
    assert again[0].pk == results[0][0].pk and jobs == [12, 1]


async def test_new_connections_are_read_a_few_per_loop_turn() -> None:
    """A burst of first requests is handled (parsed, handshaken, started) at most VOICE_HANDSHAKES_PER_TURN
    per turn of the loop, in arrival order, so live frames are read between batches; a connection closed
    while waiting is skipped."""
    import asyncio

    from voice.handshake_pacing import HandshakePacer

    class Connection:
        def __init__(self) -> None:
            self.handled, self.closing = False, False
            self.transport = self

        def is_closing(self) -> bool:
            return self.closing

        def handshake(self) -> None:
            self.handled = True

    pacer = HandshakePacer(per_turn=8)
    connections = [Connection() for _ in range(20)]
    connections[3].closing = True
    for connection in connections:
        pacer.admit(connection)
    handled_after_each_turn = []
    for _ in range(4):
        await asyncio.sleep(0)
        handled_after_each_turn.append([n for n, c in enumerate(connections) if c.handled])
    assert [len(handled) for handled in handled_after_each_turn] == [7, 15, 19, 19]
    assert handled_after_each_turn[0] == [0, 1, 2, 4, 5, 6, 7]  # first come, first handled
    pacer.admit(late := Connection())  # alone: handled in the next turn
    await asyncio.sleep(0)
    assert late.handled


async def test_upgrade_requests_arriving_together_are_handled_a_few_per_loop_turn(settings) -> None:
    """Clients connect one by one, then send their upgrade requests within the same milliseconds (a storm):
    the requests, not the accepts, are what the pacer spreads (pacing the accepts let all 250 requests be
    handled in one turn, a 40-60 ms stall: bench/handshake_burst.py). On a real uvicorn with the voice
    protocols, no loop turn handles more than VOICE_HANDSHAKES_PER_TURN upgrades."""
    import asyncio
    import socket
    import threading

    import uvicorn

    from tests.test_server_ws import upgrade_request
    from voice import handshake_pacing
    from voice.handshake_pacing import PacedH11Protocol
    from voice.server_ws import VoiceWebSocketProtocol

    async def app(scope, receive, send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            pass

    handshake_pacing._pacers.clear()
    settings.VOICE_HANDSHAKES_PER_TURN = 8
    loop = asyncio.get_running_loop()
    turn = [0]
    upgrades_by_turn: dict[int, int] = {}

    def tick() -> None:  # runs once per turn of the loop
        turn[0] += 1
        if not stop.is_set():
            loop.call_soon(tick)

    class Counted(PacedH11Protocol):
        def handle_websocket_upgrade(self, event) -> None:
            upgrades_by_turn[turn[0]] = upgrades_by_turn.get(turn[0], 0) + 1
            super().handle_websocket_upgrade(event)

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, http=Counted, ws=VoiceWebSocketProtocol, lifespan="off",
                                           log_level="warning", ws_ping_interval=None, backlog=1024))
    serving = loop.create_task(server.serve(sockets=[listener]))
    stop = threading.Event()
    clients: list[socket.socket] = []
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        for _ in range(250):
            clients.append(socket.create_connection(("127.0.0.1", port)))
        await asyncio.sleep(0.2)  # every connection accepted before any request arrives
        loop.call_soon(tick)
        requests = [(client, upgrade_request("/")) for client in clients]
        await asyncio.to_thread(lambda: [client.sendall(request) for client, request in requests])
        for _ in range(200):
            if sum(upgrades_by_turn.values()) == 250:
                break
            await asyncio.sleep(0.02)
        assert sum(upgrades_by_turn.values()) == 250
        assert max(upgrades_by_turn.values()) <= 8, upgrades_by_turn
    finally:
        stop.set()
        for client in clients:
            client.close()
        server.should_exit = True
        await serving
        handshake_pacing._pacers.clear()


async def test_a_burst_of_connections_is_admitted_through_a_pacer_of_one(gateway, token_for, settings) -> None:
    """Paced one handshake per turn, a burst still gets every connection ready, and the admission's handshake
    phase is timed from the socket's accept (the pacer's wait included)."""
    import asyncio

    from voice import handshake_pacing

    handshake_pacing._pacers.clear()
    settings.VOICE_HANDSHAKES_PER_TURN = 1
    try:
        before = _admission_phase_counts()
        clients = await asyncio.gather(*(VoiceClient.open(gateway.ws_url, token=token_for()) for _ in range(12)))
        readies = await asyncio.gather(*(c.wait_for("gateway.session.ready", timeout=30) for c in clients))
        assert len({r["session_id"] for r in readies}) == 12
        for _ in range(40):  # the server observes an admission's phases just after sending its ready
            if _admission_phase_counts()["handshake"] - before["handshake"] >= 12:
                break
            await asyncio.sleep(0.05)
        assert _admission_phase_counts()["handshake"] - before["handshake"] == 12
        await asyncio.gather(*(c.close() for c in clients))
    finally:
        handshake_pacing._pacers.clear()
