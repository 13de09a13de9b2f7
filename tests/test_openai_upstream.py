"""The OpenAI upstream client against a real WebSocket server (the local engine standalone)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket

import pytest

from voice.realtime.engine.server import EngineServerThread
from voice.realtime.openai_upstream import _SOCKET_RCVBUF_BYTES, OpenAIUpstream, upstream_url
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


async def test_a_slow_reader_stops_the_socket_not_the_memory(settings) -> None:
    """Events the session has not taken yet stay bounded: past 64, the upstream socket stops being read
    (TCP pushes back to the sender); reading resumes as the session catches up, nothing lost or reordered."""
    from websockets.asyncio.server import serve

    settings.VOICE_UPSTREAM_CONNECT_TIMEOUT = 5
    total = 20000  # 40 MB: far more than socket buffers hold
    filler = "x" * 2000

    async def flood(ws) -> None:
        for i in range(total):
            await ws.send(json.dumps({"type": "response.output_text.delta", "seq": i, "delta": filler}))
        await asyncio.sleep(5)

    async with serve(flood, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        upstream = OpenAIUpstream(url=f"ws://127.0.0.1:{port}/v1/realtime", api_key="sk-test")
        await upstream.connect()
        try:
            await asyncio.sleep(2.0)  # nobody reads: the sender fills every buffer on the way, then blocks
            # 64, plus what the socket's last read still held (picows parses a whole read at once)
            held = upstream.inbox.qsize()
            seqs = [json.loads(await upstream.recv())["seq"] for _ in range(total)]
            assert seqs == list(range(total))
            sock = upstream._transport.underlying_transport.get_extra_info("socket")
            # The kernel queue is bounded, and so is any one read (picows grows its buffer to fit reads).
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) <= 2 * _SOCKET_RCVBUF_BYTES
            assert held < 200, held  # 73 here; 381 with whole reads, 1,066 with the queue bounded late
        finally:
            await upstream.close()


async def test_bursts_and_backpressure_never_grow_the_read_buffer(settings, caplog) -> None:
    """picows doubles its read buffer whenever one read fills it and never shrinks it (a ratchet that made
    the soak's memory creep): bursts of ~13 KB deltas, read only after the socket queue filled up, leave
    it at its initial size; an event larger than the buffer still arrives whole."""
    from picows import PICOWS_DEBUG_LL
    from websockets.asyncio.server import serve

    settings.VOICE_UPSTREAM_CONNECT_TIMEOUT = 5
    delta = "A" * 13000
    big = "B" * 200_000

    async def bursts(ws) -> None:
        await ws.send(json.dumps({"type": "session.created"}))
        await asyncio.sleep(0.3)  # the handshake's read is picows' own (not chunked): OpenAI sends little there
        for i in range(400):  # 5 MB: far more than the socket queue holds
            await ws.send(json.dumps({"type": "response.output_audio.delta", "seq": i, "delta": delta}))
        await ws.send(json.dumps({"type": "response.output_audio.delta", "seq": 400, "delta": big}))
        await asyncio.sleep(5)

    caplog.set_level(PICOWS_DEBUG_LL, logger="picows")
    async with serve(bursts, "127.0.0.1", 0, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        upstream = OpenAIUpstream(url=f"ws://127.0.0.1:{port}/v1/realtime", api_key="sk-test")
        await upstream.connect()
        try:
            await asyncio.sleep(1.0)  # nobody reads: the kernel queue fills up
            assert json.loads(await upstream.recv())["type"] == "session.created"
            events = [json.loads(await upstream.recv()) for _ in range(400)]
            assert [e["seq"] for e in events] == list(range(400))
            capacities = [int(m) for m in re.findall(r"get_buffer\(.*cap=(\d+)", caplog.text)]
            assert capacities and max(capacities) == capacities[0] <= 80 * 1024, sorted(set(capacities))
            assert json.loads(await upstream.recv())["delta"] == big
        finally:
            await upstream.close()
            caplog.set_level(logging.WARNING, logger="picows")
