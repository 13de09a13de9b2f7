"""Structured logs: redaction of real uvicorn/daphne access records, JSON/console output, session context."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket

import pytest

from voice.logging import RedactSecretsFilter
from voice.observability.logs import (
    bind_session,
    clear_session,
    session_context,
    structured_formatter,
    structured_logging_config,
)

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJ1c2VyX2lkIjoidTEiLCJwbGFuIjoiZWxpdGUifQ.QUJDREVGR0hJSktMTU5PUA"


class Captured:
    """The production handler setup (redact filter + structured formatter) writing to a buffer."""

    def __init__(self, logger_name: str, fmt: str = "json") -> None:
        self.buffer = io.StringIO()
        self.handler = logging.StreamHandler(self.buffer)
        self.handler.addFilter(RedactSecretsFilter())
        self.handler.setFormatter(structured_formatter(fmt))
        self.logger = logging.getLogger(logger_name)

    def __enter__(self) -> Captured:
        self.saved = (self.logger.handlers[:], self.logger.level, self.logger.propagate)
        self.logger.handlers = [self.handler]
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        return self

    def __exit__(self, *exc) -> None:
        self.logger.handlers, level, self.logger.propagate = self.saved
        self.logger.setLevel(level)

    @property
    def text(self) -> str:
        return self.buffer.getvalue()

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.text.splitlines() if line.strip()]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_real_uvicorn_access_log_has_no_token():
    import uvicorn

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=True,
                            lifespan="off", ws="none")
    server = uvicorn.Server(config)
    with Captured("uvicorn.access") as captured:
        task = asyncio.create_task(server.serve())
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /v1/ws/voice?token={JWT}&ticket=T1CK3T&resume=R3SUME HTTP/1.1\r\n"
                     "Host: x\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        await reader.read()
        writer.close()
        server.should_exit = True
        await asyncio.wait_for(task, 10)
    records = captured.records()
    assert records, captured.text
    line = captured.text
    assert "/v1/ws/voice?token=***" in line
    for secret in (JWT, "T1CK3T", "R3SUME"):
        assert secret not in line
    assert records[0]["logger"] == "uvicorn.access"
    assert records[0]["level"] == "info"


@pytest.mark.parametrize("protocol,action,details", [
    ("http", "complete", {"method": "GET", "path": f"/v1/ws/voice?token={JWT}", "status": 200,
                          "time_taken": 0.01, "client": "127.0.0.1:5000"}),
    ("websocket", "connecting", {"path": f"/v1/ws/voice?ticket={JWT}", "client": ["127.0.0.1", 5000]}),
    ("websocket", "connected", {"path": "/v1/ws/voice?resume=abc.DEF-secret", "client": ["127.0.0.1", 1]}),
])
def test_real_daphne_runserver_access_log_has_no_token(protocol, action, details):
    from daphne.management.commands.runserver import Command

    with Captured("django.channels.server") as captured:
        Command().log_action(protocol, action, details)
    text = captured.text
    assert "/v1/ws/voice?" in text
    assert JWT not in text and "abc.DEF-secret" not in text


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_formatted_record_with_token_in_url(fmt):
    with Captured("voice.test.fmt", fmt) as captured:
        url = f"https://h/x?access_token={JWT}&a=1"
        logging.getLogger("voice.test.fmt").warning("upstream GET %s failed with key %s", url,
                                                    "sk-abcdefghijklmnop")
        try:
            raise ValueError(f"bad token {JWT}")
        except ValueError:
            logging.getLogger("voice.test.fmt").exception("crash while handling %s", "/v1/ws/voice?token=X")
    text = captured.text
    assert JWT not in text and "sk-abcdefghijklmnop" not in text and "token=X" not in text
    assert "access_token=***" in text
    assert "ValueError" in text  # the traceback is kept, redacted
    if fmt == "json":
        records = captured.records()
        assert records[0]["level"] == "warning" and "timestamp" in records[0]
        assert "exception" in records[1]


def test_bind_session_adds_context_then_clears():
    with Captured("voice.test.ctx") as captured:
        log = logging.getLogger("voice.test.ctx")
        bind_session("sess-1", "user-1", "elite")
        log.info("turn answered")
        clear_session()
        log.info("after the session")
        with session_context("sess-2", "user-2", "intelia"):
            log.info("second")
    first, after, second = captured.records()
    assert (first["session_id"], first["user_id"], first["plan"]) == ("sess-1", "user-1", "elite")
    assert "session_id" not in after
    assert second["session_id"] == "sess-2" and second["plan"] == "intelia"


async def test_session_context_is_per_task():
    with Captured("voice.test.tasks") as captured:
        log = logging.getLogger("voice.test.tasks")

        async def connection(n: int) -> None:
            bind_session(f"s{n}", f"u{n}", "elite")
            await asyncio.sleep(0.01)
            log.info("frame %d", n)

        await asyncio.gather(connection(1), connection(2))
        log.info("outside")
    records = {r["event"]: r for r in captured.records()}
    assert records["frame 1"]["session_id"] == "s1"
    assert records["frame 2"]["session_id"] == "s2"
    assert "session_id" not in records["outside"]


def test_structlog_loggers_go_through_the_same_pipeline():
    import structlog

    with Captured("voice.test.structlog") as captured:
        structlog.get_logger("voice.test.structlog").info("ticket issued", url=f"/x?ticket={JWT}")
    record = captured.records()[0]
    assert record["event"] == "ticket issued"
    assert JWT not in captured.text


def test_configure_logging_installs_structured_redacting_handlers():
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(message)s"}},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
        "loggers": {"voice.test.cfg": {"handlers": ["console"], "level": "INFO", "propagate": False}},
    }
    structured_logging_config(config, "console")
    handler = config["handlers"]["console"]
    assert handler["formatter"] == "structured" and handler["filters"] == ["redact"]
    assert config["formatters"]["structured"]["fmt"] == "console"
    assert config["filters"]["redact"] == {"()": "voice.logging.RedactSecretsFilter"}


def test_project_logging_is_structured_and_redacted():
    from django.conf import settings

    for name in ("console",):
        handler = settings.LOGGING["handlers"][name]
        assert handler["formatter"] == "structured" and "redact" in handler["filters"]
    for logger in ("uvicorn.access", "django.channels.server"):
        assert settings.LOGGING["loggers"][logger]["handlers"] == ["console"]
