"""Sentry: secrets never leave the process (events captured by a local transport), sampling, no-DSN log."""

from __future__ import annotations

import logging

import pytest
import sentry_sdk
from sentry_sdk.transport import Transport

from voice.observability import sentry as obs

JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ1c2VyX2lkIjoidTEyMyIsInBsYW4iOiJlbGl0ZSJ9"
       ".c2lnbmF0dXJlLXNlY3JldA")
SK = "sk-proj-AbCdEf0123456789SECRETkey"
COOKIE = "sessionid=cookie-secret-value"


class CaptureTransport(Transport):
    """Keeps every envelope in memory instead of sending it."""

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.envelopes: list = []

    def capture_envelope(self, envelope) -> None:
        self.envelopes.append(envelope)

    def payloads(self) -> list[bytes]:
        return [item.get_bytes() for envelope in self.envelopes for item in envelope.items]


@pytest.fixture
def capture():
    transport = CaptureTransport()
    obs.init_sentry(dsn="https://public@example.invalid/1", environment="test", release="9.9.9",
                    traces_sample_rate=1.0, profiles_sample_rate=0.0, transport=transport)
    yield transport
    sentry_sdk.get_client().close()
    sentry_sdk.init()  # back to a disabled client
    obs._state["initialised"] = False


async def _failing_consumer(scope, receive, send):
    token = JWT  # a local variable Sentry would otherwise ship with the stack frame
    header = f"Bearer {token}"
    raise RuntimeError(f"upstream refused key {SK} for {header}")


async def test_websocket_exception_is_captured_without_secrets(capture):
    sentry_sdk.add_breadcrumb(message=f"connecting wss://x/v1/ws/voice?token={JWT}")
    sentry_sdk.set_extra("auth", f"Bearer {JWT}")
    sentry_sdk.set_context("upstream", {"api_key": SK, "url": f"wss://api/?key={SK}"})
    logging.getLogger("voice.test").info("retrying with %s", SK)  # becomes a breadcrumb
    app = obs.wrap_websocket_app(_failing_consumer)
    assert app is not _failing_consumer
    scope = {
        "type": "websocket", "path": "/v1/ws/voice", "raw_path": b"/v1/ws/voice",
        "query_string": f"token={JWT}&resume=abc.def".encode(), "scheme": "ws", "server": ("testserver", 80),
        "client": ("127.0.0.1", 5555), "asgi": {"version": "3.0"}, "http_version": "1.1",
        "headers": [
            (b"host", b"testserver"),
            (b"sec-websocket-protocol", f"intelia.v1, bearer.{JWT}".encode()),
            (b"authorization", f"Bearer {JWT}".encode()),
            (b"cookie", COOKIE.encode()),
        ],
        "subprotocols": ["intelia.v1", f"bearer.{JWT}"],
    }

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        return None

    with pytest.raises(RuntimeError):
        await app(scope, receive, send)
    sentry_sdk.flush()
    payloads = b"\n".join(capture.payloads())
    assert b"RuntimeError" in payloads  # the exception was reported...
    assert b"/v1/ws/voice" in payloads
    for secret in (JWT, SK, "cookie-secret-value", "c2lnbmF0dXJlLXNlY3JldA", "resume=abc.def"):
        assert secret.encode() not in payloads, secret  # ...without any credential
    assert b"sk-***" in payloads


def test_logged_error_is_captured_and_scrubbed(capture):
    logging.getLogger("voice.consumers").error("upstream failed for /v1/ws/voice?ticket=T0K3N and %s", JWT)
    sentry_sdk.flush()
    payloads = b"\n".join(capture.payloads())
    assert b"upstream failed" in payloads
    assert JWT.encode() not in payloads
    assert b"T0K3N" not in payloads


