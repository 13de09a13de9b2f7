"""Issue 19 (1): Redis Sentinel. Real redis-server processes: one master, one replica, three sentinels.

The gateway (a real uvicorn server, tests/live.py) reaches Redis only through the sentinels, for its
shared state and its channel layer. A failover must be a short blip: sessions keep relaying on the
in-memory fallback, then the instance returns to the promoted replica by itself, where rate limits and
slots continue; health shows the new master and the switch; every session row is written.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from io import StringIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.core.management import call_command

from deploy.processes import SentinelCluster
from tests.conftest import unique_user
from tests.live import LiveServer, VoiceClient, text_turn
from voice.models import VoiceSession
from voice.services.redis_sentinel import channel_layer_host, sentinel_config

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

MASTER_PASSWORD, SENTINEL_PASSWORD = "topsecret-master", "hunter2-sentinel"  # secret-scanned (tests/secret_scan.py)


@pytest.fixture
def sentinel_cluster():
    reason = SentinelCluster.available()
    if reason:
        pytest.skip(reason)
    # A master is declared down after 2.5 s: sessions opened right after the kill meet the gap for certain.
    cluster = SentinelCluster(Path(tempfile.mkdtemp(prefix="sentinel-test-")), master_password=MASTER_PASSWORD,
                              sentinel_password=SENTINEL_PASSWORD, down_after_ms=2500)
    try:
        cluster.start()
    except RuntimeError as exc:
        cluster.stop()
        shutil.rmtree(cluster.dir, ignore_errors=True)
        pytest.skip(f"redis-server --sentinel cannot run here: {exc}")
    yield cluster
    cluster.stop()
    shutil.rmtree(cluster.dir, ignore_errors=True)


@pytest.fixture
def sentinel_gateway(sentinel_cluster, live_db, settings):
    """A live gateway whose shared state and channel layer reach Redis only through the sentinels."""
    from channels.layers import channel_layers

    config = sentinel_config(sentinel_cluster.sentinel_list.split(","), sentinel_cluster.master_name,
                             sentinel_password=SENTINEL_PASSWORD, master_password=MASTER_PASSWORD)
    settings.REDIS_SENTINEL = config
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # unused in sentinel mode: a wrong address proves it
    settings.REDIS_PROBE_INTERVAL = 0.3
    settings.MAX_SESSIONS_PER_USER_PER_HOUR = 3
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                                           "CONFIG": {"hosts": [channel_layer_host(config, 0.5)],
                                                      "prefix": "intelia_voice"}}}
    channel_layers.backends.clear()
    server = LiveServer().start()
    yield server
    server.stop()
    channel_layers.backends.clear()


async def health(server: LiveServer) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        response = await http.get("/v1/voice/health")
    assert MASTER_PASSWORD not in response.text and SENTINEL_PASSWORD not in response.text
    return response.json()


async def wait_health(server: LiveServer, master_port: int, timeout: float = 30) -> dict[str, Any]:
    """Until health is healthy on Redis (no fallback) with the sentinels' master at `master_port`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        report = await health(server)
        redis = report["redis"]
        if (report["status"] == "healthy" and not redis["using_fallback"]
                and redis["redis_master"] == f"127.0.0.1:{master_port}"):
            return report
        assert loop.time() < deadline, f"health never showed master {master_port}: {redis}"
        await asyncio.sleep(0.2)


async def attempt(server: LiveServer, token: str) -> dict[str, Any]:
    """Open a session and close it: the first decisive event (ready, or the refusal)."""
    client = await VoiceClient.open(server.ws_url, token=token)
    event = await client.next_event(20)
    while event["type"] not in ("gateway.session.ready", "gateway.error"):
        event = await client.next_event(20)
    await client.close()
    return event


async def use_up_hourly_sessions(server: LiveServer, token: str, count: int) -> None:
    for _ in range(count):
        for _retry in range(40):  # the previous session's slot is released just after its close
            event = await attempt(server, token)
            if event.get("code") != "concurrent_session":
                break
            await asyncio.sleep(0.25)
        assert event["type"] == "gateway.session.ready", event


