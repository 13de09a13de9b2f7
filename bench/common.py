"""Shared helpers for the benches: environment, throwaway database, servers, CPU/RSS probes, statistics.

Every bench runs against a throwaway SQLite file and Redis database 13 (never the dev data), starts its
servers as subprocesses (optionally pinned with `taskset`), and writes raw results to bench/results/.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploy.processes import Proc, free_port, wait_port  # the benches import free_port and wait_port from here

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
SHARED_AUDIO = ROOT.parent / "shared" / "audio"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# --- environment -------------------------------------------------------------------------------------
def bench_env(db_path: str = "/tmp/bench.sqlite3", **extra: Any) -> dict[str, str]:
    """The environment of a gateway started for a bench (and of the bench process itself)."""
    env = dict(os.environ)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "intelia_voice.settings",
            "DATABASE_URL": f"sqlite:///{db_path}",
            "ENABLE_VOICE_REALTIME": "true",
            "DEBUG": "false",
            "LOG_LEVEL": "WARNING",
            "LOG_FORMAT": "console",
            "SENTRY_DSN": "",
            "REDIS_URL": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"),
            "MAX_SESSIONS_PER_USER_PER_HOUR": "100000",
            "MAX_SESSION_DURATION": "3600",
            "METRICS_SPOOL_DIR": db_path + ".spool",  # per bench database: records of another one never replay
            "RAG_LOCAL_INDEX": "/tmp/bench-knowledge.sqlite3",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def setup_django(db_path: str = "/tmp/bench.sqlite3", **extra: Any) -> None:
    """Configure this process like the bench servers (for tokens, access checks) and set up Django."""
    os.environ.update(bench_env(db_path, **extra))
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def prepare_db(db_path: str = "/tmp/bench.sqlite3", *, fresh: bool = True) -> None:
    """Migrate a throwaway SQLite file and open the rollout to 100 % (sessions are admitted)."""
    if fresh:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(db_path + suffix)
        shutil.rmtree(db_path + ".spool", ignore_errors=True)
    env = bench_env(db_path)
    subprocess.run([PYTHON, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True)
    snippet = (
        "from voice.models import VoiceRollout;"
        "VoiceRollout.objects.update_or_create(pk=1, defaults={'percentage': 100, 'voice_enabled': True})"
    )
    subprocess.run([PYTHON, "manage.py", "shell", "-c", snippet], cwd=ROOT, env=env, check=True)


def issue_tokens(prefix: str, count: int, plan: str = "elite") -> list[str]:
    """Access JWTs for `count` distinct users (one live session per user is allowed). Needs setup_django."""
    from voice.services.auth import issue_access_token

    return [issue_access_token(user_id=f"{prefix}-{i}", plan=plan, minutes=240) for i in range(count)]


# --- processes -----------------------------------------------------------------------------------------
def pin_cmd(cmd: list[str], cpu: int | None) -> list[str]:
    """Prefix `taskset -c CPU` (exec's the command: the pid stays the server's)."""
    if cpu is None or shutil.which("taskset") is None or (os.cpu_count() or 1) <= cpu:
        return cmd
    return ["taskset", "-c", str(cpu), *cmd]


def pin_self(cpu: int | None) -> None:
    if cpu is not None and (os.cpu_count() or 1) > cpu:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {cpu})


class Server:
    """A subprocess server (gateway, relay, upstream) with CPU and RSS probes."""

    def __init__(self, name: str, cmd: list[str], port: int, *, env: dict[str, str] | None = None,
                 cpu: int | None = None, log: Path | None = None) -> None:
        self.name, self.port = name, port
        self.log_path = log or Path(f"/tmp/bench-{name}-{port}.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(pin_cmd(cmd, cpu), cwd=ROOT, env=env or bench_env(),
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 30.0) -> Server:
        try:
            wait_port(self.port, timeout, self.proc)
        except RuntimeError:
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} did not start:\n{tail}") from None
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def rss_mb(self) -> float:
        return proc_rss_mb(self.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def prioritise(pid: int, nice: int) -> None:
    """Set a bench process's nice on the shared client core. What stands in for another machine (the bench's
    Redis, the upstream standing in for OpenAI) and the client that measures the live sessions' frames must
    not wait for the storm's load generator's turn: in production none of them shares a core with it
    (2026-12-04: on a busy client core that wait was most of a storm's admission time, and the frames' p99 in
    the storm's first 250 ms while the gateway's own loop was rarely late). Needs root for nice < 0;
    otherwise the priority is left as is."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    except OSError as exc:
        print(f"priority not set for pid {pid}: {exc}", file=sys.stderr)


