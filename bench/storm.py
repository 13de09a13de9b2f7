"""Reconnect-storm bench: N connections at the same instant on the production server pinned to one core, each
timed to `gateway.session.ready`, while M other sessions already stream audio on the same instance.

What another instance's drain or a load balancer's failover sends us. Same method and machinery as
bench/relay.py (echo upstream and load generators on core 0, the gateway `voice_serve --loop uvloop` on core
1, every feature on). The M streaming sessions connect first and stream 40 ms appends at real-time pace; after
a baseline window the storm's N clients (another process, distinct users) all connect at once. Reported:
ready time p50/p95/max, refused (gateway.error code) and failed connections; the streaming sessions' round
trip p99 in the baseline window and during the storm (from the storm's first connect to 1 s after its last
ready), and the difference ("added by the storm"); the server's CPU over the storm, both cores' busy share,
Redis's CPU and the cores it ran on, and the mean of each admission phase (the gateway's
voice_admission_phase_seconds over the storm). Redis is a redis-server of the bench's own on the client core
(`--redis system`: the machine's, unpinned, which the scheduler often runs on the gateway's core).

  .venv/bin/python bench/storm.py                                   # 250 storm + 250 streaming, 3 repeats
  .venv/bin/python bench/storm.py --storm 20 --streaming 20 --repeat 1 --tag smoke   # ~1 min smoke
  .venv/bin/python bench/storm.py --profile 200                     # CPU per admission, sequential
  .venv/bin/python bench/storm.py --profile 200 --cprofile          # + the split by component (cProfile)

`--profile K` opens K sessions one after another (each to ready, then closed) and reports the server's CPU
per admission (its event loop thread and its other threads, from /proc), which does not depend on other
load the way wall-clock figures do. `--cprofile` runs the server under cProfile (thread CPU clock) and splits
the loop thread's CPU per admission between the admission's components.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pstats
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    PYTHON,
    ROOT,
    Server,
    WhereRunning,
    collect_process,
    cpu_busy_seconds,
    fmt,
    free_port,
    gateway_buckets,
    gateway_histogram,
    issue_tokens,
    loadavg,
    machine,
    median,
    own_redis,
    pct,
    pids_of,
    pin_self,
    prepare_db,
    prioritise,
    proc_cpu_seconds,
    setup_django,
    spawn_process,
    table,
    write_result,
)
from bench.relay import (
    _audio_b64,
    _client_listener,
    _loadgen_main,
    _use_loop,
    gateway_env,
    start_targets,
    wait_idle,
)

SPAWN_MARGIN_S = 2.0  # a spawned load-generator process imports and starts its loop within this
# The admission's components, as (file suffix, function) in the loop thread's profile: cumulative CPU each.
COMPONENTS = {
    "websocket handshake (uvicorn/websockets)": ("websockets_sansio_impl.py", "handle_connect"),
    "consumer connect (all below)": ("voice/consumers.py", "websocket_connect"),
    "JWT verify": ("voice/services/auth.py", "identity_from_jwt"),
    "access decision (loop side)": ("voice/services/access.py", "access_decide"),
    "upstream connect (TCP + WS handshake)": ("voice/realtime/openai_upstream.py", "connect"),
    "session ready (rows, Redis, token, event)": ("voice/consumers.py", "session_ready"),
    "resume token (signing)": ("voice/services/sessions.py", "resume_token_issue"),
    "presence + control channel join": ("voice/consumer_supervision.py", "_publish_presence"),
    "Redis commands (redis-py, all)": ("redis/asyncio/client.py", "execute_command"),
    "session end (_finish)": ("voice/consumers.py", "_finish"),
}


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of a process's threads by name (bench/profiled_serve.py names them; the event loop is
    `loop_thread`), plus `other_threads`, the sum of all but the loop's."""
    clk = os.sysconf("SC_CLK_TCK")
    out = {"loop_thread": 0.0, "other_threads": 0.0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                head, rest = f.read().rsplit(")", 1)
        except OSError:
            continue
        fields = rest.split()
        seconds = (int(fields[11]) + int(fields[12])) / clk
        if int(tid) == pid:
            out["loop_thread"] += seconds
            continue
        out["other_threads"] += seconds
        name = "thread " + head.split("(", 1)[1].rstrip("_0123456789")
        out[name] = out.get(name, 0.0) + seconds
    return out


# ==== the storm's own load generator (a process on the client core) =====================================
async def _connect_all(spec: dict[str, Any]) -> dict[str, Any]:
    """Open spec["storm"] sessions at once (no concurrency limit) at spec["start_at"] (monotonic); each is
    timed from its connect to its `gateway.session.ready`. With spec["sequential"], one after another."""
    from picows import WSCloseCode, ws_connect

    url, tokens, n = spec["url"], spec["tokens"], spec["storm"]
    await asyncio.sleep(max(0.0, spec["start_at"] - time.monotonic()))
    st: dict[str, Any] = {"rtts": [], "rtt_at": None, "spikes": [], "reordered": 0, "other_in": 0}

    async def one(i: int) -> tuple[str, float | None, Any]:
        t0 = time.monotonic()
        listener = _client_listener("gateway.session.ready", st, set(), i, t0)
        try:
            transport, client = await ws_connect(listener, f"{url}?token={tokens[i]}", websocket_handshake_timeout=60,
                                                 max_frame_size=2**24)
        except Exception as exc:
            return f"connect_error:{type(exc).__name__}", None, None
        try:
            await asyncio.wait_for(client.ready, 60)
        except RuntimeError as exc:  # a gateway.error before ready: refused
            transport.disconnect()
            return f"refused:{exc}", None, None
        except Exception as exc:
            transport.disconnect()
            return f"error:{type(exc).__name__}", None, None
        return "ready", time.monotonic() - t0, transport

    started = time.monotonic()
    if spec.get("sequential"):
        outcomes = []
        for i in range(n):
            outcome = await one(i)
            outcomes.append(outcome)
            if outcome[2] is not None:
                outcome[2].send_close(WSCloseCode.OK)
                outcome[2].disconnect()
            await asyncio.sleep(spec.get("pause", 0.02))
    else:
        outcomes = await asyncio.gather(*(one(i) for i in range(n)))
    ended = time.monotonic()
    await asyncio.sleep(spec.get("hold", 0.0))
    for _, _, transport in outcomes:
        if transport is not None and not transport.is_disconnected:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
    return {"started_at": started, "ended_at": ended,
            "ready_s": [o[1] for o in outcomes if o[1] is not None],
            "outcomes": [o[0] for o in outcomes]}


def _connect_main(spec: dict[str, Any], out: Any) -> None:
    pin_self(spec.get("cpu"))
    _use_loop("uvloop")
    try:
        out.put(asyncio.run(_connect_all(spec)))
    except Exception as exc:
        out.put({"error": repr(exc)})


# ==== one storm ==============================================================================================
def one_storm(args: argparse.Namespace, server: Server, upstream: Server, rep: int) -> dict[str, Any]:
    settled_s = wait_idle({"uvicorn": server}, upstream)
    tag = f"storm-{time.strftime('%H%M%S')}-{rep}"
    url = f"ws://127.0.0.1:{server.port}/v1/ws/voice"
    m, n = args.streaming, args.storm
    connect_budget = max(2.0, m * 0.05)
    stream_spec: dict[str, Any] = {
        "sessions": m, "warmup": 2.0, "duration": args.baseline + args.storm_window, "grace": 2.0,
        "audio": _audio_b64(), "cpu": args.client_cpu, "connect_concurrency": 16, "connect_budget": connect_budget,
        "pids": {"upstream": upstream.pid, "server": server.pid}, "kind": "gateway", "url": url,
        "tokens": known_user_tokens(f"{tag}-live", m, args.new_users), "timed": True,
    }
    storm_tokens = known_user_tokens(f"{tag}-storm", n, args.new_users)
    storm_at = time.monotonic() + SPAWN_MARGIN_S + connect_budget + 2.0 + args.baseline
    storm_spec = {"storm": n, "url": url, "tokens": storm_tokens, "start_at": storm_at,
                  "cpu": args.client_cpu, "hold": 1.0}
    stream_proc, stream_out = spawn_process(_loadgen_main, stream_spec) if m else (None, None)
    if stream_proc is not None and args.measuring_nice:
        prioritise(stream_proc.pid, args.measuring_nice)
    storm_proc, storm_out = spawn_process(_connect_main, storm_spec)
    if args.storm_nice:
        prioritise(storm_proc.pid, args.storm_nice)
    time.sleep(max(0.0, storm_at - time.monotonic()))
    phases_before = gateway_histogram(server.port, "voice_admission_phase_seconds", "phase")
    lag_before = gateway_buckets(server.port, "voice_event_loop_lag_seconds")
    redis_pids = pids_of("redis-server")
    redis_before = sum(proc_cpu_seconds(pid) for pid in redis_pids)
    redis_where = WhereRunning(redis_pids)
    cpu_before, busy_before, wall_before = proc_cpu_seconds(server.pid), cpu_busy_seconds(), time.monotonic()
    storm = collect_process(storm_proc, storm_out, 180)
    cpu_storm = proc_cpu_seconds(server.pid) - cpu_before
    redis_cores = redis_where.stop()
    redis_cpu = sum(proc_cpu_seconds(pid) for pid in redis_pids) - redis_before
    # Both cores' busy share from the storm's start to its clients' exit (which includes their 1 s hold): a
    # client core near 1.0 means the load generators, not the gateway, set the ready times.
    busy_after, wall = cpu_busy_seconds(), time.monotonic() - wall_before
    core_busy = {core: round((busy_after[core] - busy_before.get(core, 0.0)) / wall, 2) for core in busy_after}
    stream = collect_process(stream_proc, stream_out, 240) if stream_proc else {}
    phases = {phase: (total - phases_before.get(phase, (0.0, 0.0))[0], count - phases_before.get(phase, (0.0, 0.0))[1])
              for phase, (total, count) in gateway_histogram(server.port, "voice_admission_phase_seconds",
                                                             "phase").items()}
    lag_after = gateway_buckets(server.port, "voice_event_loop_lag_seconds")
    if "error" in storm or "error" in stream:
        return {"repeat": rep, "error": storm.get("error") or stream.get("error")}
    ready = sorted(storm["ready_s"])
    refused = [o for o in storm["outcomes"] if o.startswith("refused")]
    failed = [o for o in storm["outcomes"] if o != "ready" and not o.startswith("refused")]
    result: dict[str, Any] = {
        "repeat": rep, "storm": n, "streaming": m, "settled_s": round(settled_s, 1),
        "ready": len(ready), "refused": len(refused), "failed": len(failed),
        "refused_codes": sorted(set(refused))[:5], "failed_reasons": sorted(set(failed))[:5],
        "ready_ms": {"p50": _ms(pct(ready, 50)), "p95": _ms(pct(ready, 95)), "p99": _ms(pct(ready, 99)),
                     "max": _ms(ready[-1] if ready else None)},
        "storm_span_s": storm["ended_at"] - storm["started_at"],
        "server_cpu_s_during_storm": cpu_storm,
        "core_busy_during_storm": core_busy,
        # Every redis-server on the machine (the bench's own with --redis own): its CPU over the storm and the
        # cores it was seen running on (2 ms samples).
        "redis_cpu_s_during_storm": redis_cpu, "redis_running_samples_by_core": redis_cores,
        # Mean wall time of each admission step (the gateway's voice_admission_phase_seconds over this storm;
        # the streaming sessions were admitted before it).
        "admission_phase_mean_ms": {phase: 1000 * total / count for phase, (total, count) in phases.items() if count},
        "server_cpu_ms_per_admission": 1000 * cpu_storm / max(1, n),  # includes the streaming sessions' CPU
        # The gateway's own share of the frames' wait: its 10 ms loop-lag probe over the storm (how many probes
        # fired more than 20 / 50 / 100 ms late). Frames delayed with few late probes waited on the client core.
        "loop_lag_probes_late": _late_probes(lag_before, lag_after),
    }
    if stream:
        rtts, at = stream["rtts"], stream["rtt_at"]
        start, end = storm["started_at"], storm["ended_at"] + 1.0
        base = sorted(r for r, t in zip(rtts, at, strict=True) if start - args.baseline <= t < start)
        during = sorted(r for r, t in zip(rtts, at, strict=True) if start <= t < end)
        result.update({
            "streaming_connected": stream["connected"], "dropped": stream["dropped"],
            "reordered": stream["reordered"], "stream_errors": stream["stream_errors"][:5],
            "rtt_baseline_ms": {"n": len(base), "p50": pct(base, 50), "p99": pct(base, 99)},
            "rtt_during_storm_ms": {"n": len(during), "p50": pct(during, 50), "p99": pct(during, 99),
                                    "max": during[-1] if during else None},
            "storm_window_covered": bool(at) and at[-1] >= end,
        })
        if base and during:
            result["added_p99_by_storm_ms"] = pct(during, 99) - pct(base, 99)
        # When in the storm the frames waited: p99 per 250 ms from the storm's first connect (the handshake
        # burst comes first, then the admissions through the gate).
        buckets: dict[int, list[float]] = {}
        for r, t in zip(rtts, at, strict=True):
            if start <= t < end:
                buckets.setdefault(int((t - start) / BUCKET_S), []).append(r)
        result["rtt_p99_by_250ms_ms"] = [round(pct(buckets.get(i, []), 99) or 0.0, 1)
                                         for i in range(max(buckets) + 1 if buckets else 0)]
        # The gateway's own stalls over the same buckets (its log's "event loop stalled N ms", > 20 ms, the
        # longest per bucket): a bucket whose frames waited while the gateway did not stall waited elsewhere.
        result["gateway_stall_max_by_250ms_ms"] = _stalls_by_bucket(
            server.log_path, start, end, len(result["rtt_p99_by_250ms_ms"]))
    return result


BUCKET_S = 0.25  # the storm's time buckets: the frames' p99 and the gateway's stalls per 250 ms
_STALL_LINE = re.compile(r"^(\S+Z) \[warning\s*\] event loop stalled (\d+) ms")


def _stalls_by_bucket(log: Path, start: float, end: float, buckets: int) -> list[int]:
    """The longest stall the gateway logged in each bucket from `start` (monotonic, like `end`)."""
    to_wall = time.time() - time.monotonic()  # CLOCK_MONOTONIC is system-wide: the storm's clock is ours
    longest = [0] * buckets
    for line in log.read_text(errors="replace").splitlines():
        found = _STALL_LINE.match(line)
        if not found:
            continue
        at = datetime.fromisoformat(found[1].replace("Z", "+00:00")).timestamp() - to_wall
        index = int((at - start) / BUCKET_S)
        if start <= at < end and index < buckets:
            longest[index] = max(longest[index], int(found[2]))
    return longest


def _late_probes(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    delta = {le: after.get(le, 0.0) - before.get(le, 0.0) for le in after}
    total = delta.get("+Inf", 0.0)
    return {"probes": total, **{f"over_{int(float(le) * 1000)}ms": total - delta.get(le, 0.0)
                                for le in ("0.02", "0.05", "0.1")}}


def known_user_tokens(prefix: str, count: int, new_users: bool) -> list[str]:
    """Tokens of `count` distinct users; unless `new_users`, their local user rows exist already, as for the
    users of a reconnect storm (a first connection also creates the user and profile rows)."""
    tokens = issue_tokens(prefix, count)
    if not new_users:
        from voice.services.users import user_for_identity

        for i in range(count):
            user_for_identity(external_id=f"{prefix}-{i}", plan="elite")
    return tokens


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


# ==== sequential admissions: CPU per admission =================================================================
def profile_admissions(args: argparse.Namespace, upstream_url: str, upstream: Server) -> dict[str, Any]:
    """K sessions one after another: the server's CPU per admission (+ the cProfile split)."""
    port = free_port()
    profile_path = Path(f"/tmp/bench-storm-profile-{port}.prof")
    env = gateway_env(upstream_url, args.db)
    cmd = [PYTHON, str(ROOT / "bench" / "profiled_serve.py"), "--port", str(port)]
    if args.cprofile:
        cmd += ["--out", str(profile_path)]
    server = Server("gateway-profile", cmd, port, env=env, cpu=args.server_cpu).wait_ready()
    url = f"ws://127.0.0.1:{port}/v1/ws/voice"
    try:
        warm = {"storm": 20, "url": url, "tokens": issue_tokens("warm-" + time.strftime("%H%M%S"), 20),
                "start_at": 0.0, "cpu": args.client_cpu, "sequential": True}
        collect_process(*spawn_process(_connect_main, warm), 120)  # first-use costs (pools, caches, imports) not billed
        time.sleep(1.0)
        k = args.profile
        spec = {"storm": k, "url": url, "tokens": known_user_tokens("prof-" + time.strftime("%H%M%S"), k,
                                                                   args.new_users),
                "start_at": 0.0, "cpu": args.client_cpu, "sequential": True, "pause": 0.02}
        proc, out = spawn_process(_connect_main, spec)
        time.sleep(SPAWN_MARGIN_S)
        before, total_before = thread_cpu_seconds(server.pid), proc_cpu_seconds(server.pid)
        result = collect_process(proc, out, 60 + k)
        time.sleep(1.0)  # the last session's end
        after, total_after = thread_cpu_seconds(server.pid), proc_cpu_seconds(server.pid)
    finally:
        server.stop()
    admitted = max(1, result.get("outcomes", []).count("ready"))
    report: dict[str, Any] = {
        "admissions": k, "ready": admitted, "cprofile": args.cprofile,
        "cpu_ms_per_admission": {
            "process": 1000 * (total_after - total_before) / admitted,
            **{name: 1000 * (after[name] - before.get(name, 0.0)) / admitted for name in after},
        },
        "ready_ms_sequential": {"p50": _ms(pct(result.get("ready_s", []), 50)),
                                "p95": _ms(pct(result.get("ready_s", []), 95))},
    }
    if args.cprofile and profile_path.exists():
        report["components_loop_cpu_ms_per_admission"] = _components(profile_path, admitted + 20)
        report["top_tottime"] = _top(profile_path, 30)
    return report


def _components(path: Path, admissions: int) -> dict[str, float]:
    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    out = {}
    for label, (suffix, name) in COMPONENTS.items():
        cumulative = sum(ct for (file, _, func), (_, _, _, ct, _) in stats.items()
                         if func == name and file.endswith(suffix))
        out[label] = 1000 * cumulative / admissions
    total = sum(tottime for (_, _, tottime, _, _) in stats.values())
    out["loop thread total (profiled, all work)"] = 1000 * total / admissions
    return out


def _top(path: Path, n: int) -> list[list[Any]]:
    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    return [[f"{Path(file).name}:{line}:{func}", calls, round(tt * 1000, 1), round(ct * 1000, 1)]
            for (file, line, func), (_, calls, tt, ct, _) in rows]


# ==== main ====================================================================================================
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storm", type=int, default=250, help="connections opened at the same instant")
    parser.add_argument("--streaming", type=int, default=250, help="sessions already streaming audio")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", type=float, default=5.0, help="seconds of streaming measured before")
    parser.add_argument("--storm-window", type=float, default=15.0, help="seconds streamed from the storm on")
    parser.add_argument("--profile", type=int, default=0, help="K sequential admissions: CPU per admission")
    parser.add_argument("--cprofile", action="store_true", help="with --profile: the split by component")
    parser.add_argument("--new-users", action="store_true",
                        help="first connections of new users (their user rows are created at admission)")
    parser.add_argument("--server-cpu", type=int, default=1)
    parser.add_argument("--client-cpu", type=int, default=0)
    parser.add_argument("--db", default="/tmp/bench-storm.sqlite3")
    parser.add_argument("--redis", choices=("own", "system"), default="own",
                        help="own: a redis-server of the bench's, pinned to the client core; system: 127.0.0.1:6379")
    parser.add_argument("--upstream-setup-ms", type=float, default=0.0,
                        help="the upstream sends session.created and session.updated each this late (OpenAI is a "
                             "network round trip away; 0: a local upstream)")
    parser.add_argument("--stand-in-nice", type=int, default=-10,
                        help="nice of the bench's Redis and upstream (stand-ins for other machines) on the client "
                             "core; 0: the load generators' priority (before 2026-12-04)")
    parser.add_argument("--measuring-nice", type=int, default=-5,
                        help="nice of the streaming sessions' client (it measures their frames) on the client core, "
                             "above the storm's clients; 0: the same priority (before 2026-12-04)")
    parser.add_argument("--storm-nice", type=int, default=0, help="nice of the storm's clients on the client core")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    args.server_cpu = None if args.server_cpu < 0 else args.server_cpu
    args.client_cpu = None if args.client_cpu < 0 else args.client_cpu
    with own_redis(args.client_cpu, args.stand_in_nice) if args.redis == "own" else contextlib.nullcontext():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    started = time.time()
    prepare_db(args.db)
    setup_django(args.db)
    pin_self(args.client_cpu)
    info = machine()
    upstream_port = free_port()
    upstream_url = f"ws://127.0.0.1:{upstream_port}/v1/realtime"
    upstream = Server("echo-upstream", [PYTHON, str(ROOT / "bench" / "relay.py"), "upstream", "--port",
                                        str(upstream_port), "--setup-ms", str(args.upstream_setup_ms)],
                      upstream_port, cpu=args.client_cpu).wait_ready()
    if args.stand_in_nice:
        prioritise(upstream.pid, args.stand_in_nice)
    payload: dict[str, Any] = {"bench": "storm", "args": vars(args), "machine": info}
    try:
        if args.profile:
            payload["profile"] = profile_admissions(args, upstream_url, upstream)
        else:
            servers = start_targets(["uvicorn"], upstream_url, args.server_cpu, upstream_port, False, args.db)
            try:
                runs = []
                for rep in range(args.repeat):
                    run = one_storm(args, servers["uvicorn"], upstream, rep)
                    runs.append(run)
                    print(f"rep {rep}: ready {run.get('ready')}/{args.storm} refused {run.get('refused')} failed "
                          f"{run.get('failed')} ready p50/p95 {fmt(run.get('ready_ms', {}).get('p50'), 0)}/"
                          f"{fmt(run.get('ready_ms', {}).get('p95'), 0)} ms; streaming p99 "
                          f"{fmt(run.get('rtt_baseline_ms', {}).get('p99'))} -> "
                          f"{fmt(run.get('rtt_during_storm_ms', {}).get('p99'))} ms (added "
                          f"{fmt(run.get('added_p99_by_storm_ms'))}) dropped {run.get('dropped')} "
                          f"p99 per 250 ms {run.get('rtt_p99_by_250ms_ms')} "
                          f"gateway stalls per 250 ms {run.get('gateway_stall_max_by_250ms_ms')} "
                          f"late probes {run.get('loop_lag_probes_late')} "
                          f"cores busy {run.get('core_busy_during_storm')} load {loadavg()}"
                          + (f" ERROR {run['error']}" if run.get("error") else ""), flush=True)
                payload["runs"] = runs
                ok = [r for r in runs if not r.get("error")]
                payload["summary"] = {
                    "ready_p50_ms": median([r["ready_ms"]["p50"] for r in ok]),
                    "ready_p95_ms": median([r["ready_ms"]["p95"] for r in ok]),
                    "refused": sum(r["refused"] for r in ok), "failed": sum(r["failed"] for r in ok),
                    "added_p99_by_storm_ms": median([r.get("added_p99_by_storm_ms") for r in ok]),
                    "dropped": sum(r.get("dropped", 0) for r in ok),
                    "goal": "all ready with p95 <= 1000 ms, 0 refused, streaming sessions' added p99 <= 50 ms",
                }
            finally:
                for server in servers.values():
                    server.stop()
    finally:
        upstream.stop()
    payload["elapsed_s"] = time.time() - started
    payload["loadavg_at_end"] = loadavg()
    name = "storm-profile" if args.profile else "storm"
    path = write_result(name + (f"-{args.tag}" if args.tag else ""), payload)
    if args.profile:
        prof = payload["profile"]
        print(table(["CPU ms per admission", "value"],
                    [[k, fmt(v, 2)] for k, v in prof["cpu_ms_per_admission"].items()]))
        if "components_loop_cpu_ms_per_admission" in prof:
            print(table(["component (loop thread, profiled)", "CPU ms / admission"],
                        [[k, fmt(v, 3)] for k, v in prof["components_loop_cpu_ms_per_admission"].items()]))
            print(table(["function", "calls", "tottime ms", "cumtime ms"], prof["top_tottime"]))
    else:
        print(payload.get("summary"))
    print(f"\nraw results: {path.relative_to(ROOT)}  ({payload['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
