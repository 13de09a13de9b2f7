"""Issue 4: who may talk, how often, across instances, through Redis outages, and resume."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time

import jwt
import pytest
import websockets
from rest_framework_simplejwt.tokens import RefreshToken

from tests.conftest import unique_user
from tests.live import LiveServer, VoiceClient, text_turn
from voice.models import BetaUser, VoiceProfile, VoiceRollout, VoiceSession
from voice.services.rollout import rollout_cache_clear, rollout_update
from voice.services.users import user_for_identity

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def upstream_count(monkeypatch):
    """How many upstream connections the gateway opened."""
    from voice import consumers

    opened = []
    original = consumers.make_upstream

    def counting(model=None):
        opened.append(1)
        return original(model)

    monkeypatch.setattr(consumers, "make_upstream", counting)
    return opened


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _bad_tokens(settings) -> dict[str, str]:
    now = int(time.time())
    claims = {"token_type": "access", "user_id": "mallory", "plan": "elite", "jti": "x", "exp": now + 600}
    key = settings.JWT_SIGNING_KEY
    good = jwt.encode(claims, key, algorithm="HS256")
    header, payload, _ = good.split(".")
    return {
        "garbage": "not-a-jwt",
        "bad_signature": f"{header}.{payload}.{_b64({'x': 1})}",
        "alg_none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{payload}.",
        "expired": jwt.encode({**claims, "exp": now - 10}, key, algorithm="HS256"),
        "not_yet_valid": jwt.encode({**claims, "nbf": now + 3600}, key, algorithm="HS256"),
        "refresh": str(RefreshToken.for_user(type("U", (), {"username": "mallory", "pk": 1, "id": 1})())),
        "missing_user_id": jwt.encode({k: v for k, v in claims.items() if k != "user_id"}, key, algorithm="HS256"),
        "wrong_key": jwt.encode(claims, "another-signing-key-of-sufficient-length!!", algorithm="HS256"),
        "tampered_plan": f"{header}.{_b64({**claims, 'plan': 'intelia', 'user_id': 'eve'})}.{good.split('.')[2]}",
        "huge": jwt.encode({**claims, "pad": "x" * 100_000}, key, algorithm="HS256"),
    }


async def test_every_auth_failure_is_4401_without_upstream(gateway, settings, upstream_count, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    tokens = _bad_tokens(settings)
    huge = tokens.pop("huge")
    with pytest.raises(websockets.InvalidStatus) as refused:  # over the server's request-line limit
        await VoiceClient.open(gateway.ws_url, query=f"token={huge}")
    assert refused.value.response.status_code == 400
    for name, token in [*tokens.items(), ("missing", "")]:
        client = await VoiceClient.open(gateway.ws_url, query=f"token={token}" if token else "")
        error = await client.wait_for("gateway.error")
        assert error["code"] == "unauthorized", name
        assert await client.wait_closed() == 4401, name
    # The same, through the subprotocol.
    client = await VoiceClient.open(gateway.ws_url, subprotocols=["intelia.v1", f"bearer.{tokens['expired']}"])
    assert (await client.wait_for("gateway.error"))["code"] == "unauthorized"
    assert await client.wait_closed() == 4401
    assert upstream_count == []
    assert await VoiceSession.objects.acount() == 0
    logs = caplog.text + "".join(capfd.readouterr())
    for token in tokens.values():
        if len(token) > 20:
            assert token not in logs and token.split(".")[1] not in logs


async def test_subprotocol_and_single_use_ticket(gateway, token_for) -> None:
    token = token_for()
    client = await VoiceClient.open(gateway.ws_url, subprotocols=["intelia.v1", f"bearer.{token}"])
    assert client.ws.subprotocol == "intelia.v1"  # never the token
    await client.wait_for("gateway.session.ready")
    await client.close()

    import httpx

    async with httpx.AsyncClient(base_url=gateway.http_url) as http:
        refused = await http.post("/v1/voice/ticket")
        assert refused.status_code == 401
        response = await http.post("/v1/voice/ticket", headers={"Authorization": f"Bearer {token}"})
    body = response.json()
    assert response.status_code == 200 and body["expires_in"] == 30 and token not in response.text
    await asyncio.sleep(0.3)  # the previous session's slot is released
    client = await VoiceClient.open(gateway.ws_url, query=f"ticket={body['ticket']}")
    await client.wait_for("gateway.session.ready")
    await client.close()
    again = await VoiceClient.open(gateway.ws_url, query=f"ticket={body['ticket']}")
    assert (await again.wait_for("gateway.error"))["code"] == "unauthorized"
    assert await again.wait_closed() == 4401


async def test_plan_and_rollout_decisions(gateway, token_for) -> None:
    client = await VoiceClient.open(gateway.ws_url, token=token_for(plan="essential"))
    error = await client.wait_for("gateway.error")
    assert error == {"type": "gateway.error", "code": "plan_not_allowed",
                     "message": "Voice is reserved for the Elite and Intelia plans"}
    assert await client.wait_closed() == 4403

    # No plan claim: the plan stored on the local profile decides.
    user_id = unique_user("profile")
    user = await asyncio.to_thread(user_for_identity, external_id=user_id)
    await VoiceProfile.objects.filter(user_id=user.pk).aupdate(plan_id=None)
    client = await VoiceClient.open(gateway.ws_url, token=token_for(user_id, plan=""))
    assert (await client.wait_for("gateway.error"))["code"] == "plan_not_allowed"
    from voice.models import PlanAccess

    elite = await PlanAccess.objects.aget(code="intelia")
    await VoiceProfile.objects.filter(user_id=user.pk).aupdate(plan=elite)
    await asyncio.sleep(1.1)
    client = await VoiceClient.open(gateway.ws_url, token=token_for(user_id, plan=""))
    await client.wait_for("gateway.session.ready")
    await client.close()

    # Rollout at 0 %: refused unless on the beta list.
    await asyncio.to_thread(rollout_update, actor_id=None, percentage=0)
    await asyncio.sleep(1.1)
    outsider = await VoiceClient.open(gateway.ws_url, token=token_for())
    error = await outsider.wait_for("gateway.error")
    assert error["code"] == "not_in_rollout" and error["message"] == "Feature not available for your account"
    assert await outsider.wait_closed() == 4403
    beta_id = unique_user("beta")
    beta = await asyncio.to_thread(user_for_identity, external_id=beta_id)
    rollout = await VoiceRollout.objects.aget(pk=1)
    await BetaUser.objects.acreate(rollout=rollout, user_id=beta.pk)
    await asyncio.sleep(1.1)
    client = await VoiceClient.open(gateway.ws_url, token=token_for(beta_id))
    await client.wait_for("gateway.session.ready")
    await client.close()


async def test_rate_limit_across_two_instances_and_concurrency(live_db, token_for) -> None:
    first, second = LiveServer().start(), LiveServer().start()
    try:
        user_id = unique_user("rate")
        for n in range(5):
            server = first if n % 2 == 0 else second
            client = await VoiceClient.open(server.ws_url, token=token_for(user_id))
            await client.wait_for("gateway.session.ready")
            if n == 0:  # a second connection while the first is live
                dup = await VoiceClient.open(second.ws_url, token=token_for(user_id))
                assert (await dup.wait_for("gateway.error"))["code"] == "concurrent_session"
                assert await dup.wait_closed() == 4409
            await client.close()
            await asyncio.sleep(0.3)
        for server in (first, second):
            client = await VoiceClient.open(server.ws_url, token=token_for(user_id))
            error = await client.wait_for("gateway.error")
            assert error["code"] == "rate_limited"
            assert error["message"] == "Rate limit exceeded (5 sessions/hour max)"
            assert 3000 < error["retry_after"] <= 3601
            assert await client.wait_closed() == 4429
        assert await VoiceSession.objects.filter(external_user_id=user_id).acount() == 5
    finally:
        first.stop()
        second.stop()


async def test_kill_switch_closes_sessions_on_both_instances_within_a_second(live_db, token_for) -> None:
    first, second = LiveServer().start(), LiveServer().start()
    try:
        clients = []
        for server in (first, second, first, second):
            client = await VoiceClient.open(server.ws_url, token=token_for())
            await client.wait_for("gateway.session.ready")
            clients.append(client)
        await asyncio.sleep(0.3)  # joined the broadcast group
        started = time.monotonic()
        await asyncio.to_thread(rollout_update, actor_id=None, voice_enabled=False)
        codes = await asyncio.gather(*(c.wait_closed(3) for c in clients))
        assert codes == [4503] * 4
        assert time.monotonic() - started < 1.0
        assert all(c.seen("gateway.error")[-1]["code"] == "feature_disabled" for c in clients)
        refused = await VoiceClient.open(second.ws_url, token=token_for())
        assert (await refused.wait_for("gateway.error"))["code"] == "feature_disabled"
        await asyncio.to_thread(rollout_update, actor_id=None, voice_enabled=True)
        rollout_cache_clear()
        await asyncio.sleep(1.1)
        client = await VoiceClient.open(first.ws_url, token=token_for())
        await client.wait_for("gateway.session.ready")
        await client.close()
    finally:
        first.stop()
        second.stop()


async def test_kill_switch_from_another_instance_refuses_new_sessions_at_once(gateway, token_for,
                                                                              monkeypatch) -> None:
    """The kill switch engaged on another instance (the row flipped there, its broadcast received here)
    must refuse this instance's next connection at once, not after this process's 1 s rollout cache
    expires (found by bench/multi_instance.py: a connection right after the broadcast was admitted)."""
    from channels.layers import get_channel_layer

    from voice.services import rollout
    from voice.services.rollout import BROADCAST_GROUP, rollout_snapshot

    monkeypatch.setattr(rollout, "CACHE_SECONDS", 60.0)  # no race with the cache's own expiry
    live = await VoiceClient.open(gateway.ws_url, token=token_for())
    await live.wait_for("gateway.session.ready")
    await asyncio.sleep(0.3)  # joined the broadcast group
    rollout_cache_clear()
    assert (await rollout_snapshot()).voice_enabled  # this process's cache: just read, enabled
    await VoiceRollout.objects.filter(pk=1).aupdate(voice_enabled=False)  # the other instance's write...
    await get_channel_layer().group_send(BROADCAST_GROUP, {"type": "session.terminate", "code": "feature_disabled"})
    assert await live.wait_closed(3) == 4503  # ...and its broadcast
    refused = await VoiceClient.open(gateway.ws_url, token=token_for())
    assert (await refused.wait_for("gateway.error"))["code"] == "feature_disabled"
    assert await refused.wait_closed() == 4503
    assert not refused.seen("gateway.session.ready")  # refused at admission, not admitted then cut


async def test_redis_outage_degrades_and_recovers_without_restart(live_db, own_redis, settings, token_for):
    import httpx

    settings.REDIS_URL = own_redis.url
    settings.REDIS_PROBE_INTERVAL = 0.3
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                                           "CONFIG": {"hosts": [own_redis.url]}}}
    from channels.layers import channel_layers

    channel_layers.backends.clear()
    server = LiveServer().start()

    try:
        live = await VoiceClient.open(server.ws_url, token=token_for())
        await live.wait_for("gateway.session.ready")
        fresh_clients = []
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            for _cycle in range(3):
                own_redis.stop()
                health = (await http.get("/v1/voice/health")).json()
                assert health["status"] == "degraded" and health["redis"]["using_fallback"] is True
                # New sessions are served on the fallback; the live one keeps relaying.
                fresh = await VoiceClient.open(server.ws_url, token=token_for())
                await fresh.wait_for("gateway.session.ready")
                fresh_clients.append(fresh)
                for client in (live, fresh):
                    await text_turn(client)
                own_redis.start()
                for _ in range(40):
                    await asyncio.sleep(0.25)
                    health = (await http.get("/v1/voice/health")).json()
                    if health["status"] == "healthy":
                        break
                assert health["status"] == "healthy" and health["redis"]["using_fallback"] is False
                await text_turn(live)
        # State resynchronised: the live sessions published their slots again after each restart.
        import redis.asyncio as aioredis

        r = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
        await asyncio.sleep(0.5)
        live_ids = await r.zrange("intelia_voice:active_sessions", 0, -1)
        await r.aclose()
        assert live.seen("gateway.session.ready")[0]["session_id"] in live_ids
        for client in (live, *fresh_clients):
            assert not client.seen("gateway.error"), client.seen("gateway.error")
            await client.close()
    finally:
        server.stop()
        channel_layers.backends.clear()


async def test_resume_after_server_restart_replays_conversation(live_db, token_for, engine_spy) -> None:
    server = LiveServer().start()
    port = server.port
    user_id = unique_user("resume")
    client = await VoiceClient.open(server.ws_url, token=token_for(user_id))
    ready = await client.wait_for("gateway.session.ready")
    await client.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "My flock is 12000 Ross 308 broilers"}]}})
    await client.send({"type": "response.create"})
    await client.wait_for("response.done", timeout=15)
    server.stop()  # SIGTERM-like: drain notice, then 4012
    draining = await client.wait_for("gateway.session.draining", timeout=5)
    assert await client.wait_closed() == 4012
    server = LiveServer(port=port).start()
    try:
        engine_spy.clear()
        resumed = await VoiceClient.open(server.ws_url, token=token_for(user_id),
                                         query=f"resume={draining['resume_token']}")
        again = await resumed.wait_for("gateway.session.ready")
        assert again["session_id"] == ready["session_id"] and again["resumed"] is True
        assert again["remaining_s"] <= ready["remaining_s"]
        replayed = json.dumps([e for e in engine_spy if e["type"] == "conversation.item.create"])
        assert "12000 Ross 308" in replayed
        await resumed.close()
        # Another user cannot take it over; an unknown token starts afresh.
        thief = await VoiceClient.open(server.ws_url, token=token_for(),
                                       query=f"resume={draining['resume_token']}")
        assert (await thief.wait_for("gateway.error"))["code"] == "resume_forbidden"
        assert await thief.wait_closed() == 4403
        fresh = await VoiceClient.open(server.ws_url, token=token_for(), query="resume=bogus")
        assert (await fresh.wait_for("gateway.session.ready"))["resumed"] is False
        await fresh.close()
        await asyncio.sleep(0.3)
        row = await VoiceSession.objects.aget(pk=ready["session_id"])
        assert row.connections == 2 and row.turns == 1
    finally:
        server.stop()


async def test_cross_site_origin_refused(gateway, token_for) -> None:
    with pytest.raises(websockets.InvalidStatus):
        await VoiceClient.open(gateway.ws_url, token=token_for(), origin="https://evil.example")
    client = await VoiceClient.open(gateway.ws_url, token=token_for(), origin="http://localhost:8000")
    await client.wait_for("gateway.session.ready")
    await client.close()



@pytest.mark.parametrize("redis", [True, False], ids=["redis", "memory"])
async def test_one_round_trip_admission_agrees_with_the_limits_library(settings, redis) -> None:
    """SharedState.admit reads the `limits` library's moving window inside its own script (one round trip with
    the slot), and set_json_and_hit writes it in the resume state's round trip: the verdicts must stay the
    library's, hit for hit, and after the library clears the window."""
    import uuid

    from limits import RateLimitItemPerHour

    from voice.services.state import ADMITTED, NO_SLOT, RATE_LIMITED, SharedState

    state = SharedState(settings.REDIS_URL, redis)
    item, key = RateLimitItemPerHour(3), f"sessions:admit-{uuid.uuid4().hex}"
    slots, live = f"user_sessions:admit-{uuid.uuid4().hex}", f"live-{uuid.uuid4().hex}"

    async def admit(member: str, rate=(item, key), limit: int = 100) -> str:
        return await state.admit(rate=rate, slot_key=slots, member=member, limit=limit, ttl=30, also=(live,))

    try:
        for n in range(3):
            assert (await state.rate_check(item, key))[0]
            assert await admit(f"m{n}") == ADMITTED
            if n == 1:  # the session's start as the gateway writes it: resume state and window together
                await state.set_json_and_hit(f"session:admit-{n}", {"n": n}, 60, item, key)
                assert await state.get_json(f"session:admit-{n}") == {"n": n}
            else:
                await state.rate_hit(item, key)
        assert not (await state.rate_check(item, key))[0]
        assert await admit("m3") == RATE_LIMITED
        assert "m3" not in await state.slot_members(slots)  # refused by the window: no slot taken
        assert await admit("m3", rate=None) == ADMITTED  # a resume is not counted
        assert sorted(await state.slot_members(live)) == ["m0", "m1", "m2", "m3"]
        await state.rate_clear(item, key)
        assert await admit("m4") == ADMITTED
        assert await admit("m5", limit=5) == NO_SLOT  # five slots held: m0..m4
        assert await admit("m4", limit=5) == ADMITTED  # a member already in keeps its slot
    finally:
        await state.aclose()


