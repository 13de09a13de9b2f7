"""Prometheus /metrics: exposition and protection (bearer token, else allowed networks)."""

from __future__ import annotations

import pytest

from voice import metrics

pytestmark = pytest.mark.django_db


def test_exposition_from_an_allowed_network(client, settings):
    settings.METRICS_TOKEN = ""
    settings.METRICS_ALLOWED_NETWORKS = ["127.0.0.1/32", "::1/128"]
    metrics.record_refusal("rate_limited")
    response = client.get("/metrics")  # the test client's REMOTE_ADDR is 127.0.0.1
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    body = response.content.decode()
    assert "voice_active_sessions" in body
    assert 'voice_refusals_total{code="rate_limited"}' in body
    assert "voice_redis_fallback 0.0" in body  # refreshed at scrape time from the shared state
    assert "voice_first_audio_seconds_bucket" in body


def test_refused_outside_the_allowed_networks(client, settings):
    settings.METRICS_TOKEN = ""
    settings.METRICS_ALLOWED_NETWORKS = ["10.0.0.0/8"]
    assert client.get("/metrics").status_code == 403
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="not-an-ip").status_code == 403
    settings.METRICS_ALLOWED_NETWORKS = ["garbage", "10.0.0.0/8"]
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 200


def test_token_required_when_configured(client, settings):
    settings.METRICS_TOKEN = "scrape-secret-123"
    settings.METRICS_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    assert client.get("/metrics").status_code == 403  # the network alone is not enough any more
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION="Basic scrape-secret-123").status_code == 403
    ok = client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-secret-123", REMOTE_ADDR="192.0.2.7")
    assert ok.status_code == 200
    assert b"voice_sessions_total" in ok.content or b"voice_active_sessions" in ok.content


def test_post_not_allowed(client, settings):
    settings.METRICS_TOKEN = ""
    assert client.post("/metrics").status_code == 405


def _histogram_count(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(f"{name}_count", labels) or 0.0


def test_gc_pauses_are_timed() -> None:
    import gc

    from voice.server import watch_gc_pauses

    before = _histogram_count("voice_gc_pause_seconds", generation="2")
    callback = watch_gc_pauses()
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(callback)
    assert _histogram_count("voice_gc_pause_seconds", generation="2") == before + 1


async def test_event_loop_stalls_are_measured_and_logged(caplog) -> None:
    import asyncio
    import time

    from voice.server import probe_loop_lag

    before = _histogram_count("voice_event_loop_lag_seconds")
    probe = asyncio.get_running_loop().create_task(probe_loop_lag())
    await asyncio.sleep(0.05)
    time.sleep(0.06)  # a blocking call: every session's audio would wait this long
    await asyncio.sleep(0.05)
    probe.cancel()
    assert _histogram_count("voice_event_loop_lag_seconds") > before + 3
    assert any("event loop stalled" in r.getMessage() for r in caplog.records)


async def test_free_heap_pages_go_back_to_the_os_only_when_idle(settings, monkeypatch) -> None:
    """Few-KB objects (audio frames, deltas) live in glibc's heap, which only ever returns its top:
    malloc_trim hands back free pages from anywhere in it, but stalls the loop's allocations while it walks
    the heap, so it runs only while no session is live, once per idle period."""
    import asyncio
    import os

    import pytest

    from voice import server
    from voice.realtime import registry

    real_trim = server._malloc_trim()
    if real_trim is None:
        pytest.skip("not glibc")
    calls: list[int] = []

    def counting_trim(pad: int) -> int:
        calls.append(pad)
        return real_trim(pad)

    monkeypatch.setattr(server, "_malloc_trim", lambda: counting_trim)

    def rss_mb() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6

    settings.VOICE_MALLOC_TRIM_SECONDS = 0
    await asyncio.wait_for(server.trim_heap_when_idle(), 1)  # 0: off, returns at once
    held = [os.urandom(13000) for _ in range(4000)]  # ~52 MB of delta-sized objects
    del held[::2]  # every other one freed: holes all over the heap, none at its top
    before = rss_mb()
    settings.VOICE_MALLOC_TRIM_SECONDS = 0.05
    trimmer = asyncio.get_running_loop().create_task(server.trim_heap_when_idle())
    try:
        await asyncio.sleep(0.3)
        assert calls == [0]  # idle: trimmed once, not again while nothing ran
        assert before - rss_mb() > 10, (before, rss_mb())
        session = type("Live", (), {"session_id": "s"})()
        registry.register(session)  # a live session: its audio must not wait for a trim
        await asyncio.sleep(0.3)
        assert calls == [0]
        registry.unregister(session)  # idle again, something ran since: one more trim
        await asyncio.sleep(0.3)
        assert calls == [0, 0]
    finally:
        trimmer.cancel()
    assert len(held) == 2000


@pytest.mark.django_db(transaction=True)
async def test_ended_sessions_leave_no_tasks_behind(gateway, token_for) -> None:
    """voice_event_loop_tasks counts the serving loop's tasks (the soak's before/after probe): sessions that
    ran a turn and ended, cleanly or abruptly, give back every task they started."""
    import asyncio
    import re

    import httpx

    from tests.live import VoiceClient
    from tests.live import session_with_a_turn as live_session_with_a_turn

    async def loop_tasks() -> int:
        async with httpx.AsyncClient(base_url=gateway.http_url) as http:
            body = (await http.get("/metrics")).text
        return int(float(re.search(r"^voice_event_loop_tasks (\S+)$", body, re.M).group(1)))

    async def session_with_a_turn() -> VoiceClient:
        return await live_session_with_a_turn(gateway.ws_url, token_for())

    async def settled(expected: int) -> int:
        count = await loop_tasks()
        for _ in range(100):
            if metrics.ACTIVE_SESSIONS._value.get() == 0 and count <= expected:
                break
            await asyncio.sleep(0.05)
            count = await loop_tasks()
        return count

    await (await session_with_a_turn()).close()  # warm-up: lazily started process-wide tasks (pools, layer)
    baseline = await settled(10**6)
    await asyncio.sleep(0.3)
    baseline = min(baseline, await loop_tasks())
    clients = [await session_with_a_turn() for _ in range(4)]
    assert await loop_tasks() >= baseline + 4  # the count sees sessions' tasks
    for client in clients[:2]:
        await client.close()
    for client in clients[2:]:
        client.ws.transport.abort()  # abrupt disconnect: no close handshake
    assert await settled(baseline) <= baseline