async def rows_written(ids: list[str], turns: int) -> list[VoiceSession]:
    for _ in range(150):
        rows = [r async for r in VoiceSession.objects.filter(pk__in=ids, end_reason="client_closed")]
        if len(rows) == len(ids) and all(r.turns >= turns for r in rows):
            return rows
        await asyncio.sleep(0.1)
    return rows


async def test_master_killed_with_20_live_sessions_fails_over_without_a_stuck_instance(
        sentinel_cluster, sentinel_gateway, token_for, settings, caplog) -> None:
    server, cluster = sentinel_gateway, sentinel_cluster
    old_master = cluster.master_port()
    before = await health(server)
    assert before["status"] == "healthy" and before["redis"]["redis_mode"] == "sentinel"
    assert before["redis"]["redis_master"] == f"127.0.0.1:{old_master}"
    assert before["redis"]["master_switches"] == []

    users = [unique_user(f"ha{i}") for i in range(20)]
    clients = await asyncio.gather(*(VoiceClient.open(server.ws_url, token=token_for(u)) for u in users))
    readies = await asyncio.gather(*(c.wait_for("gateway.session.ready", timeout=30) for c in clients))
    ids = [r["session_id"] for r in readies]
    await asyncio.gather(*(text_turn(c) for c in clients))
    limited = token_for(unique_user("ha-limit"))
    await use_up_hourly_sessions(server, limited, settings.MAX_SESSIONS_PER_USER_PER_HOUR)
    assert await asyncio.to_thread(cluster.wait_replicated) >= 1  # replication is asynchronous: let it catch up

    killed = await asyncio.to_thread(cluster.kill_master)
    # The gap: until the sentinels promote the replica, sessions keep relaying and new ones are admitted,
    # on the in-memory fallback.
    fresh = await asyncio.gather(*(VoiceClient.open(server.ws_url, token=token_for()) for _ in range(3)))
    fresh_ids = [(await c.wait_for("gateway.session.ready", timeout=30))["session_id"] for c in fresh]
    await asyncio.gather(*(text_turn(c) for c in [*clients, *fresh]))
    assert "serving from the in-memory fallback" in caplog.text

    new_master = await asyncio.to_thread(cluster.wait_promoted, killed)
    after = await wait_health(server, new_master)  # back on Redis by itself, on the promoted replica
    switch = after["redis"]["master_switches"][-1]
    assert (switch["from"], switch["to"]) == (f"127.0.0.1:{killed}", f"127.0.0.1:{new_master}")
    await asyncio.gather(*(text_turn(c) for c in [*clients, *fresh]))

    # Rate limits continue on the promoted replica: the window filled on the old master is still full.
    refused = await attempt(server, limited)
    assert refused["code"] == "rate_limited", refused
    # Slots continue: the live sessions re-published theirs; a second session of a live user is refused.
    second = await attempt(server, token_for(users[0]))
    assert second["code"] == "concurrent_session", second
    with cluster.data_client(new_master) as redis:
        live = set(await asyncio.to_thread(redis.zrange, "intelia_voice:active_sessions", 0, -1))
    assert set(ids) | set(fresh_ids) <= live  # including the sessions admitted during the gap
    # The channel layer follows the new master too: an operator's terminate reaches one session.
    from channels.layers import get_channel_layer

    from voice.services.rollout import BROADCAST_GROUP

    for _ in range(60):  # the process re-joins the broadcast group once the state is back on Redis
        # As voice.services.rollout.broadcast_terminate sends it: to every instance, naming its session.
        await get_channel_layer().group_send(BROADCAST_GROUP, {
            "type": "session.terminate", "code": "terminated", "session_id": ids[-1]})
        try:
            await clients[-1].wait_for("gateway.error", timeout=0.5, code="terminated")
            break
        except TimeoutError:
            continue
    assert await clients[-1].wait_closed(10) == 4010

    for client in [*clients[:-1], *fresh]:
        assert not client.seen("gateway.error"), client.seen("gateway.error")
        await client.close()
    rows = await rows_written([*ids[:-1], *fresh_ids], turns=2)
    assert len(rows) == 22 and all(r.turns >= 2 for r in rows)  # nothing lost: every row, every turn
    assert all(r.turns == 3 for r in rows if str(r.pk) in ids)
    assert not list(Path(settings.METRICS_SPOOL_DIR).glob("*.json"))
    assert (await attempt(server, token_for()))["type"] == "gateway.session.ready"
    assert not (await health(server))["redis"]["using_fallback"]


