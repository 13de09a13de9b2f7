"""Start the deploy topology (deploy/compose.yaml) as plain processes on this machine, without Docker.

    nginx (deploy/nginx/intelia-voice.conf) ─▶ gateway-1..N (`manage.py voice_serve`) ─▶ local engine
                                                │                                      (`manage.py realtime_engine`)
                         Redis master + replica + 3 sentinels (REDIS_SENTINELS)
                         PostgreSQL at 127.0.0.1:5432 (a fresh database) or a SQLite file

Everything binds 127.0.0.1 on free ports under one work directory (var/topology/<stamp>/ by default: logs,
configs, the SQLite file). `python deploy/topology.py` starts it, prints the addresses and waits for
Ctrl-C; bench/topology.py and tests/test_topology.py drive the same class.

    .venv/bin/python deploy/topology.py                       # 3 gateways, PostgreSQL if it answers, else SQLite
    .venv/bin/python deploy/topology.py --gateways 2 --database sqlite --port 8080
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploy.processes import (
    PYTHON,
    ROOT,
    Nginx,
    Proc,
    SentinelCluster,
    free_port,
    start_engine,
    start_gateway,
)

POSTGRES = {"host": "127.0.0.1", "port": "5432", "user": os.environ.get("TOPOLOGY_PG_USER", "postgres")}


def postgres_available() -> bool:
    """True when the local PostgreSQL accepts this user without a password (trust auth)."""
    if shutil.which("psql") is None:
        return False
    probe = subprocess.run(["psql", "-h", POSTGRES["host"], "-p", POSTGRES["port"], "-U", POSTGRES["user"],
                            "-d", "postgres", "-w", "-Atc", "SELECT 1"], capture_output=True, text=True, check=False)
    return probe.returncode == 0


def _psql(sql: str) -> None:
    subprocess.run(["psql", "-h", POSTGRES["host"], "-p", POSTGRES["port"], "-U", POSTGRES["user"], "-d", "postgres",
                    "-w", "-qc", sql], check=True, capture_output=True)


class Topology:
    """nginx in front of N gateways, Redis with sentinels, a database and the local engine, as processes."""

    def __init__(self, workdir: Path, *, gateways: int = 3, database: str = "auto", nginx_port: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)  # nginx workers read their configuration here
        self.gateway_count = gateways
        self.database = ("postgres" if postgres_available() else "sqlite") if database == "auto" else database
        self.nginx_port = nginx_port
        self.extra_env = env or {}
        self.pg_name = f"intelia_topology_{os.getpid()}_{int(time.time())}"
        self.redis = SentinelCluster(self.dir / "redis")
        self.engine: Proc | None = None
        self.gateways: dict[str, tuple[Proc, int]] = {}
        self.nginx: Nginx | None = None
        self.env: dict[str, str] = {}

    @staticmethod
    def missing() -> str | None:
        """None when this machine can run the topology, else what is missing."""
        if Nginx.binary() is None:
            return "nginx is not installed (apt-get install nginx-light)"
        return SentinelCluster.available()

    @property
    def database_url(self) -> str:
        if self.database == "postgres":
            return f"postgres://{POSTGRES['user']}@{POSTGRES['host']}:{POSTGRES['port']}/{self.pg_name}"
        return f"sqlite:///{self.dir / 'db.sqlite3'}"

    @property
    def http_url(self) -> str:
        assert self.nginx is not None
        return f"http://127.0.0.1:{self.nginx.port}"

    @property
    def ws_url(self) -> str:
        assert self.nginx is not None
        return f"ws://127.0.0.1:{self.nginx.port}/v1/ws/voice"

    def gateway_settings(self, engine_port: int) -> dict[str, str]:
        """The settings every gateway (and the migrate step) runs with, on top of this process' environment."""
        return {
            "DJANGO_SETTINGS_MODULE": "intelia_voice.settings",
            "DATABASE_URL": self.database_url,
            "ENABLE_VOICE_REALTIME": "true",
            "DEBUG": "false",
            "LOG_LEVEL": "WARNING",
            "LOG_FORMAT": "console",
            "SENTRY_DSN": "",
            "SECRET_KEY": self.secret,
            "JWT_SIGNING_KEY": self.secret,
            # The local engine behind its own WebSocket server plays OpenAI (any non-empty key).
            "VOICE_UPSTREAM": "openai",
            "OPENAI_REALTIME_URL": f"ws://127.0.0.1:{engine_port}/v1/realtime",
            "OPENAI_API_KEY": "local-engine",
            "RAG_BACKEND": "off",
            "METRICS_SPOOL_DIR": str(self.dir / "spool"),
            "PYTHONUNBUFFERED": "1",
            **self.redis.env(),
            **self.extra_env,
        }

    def start(self) -> Topology:
        """Database, Redis, engine, gateways, then nginx (each waits for the previous one to answer)."""
        self.secret = secrets.token_urlsafe(32)
        if self.database == "postgres":
            _psql(f'CREATE DATABASE "{self.pg_name}"')
        self.redis.start()
        engine_env = {**os.environ, "DJANGO_SETTINGS_MODULE": "intelia_voice.settings", "LOG_LEVEL": "WARNING",
                      "SENTRY_DSN": "", **self.extra_env}
        self.engine, engine_port = start_engine(self.dir, engine_env)
        self.settings = self.gateway_settings(engine_port)
        self.env = {**os.environ, **self.settings}
        env_file = self.dir / "gateway.env"  # `set -a; . gateway.env` then manage.py voice_token USER
        env_file.write_text("".join(f"{key}='{value}'\n" for key, value in self.settings.items()))
        env_file.chmod(0o600)  # it holds the signing key
        self._migrate()
        for k in range(1, self.gateway_count + 1):
            name = f"gateway-{k}"
            self.gateways[name] = start_gateway(self.dir, self.env, name)
        self.nginx = Nginx(self.dir / "nginx", [port for _, port in self.gateways.values()], self.nginx_port).start()
        return self

    def _migrate(self) -> None:
        """The release step: migrate once, open the rollout to everyone with a voice plan."""
        run = {"cwd": ROOT, "env": self.env, "check": True, "capture_output": True}
        subprocess.run([PYTHON, "manage.py", "migrate", "--noinput", "-v", "0"], **run)
        snippet = ("from voice.models import VoiceRollout;"
                   "VoiceRollout.objects.update_or_create(pk=1, defaults={'percentage': 100, 'voice_enabled': True})")
        subprocess.run([PYTHON, "manage.py", "shell", "-c", snippet], **run)

    def gateway_port(self, name: str) -> int:
        return self.gateways[name][1]

    def drain(self, name: str) -> Proc:
        """SIGTERM one gateway (what an orchestrator does on a deploy): it drains its live sessions."""
        proc, _ = self.gateways[name]
        proc.signal(signal.SIGTERM)
        return proc

    def describe(self) -> dict[str, Any]:
        """Addresses and settings (no secrets) for people and the bench's JSON."""
        return {
            "nginx": self.http_url if self.nginx else None,
            "gateways": {name: f"127.0.0.1:{port}" for name, (_, port) in self.gateways.items()},
            "redis_sentinels": self.redis.sentinel_list, "redis_master_name": self.redis.master_name,
            "redis_master_port": self.redis.master_port(),
            "database": self.database if self.database == "sqlite" else f"postgres ({self.pg_name})",
            "workdir": str(self.dir),
        }

    def stop(self) -> None:
        """Everything down, the fresh PostgreSQL database dropped."""
        if self.nginx is not None:
            self.nginx.stop()
        for proc, _ in self.gateways.values():
            proc.stop(20)
        if self.engine is not None:
            self.engine.stop(5)
        self.redis.stop()
        if self.database == "postgres":
            with contextlib.suppress(subprocess.CalledProcessError):
                _psql(f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateways", type=int, default=3)
    parser.add_argument("--database", choices=("auto", "postgres", "sqlite"), default="auto")
    parser.add_argument("--port", type=int, default=None, help="nginx's loopback port (default: a free one)")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    reason = Topology.missing()
    if reason:
        print(f"cannot start the topology: {reason}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or ROOT / "var" / "topology" / time.strftime("%Y%m%d-%H%M%S"))
    topology = Topology(workdir, gateways=args.gateways, database=args.database, nginx_port=args.port or free_port())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop like Ctrl-C: the finally below cleans up
    try:
        topology.start()
        info = topology.describe()
        print("topology up:")
        for key, value in info.items():
            print(f"  {key:18} {value}")
        print(f"  voice socket       {topology.ws_url}\n  health             {topology.http_url}/v1/voice/health")
        print(f"  a token            (set -a; . {workdir}/gateway.env; .venv/bin/python manage.py voice_token "
              "USER --plan elite)\nCtrl-C stops everything", flush=True)
        while all(proc.alive() for proc, _ in topology.gateways.values()):
            time.sleep(1)
        print("a gateway exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        topology.stop()


if __name__ == "__main__":
    sys.exit(main())
