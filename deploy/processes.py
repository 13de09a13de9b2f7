"""The deploy topology as plain processes on loopback (no Docker): Redis with sentinels, nginx, gateways, engine.

Used by deploy/topology.py (start it by hand), bench/topology.py and the tests. Every process binds
127.0.0.1 on a free port and lives under one work directory; nothing listens on or connects to another
address.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "deploy" / "nginx" / "intelia-voice.conf"  # the file docs/DEPLOYMENT.md shows
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
HOST = "127.0.0.1"


def free_port() -> int:
    """An unused loopback TCP port."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    """Block until something accepts on 127.0.0.1:port (or the process exits, or the time is up)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


class Proc:
    """One child process with its log file."""

    def __init__(self, name: str, argv: list[str], log: Path, *, env: dict[str, str] | None = None,
                 cwd: Path = ROOT) -> None:
        self.name, self.argv, self.log_path = name, argv, log
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send `sig` if still running (SIGTERM: a gateway drains; SIGKILL: a crash)."""
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` seconds."""
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


# --- Redis: master, replica, three sentinels ----------------------------------------------------------------
class SentinelCluster:
    """One master, one replica and three sentinels (quorum 2), each a redis-server on its own port."""

    def __init__(self, workdir: Path, *, master_name: str = "intelia-voice", master_password: str = "",
                 sentinel_password: str = "", down_after_ms: int = 1000, failover_timeout_ms: int = 3000) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.master_name = master_name
        self.master_password, self.sentinel_password = master_password, sentinel_password
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms
        self.data_ports = [free_port(), free_port()]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.nodes: dict[int, Proc] = {}
        self.sentinels: list[Proc] = []

    @staticmethod
    def available() -> str | None:
        """None when redis-server can run sentinels here, else the reason why not."""
        if shutil.which("redis-server") is None:
            return "redis-server is not installed"
        return None

    @property
    def sentinel_list(self) -> str:
        """REDIS_SENTINELS for the gateways."""
        return ",".join(f"{HOST}:{port}" for port in self.sentinel_ports)

    def env(self) -> dict[str, str]:
        """The gateway settings that point at this cluster."""
        return {"REDIS_SENTINELS": self.sentinel_list, "REDIS_SENTINEL_MASTER": self.master_name,
                "REDIS_SENTINEL_PASSWORD": self.sentinel_password, "REDIS_MASTER_PASSWORD": self.master_password}

    def _data_node(self, port: int, replica_of: int | None) -> Proc:
        argv = ["redis-server", "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                "--dir", str(self.dir), "--dbfilename", f"dump-{port}.rdb"]
        if self.master_password:
            argv += ["--requirepass", self.master_password, "--masterauth", self.master_password]
        if replica_of is not None:
            argv += ["--replicaof", HOST, str(replica_of)]
        proc = Proc(f"redis-{port}", argv, self.dir / f"redis-{port}.log")
        wait_port(port, 10, proc.proc)
        return proc

    def _sentinel(self, port: int, master_port: int) -> Proc:
        conf = self.dir / f"sentinel-{port}.conf"
        lines = [f"port {port}", f"bind {HOST}", "daemonize no", f'dir "{self.dir}"',
                 f"sentinel monitor {self.master_name} {HOST} {master_port} 2",
                 f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
                 f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}",
                 f"sentinel parallel-syncs {self.master_name} 1"]
        if self.master_password:
            lines.append(f"sentinel auth-pass {self.master_name} {self.master_password}")
        if self.sentinel_password:
            lines += [f"requirepass {self.sentinel_password}", f"sentinel sentinel-pass {self.sentinel_password}"]
        conf.write_text("\n".join(lines) + "\n")
        conf.chmod(0o600)  # it holds the passwords
        proc = Proc(f"sentinel-{port}", ["redis-server", str(conf), "--sentinel"], self.dir / f"sentinel-{port}.log")
        wait_port(port, 10, proc.proc)
        return proc

    def start(self, timeout: float = 30.0) -> SentinelCluster:
        """Start every node and wait until each sentinel knows the replica and the two other sentinels."""
        master, replica = self.data_ports
        self.nodes[master] = self._data_node(master, None)
        self.nodes[replica] = self._data_node(replica, master)
        self.sentinels = [self._sentinel(port, master) for port in self.sentinel_ports]
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = [self._sentinel_view(port) for port in self.sentinel_ports]
            if all(s and int(s.get("num-slaves", 0)) >= 1 and int(s.get("num-other-sentinels", 0)) >= 2
                   for s in states) and self._replica_in_sync(replica):
                return self
            time.sleep(0.2)
        raise RuntimeError("sentinels did not discover the replica and each other in time")

    def _client(self, port: int, password: str) -> Any:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No retries: a stopped node must fail at once (the default retries a refused connection for ~4 s).
        return redis.Redis(host=HOST, port=port, password=password or None, socket_timeout=1,
                           socket_connect_timeout=1, decode_responses=True, retry=Retry(NoBackoff(), 0))

    def _sentinel_view(self, port: int) -> dict[str, Any] | None:
        with contextlib.suppress(Exception), self._client(port, self.sentinel_password) as client:
            return client.sentinel_master(self.master_name)
        return None

    def _replica_in_sync(self, port: int) -> bool:
        with contextlib.suppress(Exception), self._client(port, self.master_password) as client:
            return client.info("replication").get("master_link_status") == "up"
        return False

    def master_port(self) -> int | None:
        """The master port the sentinels agree on now (asked of the first one that answers)."""
        for port in self.sentinel_ports:
            with contextlib.suppress(Exception), self._client(port, self.sentinel_password) as client:
                host_port = client.sentinel_get_master_addr_by_name(self.master_name)
                if host_port:
                    return int(host_port[1])
        return None

    def data_client(self, port: int) -> Any:
        """A sync client on one data node (checks, replication waits)."""
        return self._client(port, self.master_password)

    def wait_replicated(self, timeout_ms: int = 2000) -> int:
        """WAIT on the master: how many replicas acknowledged every write so far."""
        port = self.master_port()
        assert port is not None
        with self.data_client(port) as client:
            return int(client.execute_command("WAIT", 1, timeout_ms))

    def kill_master(self) -> int:
        """SIGKILL the current master (a crash); returns its port."""
        port = self.master_port()
        assert port is not None
        self.nodes[port].signal(signal.SIGKILL)
        self.nodes[port].proc.wait()
        return port

    def wait_promoted(self, old_port: int, timeout: float = 30.0) -> int:
        """Until the sentinels name another master and it answers as master; returns its port."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            port = self.master_port()
            if port is not None and port != old_port:
                with contextlib.suppress(Exception), self.data_client(port) as client:
                    if client.info("replication").get("role") == "master":
                        return port
            time.sleep(0.1)
        raise RuntimeError("no replica was promoted in time")

    def stop(self) -> None:
        """Stop every node (sentinels first: no failover while the data nodes go)."""
        for proc in [*self.sentinels, *self.nodes.values()]:
            proc.stop(5)


# --- nginx ---------------------------------------------------------------------------------------------------
class Nginx:
    """Debian's nginx, not the system service: its own prefix, config and loopback port, in the foreground.

    nginx.conf here only wraps the shared file: it includes deploy/nginx/intelia-voice.conf (the one
    docs/DEPLOYMENT.md shows) and writes the two site-specific pieces it includes, the upstream servers
    and the listener.
    """

    def __init__(self, workdir: Path, upstream_ports: list[int], port: int | None = None, *,
                 site: str | None = None, upstream_servers: str | None = None) -> None:
        self.dir = Path(workdir)
        self.port = port or free_port()
        self.upstream_ports = upstream_ports
        self.site, self.upstream_servers = site, upstream_servers  # other contents for the two includes
        self.proc: Proc | None = None

    @staticmethod
    def binary() -> str | None:
        """The nginx executable (Debian installs it in /usr/sbin, often outside a user's PATH)."""
        return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)

    def write_config(self) -> Path:
        """The prefix directory with nginx.conf, the shared file and its two site-specific includes."""
        site = self.dir / "intelia-voice"
        site.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        shutil.copyfile(NGINX_CONF, self.dir / "intelia-voice.conf")
        (site / "upstream-servers.conf").write_text(self.upstream_servers or "".join(
            f"server {HOST}:{port} max_fails=3 fail_timeout=10s;\n" for port in self.upstream_ports))
        (site / "site.conf").write_text(self.site or (
            f"listen {HOST}:{self.port};\nserver_name localhost;\n"
            f"access_log {self.dir / 'logs' / 'voice.access.log'} voice;\n"))
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers need to read this private prefix
        (self.dir / "nginx.conf").write_text(
            f"{user}worker_processes 1;\npid {self.dir / 'nginx.pid'};\nerror_log {self.dir / 'logs' / 'error.log'};\n"
            "events { worker_connections 4096; }\n"
            "http {\n"
            f"    client_body_temp_path {self.dir / 'tmp-body'};\n    proxy_temp_path {self.dir / 'tmp-proxy'};\n"
            f"    fastcgi_temp_path {self.dir / 'tmp-fcgi'};\n    uwsgi_temp_path {self.dir / 'tmp-uwsgi'};\n"
            f"    scgi_temp_path {self.dir / 'tmp-scgi'};\n"
            "    include intelia-voice.conf;\n}\n")
        return self.dir / "nginx.conf"

    def _argv(self, *extra: str) -> list[str]:
        binary = self.binary()
        assert binary is not None
        return [binary, "-p", f"{self.dir}/", "-c", str(self.dir / "nginx.conf"), "-e",
                str(self.dir / "logs" / "error.log"), *extra]

    def check(self) -> subprocess.CompletedProcess:
        """`nginx -t` on the written configuration."""
        self.write_config()
        return subprocess.run(self._argv("-t"), capture_output=True, text=True, check=False)

    def start(self) -> Nginx:
        """Run nginx in the foreground (daemon off) and wait for its port."""
        self.write_config()
        self.proc = Proc("nginx", self._argv("-g", "daemon off;"), self.dir / "logs" / "nginx.out")
        wait_port(self.port, 10, self.proc.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.signal(signal.SIGQUIT)  # graceful: let open sockets finish
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.proc.wait(5)
            self.proc.stop(2)


# --- the application ------------------------------------------------------------------------------------------
def manage(name: str, args: list[str], log: Path, env: dict[str, str]) -> Proc:
    """A `manage.py` command as a child process."""
    return Proc(name, [PYTHON, "manage.py", *args], log, env=env)


def start_engine(workdir: Path, env: dict[str, str], port: int | None = None) -> tuple[Proc, int]:
    """The local realtime engine as the gateways' upstream (`manage.py realtime_engine`)."""
    port = port or free_port()
    proc = manage("engine", ["realtime_engine", "--host", HOST, "--port", str(port)], workdir / "engine.log", env)
    wait_port(port, 30, proc.proc)
    return proc, port


def start_gateway(workdir: Path, env: dict[str, str], name: str, port: int | None = None) -> tuple[Proc, int]:
    """One `manage.py voice_serve` instance on its own port (INSTANCE_ID = name)."""
    port = port or free_port()
    proc = manage(name, ["voice_serve", "--host", HOST, "--port", str(port), "--no-access-log"],
                  workdir / f"{name}.log", {**env, "INSTANCE_ID": name})
    wait_port(port, 60, proc.proc)
    return proc, port
