"""Shared fixtures. Tests use the real Redis at 127.0.0.1:6379 (make test starts one when needed)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
AUDIO = SHARED / "audio"


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
