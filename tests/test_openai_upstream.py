"""The OpenAI upstream client against a real WebSocket server (the local engine standalone)."""

from __future__ import annotations

import asyncio
import json

import pytest

from voice.realtime.engine.server import EngineServerThread
from voice.realtime.openai_upstream import OpenAIUpstream, upstream_url
from voice.realtime.upstream import UpstreamClosed


@pytest.fixture
def engine():
    server = EngineServerThread().start()
    yield server
    server.stop()


async def test_more_than_a_hundred_concurrent_upstreams(engine, settings) -> None:
    """Each live session holds its upstream socket: no client-side pool may cap them (soak regression)."""
    settings.VOICE_UPSTREAM_CONNECT_TIMEOUT = 5
    upstreams = [OpenAIUpstream(url=engine.url + "?model=gpt-realtime", api_key="sk-test") for _ in range(120)]
    try:
        await asyncio.wait_for(asyncio.gather(*(u.connect() for u in upstreams)), 20)
        first = [json.loads(await u.recv())["type"] for u in upstreams]
        assert first == ["session.created"] * 120
    finally:
        await asyncio.gather(*(u.close() for u in upstreams))


async def test_url_auth_and_close(engine, settings) -> None:
    settings.OPENAI_REALTIME_URL = engine.url
    settings.OPENAI_REALTIME_MODEL = "gpt-realtime"
    assert upstream_url() == engine.url + "?model=gpt-realtime"
    upstream = OpenAIUpstream(api_key="sk-test")
    await upstream.connect()
    assert json.loads(await upstream.recv())["type"] == "session.created"
    await upstream.close()
    with pytest.raises(UpstreamClosed):
        await upstream.send("{}")