@contextlib.contextmanager
def own_redis(cpu: int | None, nice: int = 0) -> Iterator[str]:
    """A throwaway redis-server on a free port, pinned to `cpu` (the load generator's core), for the duration
    of a bench: its URL is exported as BENCH_REDIS_URL, which bench_env hands to every server started after.

    Why: the machine's Redis is unpinned, and the scheduler often wakes it on the core of the process that
    wrote to it, i.e. the gateway's pinned core; in a storm its work (hundreds of admissions' scripts) is
    then taken from the gateway's core. In production Redis runs on its own machine."""
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--maxclients", "20000"]
    redis = Proc("bench-redis", pin_cmd(cmd, cpu), Path(f"/tmp/bench-redis-{port}.log"))
    previous = os.environ.get("BENCH_REDIS_URL")
    try:
        wait_port(port, 10, redis.proc)
        if nice:
            prioritise(redis.pid, nice)
        os.environ["BENCH_REDIS_URL"] = f"redis://127.0.0.1:{port}/13"
        yield os.environ["BENCH_REDIS_URL"]
    finally:
        if previous is None:
            os.environ.pop("BENCH_REDIS_URL", None)
        else:
            os.environ["BENCH_REDIS_URL"] = previous
        redis.stop(10)


def spawn_process(target: Any, spec: dict[str, Any]) -> tuple[Any, Any]:
    """Start `target(spec, out)` in a fresh (spawned) process; returns (process, its result queue)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=target, args=(spec, out))
    proc.start()
    return proc, out


def collect_process(proc: Any, out: Any, timeout: float) -> dict[str, Any]:
    """The result a spawned process put on its queue; the process is then reaped (killed if it hangs)."""
    try:
        return out.get(timeout=timeout)
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE / 1e6


def _metrics_lines(port: int, timeout: float) -> list[str]:
    """A gateway's /metrics, line by line ([] when it does not answer)."""
    import urllib.request

    with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                                              timeout=timeout) as response:
        return response.read().decode().splitlines()
    return []


def gateway_gauges(port: int, names: tuple[str, ...], timeout: float = 2.0) -> dict[str, float | None]:
    """Unlabelled gauges of a gateway's /metrics (e.g. voice_event_loop_tasks): what /proc cannot see."""
    values: dict[str, float | None] = dict.fromkeys(names)
    for line in _metrics_lines(port, timeout):
        name, _, value = line.partition(" ")
        if name in values:
            values[name] = float(value)
    return values


def gateway_histogram(port: int, name: str, label: str, timeout: float = 2.0) -> dict[str, tuple[float, float]]:
    """{label value: (sum, count)} of a labelled histogram on a gateway's /metrics (e.g. the admission phases)."""
    import re

    out: dict[str, list[float]] = {}
    pattern = re.compile(rf'^{name}_(sum|count){{{label}="([^"]*)"}} (\S+)$')
    for line in _metrics_lines(port, timeout):
        match = pattern.match(line)
        if match:
            kind, key, value = match.groups()
            out.setdefault(key, [0.0, 0.0])[kind == "count"] = float(value)
    return {key: (pair[0], pair[1]) for key, pair in out.items()}


def gateway_buckets(port: int, name: str, timeout: float = 2.0) -> dict[str, float]:
    """{le: cumulative count} of an unlabelled histogram on a gateway's /metrics (e.g. the loop lag)."""
    import re

    pattern = re.compile(rf'^{name}_bucket{{le="([^"]*)"}} (\S+)$')
    return {match.group(1): float(match.group(2))
            for match in map(pattern.match, _metrics_lines(port, timeout)) if match}


def cpu_busy_seconds() -> dict[int, float]:
    """Busy time of each core since boot (user+nice+system+irq+softirq+steal), from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                v = [int(x) for x in vals]
                out[int(name[3:])] = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLK_TCK
    return out


class WhereRunning:
    """Samples which core the threads of some processes run on (state R in /proc/<pid>/task/*/stat, field 39),
    every `every` seconds in a background thread: {core: samples} when stopped. Tells whether an unpinned helper
    (Redis) ran on the gateway's pinned core."""

    def __init__(self, pids: list[int], every: float = 0.002) -> None:
        import threading

        self.pids, self.every, self.counts = pids, every, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            for pid in self.pids:
                with contextlib.suppress(OSError):
                    for tid in os.listdir(f"/proc/{pid}/task"):
                        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/stat") as f:
                            fields = f.read().rsplit(")", 1)[1].split()
                        if fields[0] == "R":
                            core = int(fields[36])
                            self.counts[core] = self.counts.get(core, 0) + 1

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._thread.join(2)
        return dict(sorted(self.counts.items()))


def pids_of(name: str) -> list[int]:
    """Pids of the processes whose command name is `name` (e.g. redis-server)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/comm") as f:
                if f.read().strip() == name:
                    found.append(int(entry))
    return found


def loadavg() -> list[float]:
    return [float(x) for x in open("/proc/loadavg").read().split()[:3]]


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "kernel": platform.release(), "loadavg_at_start": loadavg()}


# --- statistics ----------------------------------------------------------------------------------------
def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary(values: list[float]) -> dict[str, float | int | None]:
    ordered = sorted(values)
    return {"n": len(ordered), "p50": pct(ordered, 50), "p95": pct(ordered, 95), "p99": pct(ordered, 99),
            "max": ordered[-1] if ordered else None}


def median(values: list[float | None]) -> float | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def rnd(value: Any, digits: int = 2) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rnd(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rnd(v, digits) for v in value]
    return value


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """bench/results/<name>-<timestamp>.json plus <name>-latest.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{name}-{stamp}.json"
    text = json.dumps(rnd(payload, 3), indent=1, ensure_ascii=False)
    path.write_text(text)
    (RESULTS / f"{name}-latest.json").write_text(text)
    return path


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(out)
