"""Shared fixtures. Tests use the real Redis at 127.0.0.1:6379 (make test starts one when needed)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def _shared_dir() -> Path:
    """`../shared` beside the repository (INTELIA_SHARED overrides; /work/shared for clones elsewhere)."""
    candidates = [os.environ.get("INTELIA_SHARED", ""), Path(__file__).resolve().parents[2] / "shared",
                  "/work/shared"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "audio").is_dir():
            return Path(candidate)
    return Path(__file__).resolve().parents[2] / "shared"


SHARED = _shared_dir()
AUDIO = SHARED / "audio"
needs_audio = pytest.mark.skipif(not AUDIO.is_dir(), reason="../shared/audio (test questions) not available")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisProcess:
    """A redis-server owned by one test (to stop and restart it at will)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="redis-test-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 5
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def own_redis():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisProcess()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def _fresh_process_state(settings):
    """Caches and per-loop clients must not leak between tests."""
    from voice.services import access, rollout, state, users

    settings.METRICS_SPOOL_DIR = tempfile.mkdtemp(prefix="spool-")
    rollout.rollout_cache_clear()
    users.plan_cache_clear()
    access.budget_cache_clear()
    state.reset_states()
    yield
    from voice.services.db import close_db_thread_connections

    close_db_thread_connections()  # PostgreSQL cannot drop a test database with open connections
    rollout.rollout_cache_clear()
    users.plan_cache_clear()
    access.budget_cache_clear()
    state.reset_states()


@pytest.fixture
def open_rollout(db):
    """Everyone with a voice plan is admitted (100 %)."""
    from voice.models import VoiceRollout
    from voice.services.rollout import rollout_cache_clear

    VoiceRollout.objects.update_or_create(pk=1, defaults={"percentage": 100, "voice_enabled": True})
    rollout_cache_clear()


def unique_user(prefix: str = "user") -> str:
    return f"{prefix}-{time.time_ns()}"


SEED_PLANS = [("essential", "Essential", False), ("pro", "Pro", False), ("elite", "Elite", True),
              ("intelia", "Intelia", True)]


def seed_plans() -> None:
    """Transactional tests flush the tables the data migration seeded: put the plans back."""
    from voice.models import PlanAccess, VoiceRollout

    for code, name, voice in SEED_PLANS:
        PlanAccess.objects.get_or_create(code=code, defaults={"name": name, "voice_enabled": voice})
    VoiceRollout.objects.get_or_create(pk=1)


@pytest.fixture
def live_db(transactional_db):
    """A committed database a live server thread can see, with the plans and 100 % rollout."""
    from voice.models import VoiceRollout
    from voice.services.rollout import rollout_cache_clear

    seed_plans()
    VoiceRollout.objects.filter(pk=1).update(percentage=100, voice_enabled=True)
    rollout_cache_clear()


@pytest.fixture
def gateway(live_db):
    from tests.live import LiveServer

    server = LiveServer().start()
    yield server
    server.stop()


@pytest.fixture
def sent(monkeypatch):
    """Records broadcast_terminate calls (admin, commands, rollout) instead of using the channel layer."""
    calls: list[dict] = []

    def fake(*, code: str, session_id: str | None = None) -> bool:
        calls.append({"code": code, "session_id": session_id})
        return True

    for target in ("voice.services.rollout.broadcast_terminate", "voice.admin.broadcast_terminate",
                   "voice.management.commands.voice_sessions.broadcast_terminate"):
        monkeypatch.setattr(target, fake)
    return calls


@pytest.fixture
def token_for():
    from voice.services.auth import issue_access_token

    def make(user_id: str | None = None, plan: str = "elite", **kwargs) -> str:
        return issue_access_token(user_id=user_id or unique_user(), plan=plan, **kwargs)

    return make


@pytest.fixture
def engine_spy(monkeypatch):
    """Every client event the local engine receives (in process or behind its WebSocket server)."""
    import json

    from voice.realtime.engine.session import EngineSession

    received: list[dict] = []
    original = EngineSession.receive

    def spy(self, text):
        try:
            received.append(json.loads(text))
        except ValueError:
            received.append({"type": "<malformed>"})
        return original(self, text)

    monkeypatch.setattr(EngineSession, "receive", spy)
    return received


# --- Whole-suite secret scan -------------------------------------------------------------------------
# Every log line the suite produces goes through a copy of the project's own console handler (same
# filters, same formatter) into var/test-logs/suite.log; at the end the file is searched for anything
# secret-shaped. Tests deliberately send JWTs in query strings, subprotocols and bodies, API keys and
# Redis passwords: none may surface.
import logging  # noqa: E402
import re  # noqa: E402

SECRET_PATTERNS = [
    re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),  # a JWT
    re.compile(r"sk-(?!\*\*\*)[A-Za-z0-9_-]{8,}"),  # an API key
    re.compile(r"topsecret|hunter2"),  # the Redis passwords tests use
    re.compile(r"[?&](?:token|ticket|resume)=(?!\*\*\*)[A-Za-z0-9._~-]{16,}"),
]
_SUITE_LOG = Path(__file__).resolve().parent.parent / "var" / "test-logs" / "suite.log"


_scan_handler: logging.Handler | None = None
_SCANNED_LOGGERS = ("", "uvicorn.access", "uvicorn.error", "django.channels.server", "daphne", "websockets")


def pytest_sessionstart(session) -> None:
    global _scan_handler
    _SUITE_LOG.parent.mkdir(parents=True, exist_ok=True)
    _SUITE_LOG.write_text("")
    # Append mode: Django's logging setup closes existing handlers; an "a" handler reopens on next use.
    _scan_handler = logging.FileHandler(_SUITE_LOG, mode="a", encoding="utf-8")
    _scan_handler.setLevel(logging.DEBUG)


@pytest.fixture(autouse=True)
def _secret_scan_handler():
    """(Re)attach the scan handler: Django's setup re-applies LOGGING, which drops foreign handlers."""
    if _scan_handler is None:
        yield
        return
    import intelia_voice.asgi  # noqa: F401 - its django.setup() re-applies LOGGING: do it before attaching
    template = next((h for h in logging.getLogger().handlers if getattr(h, "name", "") == "console"), None)
    if template is not None:
        _scan_handler.filters = list(template.filters)
        _scan_handler.setFormatter(template.formatter)
    for name in _SCANNED_LOGGERS:
        logger = logging.getLogger(name)
        if _scan_handler not in logger.handlers:
            logger.addHandler(_scan_handler)
    yield


def pytest_sessionfinish(session, exitstatus) -> None:
    if not _SUITE_LOG.exists():
        return
    leaks = []
    with _SUITE_LOG.open(encoding="utf-8", errors="replace") as log:
        for number, line in enumerate(log, 1):
            if any(p.search(line) for p in SECRET_PATTERNS):
                leaks.append(f"{number}: {line.strip()[:300]}")
    if leaks:
        print("\nSECRET SCAN FAILED: secret-shaped text in captured logs (var/test-logs/suite.log):")
        print("\n".join(leaks[:20]))
        session.exitstatus = 1