@pytest.mark.parametrize("redis", [True, False], ids=["redis", "memory"])
async def test_a_connections_save_never_overwrites_the_connection_that_took_its_session_over(settings, redis):
    """A resume that could not wait for the old connection to let go owns the session's resume state from
    its ready on: the old connection's later saves (a turn, its end) are dropped, its own ones kept."""
    import uuid

    from voice.services.state import SharedState

    state = SharedState(settings.REDIS_URL, redis)
    key = f"session:owned-{uuid.uuid4().hex}"

    async def save(doc: dict, owner: str) -> bool:
        return await state.set_json_unless_owned(key, doc, 60, field="live_connection", owner=owner)

    try:
        assert await save({"turns": 1, "live_connection": "old"}, "old")  # nothing stored yet
        assert await save({"turns": 2, "live_connection": "old"}, "old")  # its own
        await state.set_json(key, {"turns": 2, "live_connection": "new"}, 60)  # the resume's ready
        assert not await save({"turns": 3, "live_connection": ""}, "old")  # the old one's late end
        assert await state.get_json(key) == {"turns": 2, "live_connection": "new"}
        assert await save({"turns": 4, "live_connection": ""}, "new")  # the new one's end
        assert await save({"turns": 5, "live_connection": "newer"}, "old")  # no owner left: stored
    finally:
        await state.aclose()