def test_scrub_event_directly():
    event = {
        "message": f"Authorization: Bearer {JWT}",
        "request": {
            "url": "https://gw/v1/voice/stats",
            "query_string": f"token={JWT}",
            "headers": {"Authorization": f"Bearer {JWT}", "Sec-WebSocket-Protocol": f"bearer.{JWT}",
                        "Cookie": COOKIE, "User-Agent": "pytest"},
            "cookies": {"sessionid": "x"},
            "data": {"password": "p"},
        },
        "exception": {"values": [{"type": "ValueError", "value": f"bad {SK}"}]},
        "breadcrumbs": {"values": [{"message": f"GET /v1/ws/voice?resume={JWT}"}]},
        "extra": {"token": "opaque-token-value", "nested": [["authorization", "Basic abc"]]},
        "contexts": {"cfg": {"OPENAI_API_KEY": "raw-key-without-prefix"}},
    }
    cleaned = obs.scrub_event(event, {})
    text = repr(cleaned)
    secrets = (JWT, SK, "cookie-secret-value", "opaque-token-value", "Basic abc", "raw-key-without-prefix")
    for secret in secrets:
        assert secret not in text
    assert cleaned["request"]["headers"]["User-Agent"] == "pytest"
    assert "cookies" not in cleaned["request"] and "data" not in cleaned["request"]


async def test_a_voice_connection_keeps_no_redis_breadcrumbs(capture):
    """Each connection's scope lives as long as the session: per-command Redis crumbs would pile up there."""
    import redis.asyncio as aioredis

    kept: list[list[dict]] = []

    async def consumer(scope, receive, send):
        client = aioredis.Redis.from_url("redis://127.0.0.1:6379/14")
        try:
            for _ in range(20):  # a session's presence refreshes and kill-switch polls
                await client.set("voice:test:breadcrumbs", "1", ex=5)
                await client.get("voice:test:breadcrumbs")
        finally:
            await client.aclose()
        logging.getLogger("voice.consumers").info("session started")
        kept.append(list(sentry_sdk.get_isolation_scope()._breadcrumbs))

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        return None

    scope = {"type": "websocket", "path": "/v1/ws/voice", "raw_path": b"/v1/ws/voice", "query_string": b"",
             "scheme": "ws", "server": ("testserver", 80), "client": ("127.0.0.1", 5555),
             "asgi": {"version": "3.0"}, "headers": [(b"host", b"testserver")], "subprotocols": []}
    await obs.wrap_websocket_app(consumer)(scope, receive, send)
    categories = [crumb.get("category") for crumb in kept[0]]
    assert "redis" not in categories
    assert "voice.consumers" in categories  # log lines still make the trail
    assert obs.filter_breadcrumb({"category": "redis", "message": "GET k"}) is None


def test_traces_sampler():
    obs._state["traces_rate"] = 0.1
    assert obs.traces_sampler({"asgi_scope": {"type": "websocket", "path": "/v1/ws/voice"}}) == 0.0
    assert obs.traces_sampler({"transaction_context": {"op": "websocket.server"}}) == 0.0
    assert obs.traces_sampler({"asgi_scope": {"type": "http", "path": "/metrics"}}) == 0.0
    assert obs.traces_sampler({"asgi_scope": {"type": "http", "path": "/v1/voice/health"}}) == 0.0
    assert obs.traces_sampler({"asgi_scope": {"type": "http", "path": "/v1/voice/ticket"}}) == 0.1
    assert obs.traces_sampler({"parent_sampled": True, "asgi_scope": {"type": "websocket"}}) == 1.0


def test_no_dsn_logs_once(caplog):
    obs._state["disabled_logged"] = False
    with caplog.at_level(logging.INFO, logger="voice.observability"):
        assert obs.init_sentry(dsn="", environment="x", release="1", traces_sample_rate=0.1,
                               profiles_sample_rate=0.1) is False
        obs.init_sentry(dsn="", environment="x", release="1", traces_sample_rate=0.1,
                        profiles_sample_rate=0.1)
    messages = [r.getMessage() for r in caplog.records if r.name == "voice.observability"]
    assert messages == ["Sentry DSN not configured, error tracking disabled"]
    assert obs.wrap_websocket_app(_failing_consumer) is _failing_consumer
