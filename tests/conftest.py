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


@pytest.fixture
def websocket_engine(settings):
    """The local engine behind its own WebSocket server, as the OpenAI upstream: the picows client and the
    synchronous fast path both ways."""
    from voice.realtime.engine.server import EngineServerThread

    engine = EngineServerThread().start()
    settings.VOICE_UPSTREAM = "openai"
    settings.OPENAI_REALTIME_URL = engine.url
    settings.OPENAI_API_KEY = "sk-test-local-engine-key"
    yield engine
    engine.stop()


# --- Whole-suite secret scan -------------------------------------------------------------------------
# Logs, Sentry envelopes and server responses of the whole suite are recorded under var/test-logs/ and
# searched for anything secret-shaped at the end (tests/secret_scan.py): a hit fails the run.
from tests import sdk_conformance, secret_scan  # noqa: E402

# --- Whole-suite SDK conformance ------------------------------------------------------------------------
# Every event the gateway sends upstream and every event the local engine emits is sampled and validated
# against the OpenAI SDK's realtime types at the end (tests/sdk_conformance.py): a problem fails the run.


def pytest_sessionstart(session) -> None:
    secret_scan.start()
    sdk_conformance.start()


@pytest.fixture(autouse=True)
def _secret_scan_handler():
    secret_scan.attach_log_handler()
    yield


def pytest_sessionfinish(session, exitstatus) -> None:
    secret_scan.finish(session)
    sdk_conformance.finish(session)