async def test_a_demoted_master_with_open_connections_is_left_for_the_new_one(
        sentinel_cluster, sentinel_gateway, token_for) -> None:
    """A manual failover (SENTINEL FAILOVER) keeps the old master running, demoted to a replica of the new
    one: it still answers reads and PING and refuses writes (READONLY). The instance must end up writing to
    the new master, and its live sessions' slots with it, while one of the three sentinels is down."""
    server, cluster = sentinel_gateway, sentinel_cluster
    old_master = cluster.master_port()
    clients = [await VoiceClient.open(server.ws_url, token=token_for()) for _ in range(3)]
    readies = [await c.wait_for("gateway.session.ready", timeout=30) for c in clients]
    await asyncio.gather(*(text_turn(c) for c in clients))
    # The first sentinel of the gateway's list is gone too: it must be skipped at once, not retried.
    await asyncio.to_thread(cluster.sentinels[0].stop, 5)
    with cluster._client(cluster.sentinel_ports[1], SENTINEL_PASSWORD) as sentinel:
        assert await asyncio.to_thread(sentinel.execute_command, "SENTINEL", "FAILOVER", cluster.master_name)
    new_master = await asyncio.to_thread(cluster.wait_promoted, old_master)
    await asyncio.gather(*(text_turn(c) for c in clients))
    for _ in range(3):  # writes (tickets, slots) find their way to the new master
        fresh = await attempt(server, token_for())
        assert fresh["type"] == "gateway.session.ready", fresh
    report = await wait_health(server, new_master)
    assert report["redis"]["master_switches"][-1]["to"] == f"127.0.0.1:{new_master}"
    with cluster.data_client(new_master) as redis:
        live = set(await asyncio.to_thread(redis.zrange, "intelia_voice:active_sessions", 0, -1))
    assert {r["session_id"] for r in readies} <= live
    for client in clients:
        assert not client.seen("gateway.error"), json.dumps(client.seen("gateway.error"))
        await client.close()
    out = StringIO()  # the operators' check names the master too, without a password
    await asyncio.to_thread(call_command, "voice_health", stdout=out, stderr=StringIO())
    assert f"master 127.0.0.1:{new_master}" in out.getvalue()
    assert MASTER_PASSWORD not in out.getvalue() and SENTINEL_PASSWORD not in out.getvalue()


async def test_master_pool_drops_connections_left_on_a_former_master_and_records_one_switch(own_redis) -> None:
    """Narrow unit: the pool's two rules, with a stand-in for the sentinels (the real ones are above)."""
    from redis.asyncio.sentinel import Sentinel

    from voice.services.redis_sentinel import MasterPool

    class Sentinels(Sentinel):
        def __init__(self) -> None:
            super().__init__([])
            self.master = ("127.0.0.1", own_redis.port)

        async def discover_master(self, service_name: str) -> tuple[str, int]:
            await asyncio.sleep(0)  # concurrent connects interleave here
            return self.master

    sentinels = Sentinels()
    pool = MasterPool("voice", sentinels, max_connections=8, timeout=1)
    kept = await pool.get_connection()
    await pool.release(kept)
    assert kept.is_connected  # on the current master: kept for reuse
    held = [await pool.get_connection() for _ in range(3)]  # in use when the master changes
    assert all(c.is_connected and c.port == own_redis.port for c in held)
    sentinels.master = ("127.0.0.1", 1)  # another master named (not reachable: only the address matters)
    await asyncio.gather(*(pool.get_master_address() for _ in range(5)))
    assert [(s["from"], s["to"]) for s in pool.switches] == [(f"127.0.0.1:{own_redis.port}", "127.0.0.1:1")]
    for connection in held:
        await pool.release(connection)
    assert not any(c.is_connected for c in held)  # none goes back to the pool pointing at the former master
    await pool.aclose()


