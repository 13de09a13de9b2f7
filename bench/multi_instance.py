"""Multi-instance bench: two gateway processes sharing one Redis and one database behave as one service.

Two `manage.py voice_serve --loop uvloop` processes on two ports (unpinned by default; `--pin` puts
instance A on core 0 and B on core 1) share Redis database 13 (state, rate limits, channel layer) and one
throwaway SQLite database (DATABASE_URL), and relay to the echo upstream of bench/relay.py
(`relay.py upstream`: session handshake, one audio delta back per append). Checks:

  relay       N sessions (default 100), round-robin over both instances, stream 40 ms frames at real-time
              pace; every frame's echo is matched (bench/relay.py's client): dropped / reordered frames and
              round-trip percentiles per instance. PASS: all connected, 0 dropped, 0 reordered.
  rate limit  both instances run with MAX_SESSIONS_PER_USER_PER_HOUR=5. One user opens sessions alternately
              on A and B (open, wait for gateway.session.ready, close); sessions 1-5 must be admitted, the
              6th (on B) and a 7th (on A) refused with gateway.error rate_limited and close 4429.
  kill switch M live, streaming sessions (default 40, half per instance); `manage.py voice_rollout
              --disable` runs against the same database and Redis. The moment the row flips is observed by
              polling the SQLite row every 2 ms; every client records when it is closed and with which
              code. PASS: every session closed with 4503 (after gateway.error feature_disabled) within 1 s
              of the flip, on both instances; while disabled, new connections are refused 4503 on both;
              after `voice_rollout --enable` (and the 1 s rollout cache) new sessions are admitted on both.

  .venv/bin/python bench/multi_instance.py                    # ~1.5 min
  .venv/bin/python bench/multi_instance.py --sessions 200 --pin
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    PYTHON,
    ROOT,
    Server,
    bench_env,
    fmt,
    free_port,
    issue_tokens,
    loadavg,
    machine,
    pct,
    prepare_db,
    setup_django,
    table,
    write_result,
)
from bench.relay import _audio_b64, _client_session

RATE_LIMIT = 5
KILL_BUDGET_S = 1.0
FRAME_BYTES = 1920


# ==== clients ===================================================================================================
async def _open(url: str, token: str, timeout: float = 20) -> tuple[Any, dict[str, Any]]:
    """Connect; return (ws, first decisive event: gateway.session.ready or gateway.error)."""
    from websockets.asyncio.client import connect

    ws = await connect(f"{url}?token={token}", max_size=None, open_timeout=timeout, proxy=None, compression=None,
                       ping_interval=None)
    deadline = time.monotonic() + timeout
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic())))
        if event.get("type") in ("gateway.session.ready", "gateway.error"):
            return ws, event


async def _close_code(ws: Any, timeout: float = 5) -> int | None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.wait_closed(), timeout)
    return ws.close_code


async def attempt(url: str, token: str) -> dict[str, Any]:
    """One session attempt: admitted (then closed by us) or refused (code + close code)."""
    try:
        ws, event = await _open(url, token)
    except Exception as exc:
        return {"outcome": "error", "error": repr(exc)[:160]}
    if event["type"] == "gateway.session.ready":
        await ws.close()
        return {"outcome": "admitted", "close_code": ws.close_code}
    return {"outcome": "refused", "code": event.get("code"), "close_code": await _close_code(ws)}


async def check_rate_limit(urls: list[str], token: str) -> dict[str, Any]:
    attempts = []
    for k in range(RATE_LIMIT + 2):
        inst = k % 2
        for _retry in range(20):
            result = await attempt(urls[inst], token)
            # The previous session's concurrency slot is released just after its close: retry a 4409.
            if result.get("code") != "concurrent_session":
                break
            await asyncio.sleep(0.25)
        result.update(n=k + 1, instance="AB"[inst])
        attempts.append(result)
        await asyncio.sleep(0.2)
    admitted_ok = all(a["outcome"] == "admitted" for a in attempts[:RATE_LIMIT])
    refused_ok = all(a["outcome"] == "refused" and a.get("code") == "rate_limited" and a.get("close_code") == 4429
                     for a in attempts[RATE_LIMIT:])
    return {"attempts": attempts, "verdict": "PASS" if admitted_ok and refused_ok else "FAIL"}


class RowWatcher(threading.Thread):
    """Polls the rollout row in SQLite: the monotonic time voice_enabled changes to `want`."""

    def __init__(self, db: str, want: int) -> None:
        super().__init__(daemon=True)
        self.db, self.want, self.flipped_at, self.stop = db, want, None, False

    def run(self) -> None:
        conn = sqlite3.connect(self.db, timeout=5)
        try:
            while not self.stop:
                with contextlib.suppress(sqlite3.Error):
                    row = conn.execute("SELECT voice_enabled FROM voice_voicerollout WHERE id = 1").fetchone()
                    if row is not None and int(row[0]) == self.want:
                        self.flipped_at = time.monotonic()
                        return
                time.sleep(0.002)
        finally:
            conn.close()


async def live_session(url: str, token: str, out: dict[str, Any], ready: asyncio.Event) -> None:
    """A streaming session that records when and how the server ends it."""
    from websockets.exceptions import ConnectionClosed

    silence = base64.b64encode(bytes(FRAME_BYTES)).decode()
    try:
        ws, event = await _open(url, token)
    except Exception as exc:
        out["error"] = repr(exc)[:160]
        return
    if event["type"] != "gateway.session.ready":
        out["error"] = f"refused {event.get('code')}"
        return
    out["ready"] = True

    async def reader() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                if '"gateway.error"' in raw[:40]:
                    out["error_event"] = json.loads(raw).get("code")
                    out["error_event_at"] = time.monotonic()
        out["closed_at"] = time.monotonic()
        out["close_code"] = ws.close_code

    task = asyncio.create_task(reader())
    clock = time.monotonic()
    with contextlib.suppress(ConnectionClosed):
        while not task.done() and not ready.is_set():
            clock += 0.04
            await asyncio.sleep(max(0.0, clock - time.monotonic()))
            await ws.send('{"type":"input_audio_buffer.append","audio":"' + silence + '"}')
    with contextlib.suppress(Exception):
        await asyncio.wait_for(task, 10)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.close(), 2)


async def _run_cmd(*argv: str, env: dict[str, str]) -> tuple[int, str, float, float]:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")[-500:], started, time.monotonic()


async def check_kill_switch(urls: list[str], tokens: list[str], probe_tokens: list[str], db: str,
                            env: dict[str, str]) -> dict[str, Any]:
    outs = [{"instance": "AB"[i % 2]} for i in range(len(tokens))]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(live_session(urls[i % 2], tok, outs[i], stop)) for i, tok in enumerate(tokens)]
    deadline = time.monotonic() + 60
    while sum(1 for o in outs if o.get("ready") or o.get("error")) < len(outs) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(2.0)  # every session has joined the broadcast group (first presence publish)
    live = sum(1 for o in outs if o.get("ready") and "closed_at" not in o)
    watcher = RowWatcher(db, want=0)
    watcher.start()
    rc, text, cmd_start, cmd_end = await _run_cmd(PYTHON, "manage.py", "voice_rollout", "--disable", env=env)
    wait_until = time.monotonic() + 10
    while any(o.get("ready") and "closed_at" not in o for o in outs) and time.monotonic() < wait_until:
        await asyncio.sleep(0.02)
    watcher.stop = True
    flip = watcher.flipped_at
    # While disabled: a new connection on each instance must be refused with 4503.
    refused = [dict(await attempt(urls[i], probe_tokens[i]), instance="AB"[i]) for i in range(2)]
    rc2, text2, en_start, en_end = await _run_cmd(PYTHON, "manage.py", "voice_rollout", "--enable", env=env)
    await asyncio.sleep(1.5)  # each instance re-reads the row at most once a second
    admitted = [dict(await attempt(urls[i], probe_tokens[2 + i]), instance="AB"[i]) for i in range(2)]
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

    ref = flip if flip is not None else cmd_start
    per_instance: dict[str, Any] = {}
    for inst in "AB":
        group = [o for o in outs if o["instance"] == inst and o.get("ready")]
        delays = [(o["closed_at"] - ref) for o in group if "closed_at" in o]
        per_instance[inst] = {
            "live": len(group), "closed": len(delays),
            "close_codes": sorted({o.get("close_code") for o in group}, key=str),
            "error_events": sorted({str(o.get("error_event")) for o in group}),
            "first_close_s": min(delays) if delays else None, "last_close_s": max(delays) if delays else None,
            "p50_close_s": pct(delays, 50),
        }
    all_closed = all(p["closed"] == p["live"] and p["live"] > 0 for p in per_instance.values())
    codes_ok = all(p["close_codes"] == [4503] and p["error_events"] == ["feature_disabled"]
                   for p in per_instance.values())
    last = max((p["last_close_s"] for p in per_instance.values() if p["last_close_s"] is not None), default=None)
    in_budget = last is not None and last <= KILL_BUDGET_S
    refused_ok = all(r["outcome"] == "refused" and r.get("code") == "feature_disabled" and r.get("close_code") == 4503
                     for r in refused)
    admitted_ok = all(r["outcome"] == "admitted" for r in admitted)
    return {
        "sessions": len(tokens), "live_at_switch": live, "per_instance": per_instance,
        "reference": "row flip (2 ms SQLite poll)" if flip is not None else "command start (row flip not seen)",
        "row_flip_after_cmd_start_s": (flip - cmd_start) if flip is not None else None,
        "cmd_disable_s": cmd_end - cmd_start, "cmd_disable_exit_after_flip_s": (cmd_end - flip) if flip else None,
        "cmd_disable_rc": rc, "cmd_disable_output": text.strip()[-200:],
        "cmd_enable_rc": rc2, "cmd_enable_output": text2.strip()[-200:], "cmd_enable_s": en_end - en_start,
        "last_close_after_flip_s": last,
        "while_disabled_new_connections": refused, "after_enable_new_connections": admitted,
        "verdicts": {
            "all_closed": "PASS" if all_closed else "FAIL",
            "close_4503_after_feature_disabled": "PASS" if codes_ok else "FAIL",
            "last_close_within_1s": "PASS" if in_budget else "FAIL",
            "refused_4503_while_disabled": "PASS" if refused_ok else "FAIL",
            "admitted_after_enable": "PASS" if admitted_ok else "FAIL",
        },
        "verdict": "PASS" if all_closed and codes_ok and in_budget and refused_ok and admitted_ok else "FAIL",
        "errors": [o.get("error") for o in outs if o.get("error")][:5],
    }


async def check_relay(urls: list[str], tokens: list[str], duration: float, warmup: float) -> dict[str, Any]:
    n = len(tokens)
    audio = _audio_b64()
    specs = [{"kind": "gateway", "url": url, "audio": audio, "warmup": warmup, "duration": duration, "grace": 2.0,
              "sessions": n} for url in urls]
    stats = [{"rtts": [], "lateness": [], "sent": 0, "dropped": 0, "reordered": 0, "connected": 0, "other_in": 0,
              "late_start": 0, "spikes": [], "connect_errors": [], "stream_errors": []} for _ in urls]
    sem = asyncio.Semaphore(16)
    t0 = time.monotonic() + max(3.0, n * 0.03)
    await asyncio.gather(*(_client_session(i, specs[i % 2], tok, t0, stats[i % 2], sem)
                           for i, tok in enumerate(tokens)))
    per_instance = {}
    for k, st in enumerate(stats):
        expected = len(range(k, n, 2))
        per_instance["AB"[k]] = {
            "sessions": expected, "connected": st["connected"], "frames_measured": st["sent"],
            "dropped": st["dropped"], "reordered": st["reordered"],
            "rtt_ms": {"p50": pct(st["rtts"], 50), "p95": pct(st["rtts"], 95), "p99": pct(st["rtts"], 99),
                       "max": max(st["rtts"]) if st["rtts"] else None},
            "client_lateness_p99_ms": pct(st["lateness"], 99),
            "connect_errors": st["connect_errors"][:3], "stream_errors": st["stream_errors"][:3],
        }
    ok = all(p["connected"] == p["sessions"] and p["dropped"] == 0 and p["reordered"] == 0 and p["frames_measured"]
             for p in per_instance.values())
    return {"sessions": n, "duration_s": duration, "per_instance": per_instance, "verdict": "PASS" if ok else "FAIL"}


# ==== orchestration ===============================================================================================
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=100, help="relay check: sessions over both instances")
    parser.add_argument("--kill-sessions", type=int, default=40, help="kill-switch check: live sessions")
    parser.add_argument("--duration", type=float, default=20.0, help="relay check: measured seconds")
    parser.add_argument("--pin", action="store_true", help="instance A on core 0, B on core 1")
    parser.add_argument("--db", default="/tmp/bench-multi.sqlite3")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    started = time.time()
    prepare_db(args.db)
    setup_django(args.db)
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    info = machine()
    tag = time.strftime("%H%M%S")
    up_port = free_port()
    upstream = Server("multi-upstream", [PYTHON, str(ROOT / "bench" / "relay.py"), "upstream", "--port", str(up_port)],
                      up_port, env=bench_env(args.db))
    gw_env = bench_env(args.db, VOICE_UPSTREAM="openai", OPENAI_REALTIME_URL=f"ws://127.0.0.1:{up_port}/v1/realtime",
                       OPENAI_API_KEY="x", RAG_BACKEND="off", MAX_SESSIONS_PER_USER_PER_HOUR=RATE_LIMIT)
    gateways: list[Server] = []
    results: dict[str, Any] = {}
    try:
        upstream.wait_ready()
        for k in range(2):
            port = free_port()
            gateways.append(Server(f"multi-gw-{'AB'[k]}", [PYTHON, "manage.py", "voice_serve", "--host", "127.0.0.1",
                                                            "--port", str(port), "--loop", "uvloop", "--no-access-log"],
                                   port, env=gw_env, cpu=k if args.pin else None))
        for gw in gateways:
            gw.wait_ready()
        urls = [f"ws://127.0.0.1:{gw.port}/v1/ws/voice" for gw in gateways]
        time.sleep(0.5)

        load = loadavg()[0]
        tokens = issue_tokens(f"multi-{tag}-relay", args.sessions)
        results["relay"] = asyncio.run(check_relay(urls, tokens, args.duration, 2.0))
        results["relay"]["loadavg_before"] = load
        print(f"relay: {results['relay']['verdict']} "
              + json.dumps({k: {x: v[x] for x in ('connected', 'dropped', 'reordered', 'rtt_ms')}
                            for k, v in results["relay"]["per_instance"].items()}), flush=True)

        rl_token = issue_tokens(f"multi-{tag}-ratelimit", 1)[0]
        results["rate_limit"] = asyncio.run(check_rate_limit(urls, rl_token))
        print(f"rate limit: {results['rate_limit']['verdict']} "
              + json.dumps([(a["n"], a["instance"], a["outcome"], a.get("code"), a.get("close_code"))
                            for a in results["rate_limit"]["attempts"]]), flush=True)

        kill_tokens = issue_tokens(f"multi-{tag}-kill", args.kill_sessions)
        probe_tokens = issue_tokens(f"multi-{tag}-probe", 4)
        results["kill_switch"] = asyncio.run(check_kill_switch(urls, kill_tokens, probe_tokens, args.db,
                                                               bench_env(args.db)))
        ks = results["kill_switch"]
        print(f"kill switch: {ks['verdict']} last close {ks['last_close_after_flip_s']} s after the row flip; "
              + json.dumps(ks["per_instance"]) + " " + json.dumps(ks["verdicts"]), flush=True)
    finally:
        for gw in gateways:
            gw.stop()
        upstream.stop()
        # Never leave the shared throwaway DB with the kill switch engaged.
        subprocess.run([PYTHON, "manage.py", "voice_rollout", "--enable"], cwd=ROOT, env=bench_env(args.db),
                       capture_output=True, check=False)

    logs = {gw.name: gw.log_path.read_text(errors="replace")[-1500:] for gw in gateways}
    payload = {"bench": "multi_instance", "args": vars(args), "machine": info, "loadavg_at_end": loadavg(),
               "elapsed_s": time.time() - started, "results": results, "gateway_log_tails": logs}
    path = write_result("multi-instance" + (f"-{args.tag}" if args.tag else ""), payload)

    relay, rl, ks = results["relay"], results["rate_limit"], results["kill_switch"]
    a, b = relay["per_instance"]["A"], relay["per_instance"]["B"]
    print()
    print(table(["check", "figures", "verdict"], [
        [f"relay: {relay['sessions']} sessions round-robin over A/B, {relay['duration_s']:.0f} s",
         f"A {a['connected']}/{a['sessions']} connected, {a['frames_measured']} frames, {a['dropped']} dropped, "
         f"{a['reordered']} reordered, rtt p50/p99 {fmt(a['rtt_ms']['p50'])}/{fmt(a['rtt_ms']['p99'])} ms; "
         f"B {b['connected']}/{b['sessions']}, {b['frames_measured']} frames, {b['dropped']} dropped, "
         f"{b['reordered']} reordered, rtt p50/p99 {fmt(b['rtt_ms']['p50'])}/{fmt(b['rtt_ms']['p99'])} ms",
         relay["verdict"]],
        [f"rate limit {RATE_LIMIT}/h across A/B",
         ", ".join(f"#{x['n']}{x['instance']} {x['outcome']}"
                   + (f" {x.get('code')} {x.get('close_code')}" if x["outcome"] != "admitted" else "")
                   for x in rl["attempts"]), rl["verdict"]],
        [f"kill switch: {ks['sessions']} live sessions",
         f"last close {fmt(ks['last_close_after_flip_s'], 3)} s after the row flip "
         f"(A {fmt(ks['per_instance']['A']['last_close_s'], 3)}, "
         f"B {fmt(ks['per_instance']['B']['last_close_s'], 3)}); codes A {ks['per_instance']['A']['close_codes']} "
         f"B {ks['per_instance']['B']['close_codes']}; while disabled: "
         + "/".join(str(r.get("close_code")) for r in ks["while_disabled_new_connections"])
         + "; after --enable: " + "/".join(r["outcome"] for r in ks["after_enable_new_connections"]),
         ks["verdict"]],
    ]))
    print(f"\nraw results: {path.relative_to(ROOT)} ({payload['elapsed_s']:.0f} s, load {loadavg()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