def test_sentinel_settings_parse_and_build_the_channel_layer_pool() -> None:
    from channels_redis.utils import create_pool
    from redis.asyncio.sentinel import SentinelConnectionPool

    assert sentinel_config([], "voice") is None  # no sentinels: REDIS_URL mode
    config = sentinel_config(["10.0.2.1:26380", " [::1]:26381", "sentinel-3", ""], "voice",
                             sentinel_password=SENTINEL_PASSWORD, master_password=MASTER_PASSWORD, db=2)
    assert config.sentinels == (("10.0.2.1", 26380), ("::1", 26381), ("sentinel-3", 26379))
    assert config.describe() == "sentinel://10.0.2.1:26380,[::1]:26381,sentinel-3:26379/voice/2"
    assert MASTER_PASSWORD not in repr(config) and SENTINEL_PASSWORD not in repr(config)
    pool = create_pool(channel_layer_host(config, 0.5))  # exactly what channels-redis does with the entry
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "voice"
    assert pool.connection_kwargs["password"] == MASTER_PASSWORD and pool.connection_kwargs["db"] == 2
    assert "socket_timeout" not in pool.connection_kwargs  # the layer's receive blocks for seconds
    sentinel = pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs
    assert sentinel["password"] == SENTINEL_PASSWORD and sentinel["retry"].get_retries() == 0


async def test_a_write_refused_by_a_demoted_master_is_a_blip_then_the_new_master_takes_it(own_redis, settings):
    """READONLY, deterministically: the named master (a real redis-server) turns replica under an open
    connection while the sentinels (a stand-in) name another real server; the next write falls back, the
    probe moves the state to the new master by itself."""
    import redis.asyncio as aioredis

    from tests.conftest import RedisProcess
    from voice.services.state import SharedState

    settings.REDIS_PROBE_INTERVAL = 0.1
    new = RedisProcess()
    new.start()
    named = {"address": ("127.0.0.1", own_redis.port)}

    async def discover_master(service_name: str) -> tuple[str, int]:
        return named["address"]

    state = SharedState("", True, sentinel_config(["127.0.0.1:1"], "voice"))
    state.client.connection_pool.sentinel_manager.discover_master = discover_master
    old_direct = aioredis.Redis(port=own_redis.port, decode_responses=True)
    new_direct = aioredis.Redis(port=new.port, decode_responses=True)
    try:
        await state.set_json("ha-key", 1, 30)
        assert await old_direct.get("intelia_voice:ha-key") == "1" and not state.using_fallback
        await old_direct.execute_command("REPLICAOF", "127.0.0.1", str(new.port))  # demoted, connection kept
        named["address"] = ("127.0.0.1", new.port)
        await state.set_json("ha-key", 2, 30)  # READONLY on the kept connection: served from memory
        assert state.using_fallback and await state.get_json("ha-key") == 2
        for _ in range(100):
            if not state.using_fallback:
                break
            await asyncio.sleep(0.05)
        assert not state.using_fallback  # the probe found the new master by itself
        await state.set_json("ha-key", 3, 30)
        assert await new_direct.get("intelia_voice:ha-key") == "3"
        assert [(s["from"], s["to"]) for s in state.describe()["master_switches"]] == [
            (f"127.0.0.1:{own_redis.port}", f"127.0.0.1:{new.port}")]
    finally:
        await state.aclose()
        await old_direct.aclose()
        await new_direct.aclose()
        new.stop()
