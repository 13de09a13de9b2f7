"""Topology bench: sessions through nginx, one gateway drained (SIGTERM) under load, every session resumed.

Starts deploy/topology.py's topology as plain processes (nginx with deploy/nginx/intelia-voice.conf, three
`voice_serve` gateways, Redis master + replica + three sentinels, PostgreSQL at 127.0.0.1:5432 in a fresh
database or SQLite, the local engine behind `manage.py realtime_engine`). Then:

  load      N sessions (default 60) connect through nginx and stream 40 ms audio frames at real-time pace;
            each asks a text question every few seconds and waits for its answer (response.done).
  drain     after --drain-after seconds, gateway-1 gets SIGTERM. Each of its sessions receives
            gateway.session.draining and close 4012, reconnects through nginx with ?resume=<token> (a
            refusal while nginx still picks the draining instance is retried after 0.2 s) and must be
            ready again with the same session id, then answer one more question.
  rows      after every client closed: one VoiceSession row per session, end_reason client_closed,
            connections = 2 for the resumed ones and 1 for the others, every question counted as a turn;
            nothing spooled.
  failover  (after the drain, load still running) the Redis master gets SIGKILL. Each remaining gateway's
            health is polled directly: when it enters the in-memory fallback and when it is back on Redis
            with the promoted replica as master; --gap-sessions new sessions open through nginx right after
            the kill and must be admitted and answered.

  .venv/bin/python bench/topology.py                    # ~1 min; bench/results/topology-*.json
  .venv/bin/python bench/topology.py --sessions 120 --database sqlite
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, fmt, gateway_gauges, loadavg, machine, pct, table, write_result
from deploy.topology import Topology

FRAME = base64.b64encode(bytes(1920)).decode()  # 40 ms of silence, 24 kHz pcm16
QUESTION = {"type": "conversation.item.create", "item": {
    "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Litter moisture?"}]}}


async def ask(client: Any, out: dict[str, Any], timeout: float = 30) -> None:
    """One question: `asked` when sent, `turns` when its response.done arrives."""
    out["asked"] = out.get("asked", 0) + 1
    await client.send(QUESTION)
    await client.send({"type": "response.create"})
    await client.wait_for("response.done", timeout=timeout)
    out["turns"] += 1


async def open_ready(url: str, token: str, query: str = "") -> tuple[Any, dict[str, Any]]:
    """Connect through nginx; (client, first decisive event: ready or gateway.error)."""
    from tests.live import VoiceClient

    client = await VoiceClient.open(url, token=token, query=query)
    while True:
        event = await client.next_event(30)
        if event["type"] in ("gateway.session.ready", "gateway.error"):
            return client, event


async def read_pending(client: Any) -> None:
    """Take what has arrived (a drain notice among it) without waiting."""
    with contextlib.suppress(TimeoutError):
        while True:
            await client.next_event(0.001)


async def stream(client: Any, out: dict[str, Any], stop: asyncio.Event, ask_every: float) -> bool:
    """Stream 40 ms frames and ask now and then until the run stops (False) or a drain notice comes (True)."""
    import websockets

    next_ask = time.monotonic() + ask_every * random.uniform(0.2, 1.0)
    clock = time.monotonic()
    try:
        while not stop.is_set():
            clock += 0.04
            await asyncio.sleep(max(0.0, clock - time.monotonic()))
            await client.send({"type": "input_audio_buffer.append", "audio": FRAME})
            out["frames"] += 1
            if time.monotonic() >= next_ask:
                await ask(client, out)
                next_ask, clock = time.monotonic() + ask_every, time.monotonic()
            elif out["frames"] % 10 == 0:
                await read_pending(client)
            if client.seen("gateway.session.draining"):
                return True
    except (websockets.ConnectionClosed, TimeoutError):
        with contextlib.suppress(websockets.ConnectionClosed, TimeoutError):
            await client.wait_closed(10)
        if client.seen("gateway.session.draining"):
            return True
        raise
    return False


async def resume(url: str, token: str, client: Any, out: dict[str, Any]) -> Any:
    """Follow the drain notice: reconnect through nginx until an instance that is not draining takes it."""
    notice = client.seen("gateway.session.draining")[0]
    out["close_code"] = await client.wait_closed(10)
    closed_at = time.monotonic()
    for attempt in range(1, 51):  # noqa: B007 - the count is reported
        client, ready = await open_ready(url, token, f"resume={notice['resume_token']}")
        if ready["type"] == "gateway.session.ready":
            break
        await client.wait_closed(5)
        await asyncio.sleep(0.2)
    out.update(resume_attempts=attempt, resume_s=time.monotonic() - closed_at, resumed=ready.get("resumed", False),
               same_id=ready.get("session_id") == out["session_id"])
    if ready["type"] != "gateway.session.ready":
        raise RuntimeError(f"resume refused {ready.get('code')}")
    await ask(client, out)  # the resumed session answers
    out["turns_after_resume"] = 1
    return client


async def session(url: str, token: str, out: dict[str, Any], stop: asyncio.Event, ask_every: float) -> None:
    """A streaming, asking session that follows a drain notice to another instance."""
    try:
        client, ready = await open_ready(url, token)
        if ready["type"] != "gateway.session.ready":
            raise RuntimeError(f"refused {ready.get('code')}")
        out.update(session_id=ready["session_id"], turns=0, frames=0)
        while await stream(client, out, stop, ask_every):
            client = await resume(url, token, client, out)
        await client.close()
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:200]


def rows_report(ids: list[str], resumed_ids: set[str], drained: str) -> dict[str, Any]:
    """The database's view once every client closed (polled: the last rows are written just after)."""
    from voice.models import VoiceSession

    deadline = time.time() + 30
    while True:
        rows = list(VoiceSession.objects.filter(pk__in=ids).values("id", "end_reason", "connections", "instance",
                                                                   "turns"))
        done = [r for r in rows if r["end_reason"] == "client_closed"]
        if len(done) == len(ids) or time.time() > deadline:
            break
        time.sleep(0.5)
    by_id = {str(r["id"]): r for r in rows}
    resumed_rows = [by_id[i] for i in resumed_ids if i in by_id]
    return {
        "sessions": len(ids), "rows": len(rows), "rows_client_closed": len(done),
        "rows_lost": len(ids) - len(done),
        "resumed_rows_with_2_connections": sum(1 for r in resumed_rows if r["connections"] == 2),
        "resumed_rows_started_on_drained": sum(1 for r in resumed_rows if r["instance"] == drained),
        "other_rows_with_1_connection": sum(1 for i, r in by_id.items() if i not in resumed_ids
                                            and r["connections"] == 1),
        "turns_recorded": sum(r["turns"] for r in rows),
        "rows_by_first_instance": {name: sum(1 for r in rows if r["instance"] == name)
                                   for name in sorted({r["instance"] for r in rows})},
    }


async def fresh_session(url: str, token: str) -> dict[str, Any]:
    """A new session opened during the Redis failover gap: admitted, answers one question, closes."""
    out: dict[str, Any] = {"turns": 0}
    try:
        client, ready = await open_ready(url, token)
        if ready["type"] != "gateway.session.ready":
            raise RuntimeError(f"refused {ready.get('code')}")
        out["session_id"] = ready["session_id"]
        await ask(client, out)
        await client.close()
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:200]
    return out


async def redis_failover(topology: Topology, fresh_tokens: list[str]) -> dict[str, Any]:
    """SIGKILL the Redis master under load; watch each live gateway's health until it is back on the new one."""
    import httpx

    names = [name for name, (proc, _) in topology.gateways.items() if proc.alive()]
    watch: dict[str, dict[str, Any]] = {name: {"fallback_seen_s": None, "back_on_new_master_s": None}
                                        for name in names}
    killed_at = time.monotonic()
    killed = await asyncio.to_thread(topology.redis.kill_master)
    promoted = asyncio.create_task(asyncio.to_thread(topology.redis.wait_promoted, killed))
    fresh = asyncio.gather(*(fresh_session(topology.ws_url, token) for token in fresh_tokens))
    new_master, promoted_s = None, None
    async with httpx.AsyncClient(timeout=5) as http:
        while time.monotonic() - killed_at < 60:
            if promoted.done() and new_master is None:
                new_master, promoted_s = promoted.result(), time.monotonic() - killed_at
            for name in names:
                if watch[name]["back_on_new_master_s"] is not None:
                    continue
                with contextlib.suppress(httpx.HTTPError):
                    health = (await http.get(f"http://127.0.0.1:{topology.gateway_port(name)}/v1/voice/health")).json()
                    redis, at = health["redis"], time.monotonic() - killed_at
                    if redis["using_fallback"] and watch[name]["fallback_seen_s"] is None:
                        watch[name]["fallback_seen_s"] = at
                    if (new_master is not None and not redis["using_fallback"]
                            and redis["redis_master"] == f"127.0.0.1:{new_master}"):
                        watch[name].update(back_on_new_master_s=at, switch=redis["master_switches"][-1:])
            if all(w["back_on_new_master_s"] is not None for w in watch.values()):
                break
            await asyncio.sleep(0.1)
    fresh_outs = await fresh
    return {
        "killed_master_port": killed, "new_master_port": new_master, "sentinels_promoted_s": promoted_s,
        "down_after_ms": topology.redis.down_after_ms, "gateways": watch,
        "fresh_sessions_during_gap": len(fresh_outs),
        "fresh_admitted_and_answered": sum(1 for o in fresh_outs if o["turns"] == 1),
        "fresh_outs": fresh_outs,
    }


async def run_load(topology: Topology, tokens: list[str], args: argparse.Namespace,
                   fresh_tokens: list[str]) -> dict[str, Any]:
    stop = asyncio.Event()
    outs: list[dict[str, Any]] = [{} for _ in tokens]
    tasks = []
    for token, out in zip(tokens, outs, strict=True):
        tasks.append(asyncio.create_task(session(topology.ws_url, token, out, stop, args.ask_every)))
        await asyncio.sleep(0.02)  # a ramp, not a thundering herd on the handshakes
    deadline = time.monotonic() + 60
    while sum(1 for o in outs if "session_id" in o or "error" in o) < len(outs) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    live = {name: gateway_gauges(topology.gateway_port(name), ("voice_active_sessions",))["voice_active_sessions"]
            for name in topology.gateways}
    await asyncio.sleep(args.drain_after)
    drained = "gateway-1"
    proc = topology.drain(drained)
    drain_at = time.monotonic()
    exit_code = await asyncio.to_thread(proc.proc.wait, 60)
    drained_exit_s = time.monotonic() - drain_at
    frames_at_exit = [o.get("frames", 0) for o in outs]
    await asyncio.sleep(args.after)
    turns_before_failover = sum(o.get("turns", 0) for o in outs)
    failover = await redis_failover(topology, fresh_tokens) if fresh_tokens else None
    if failover is not None:
        failover["questions_answered_by_live_sessions_in_failover"] = sum(o.get("turns", 0) for o in outs) \
            - turns_before_failover
        await asyncio.sleep(args.after)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    resumed = [o for o in outs if "resume_s" in o]
    delays = [o["resume_s"] for o in resumed]
    return {
        "outs": outs, "failover": failover, "drained": drained, "live_before_drain": live,
        "drained_exit_code": exit_code,
        "drained_exit_s": drained_exit_s,
        "connected": sum(1 for o in outs if "session_id" in o),
        "drained_sessions": len(resumed),
        "resumed_same_id": sum(1 for o in resumed if o.get("resumed") and o.get("same_id")),
        "answered_after_resume": sum(1 for o in resumed if o.get("turns_after_resume")),
        # Still relaying once the drained process was gone: they live on the other instances.
        "resumed_streaming_after_exit": sum(1 for o, before in zip(outs, frames_at_exit, strict=True)
                                            if "resume_s" in o and o.get("frames", 0) > before),
        "close_codes_on_drain": sorted({o.get("close_code") for o in resumed}, key=str),
        "resume_s": {"p50": pct(delays, 50), "p95": pct(delays, 95), "max": max(delays) if delays else None},
        "resume_attempts_max": max((o["resume_attempts"] for o in resumed), default=None),
        "resume_retries_total": sum(o["resume_attempts"] - 1 for o in resumed),
        "frames_sent": sum(o.get("frames", 0) for o in outs),
        "turns_answered": sum(o.get("turns", 0) for o in outs),
        "questions_asked": sum(o.get("asked", 0) for o in outs),
        "errors": [o["error"] for o in outs if "error" in o][:10],
    }


def ok(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=60)
    parser.add_argument("--gateways", type=int, default=3)
    parser.add_argument("--database", choices=("auto", "postgres", "sqlite"), default="auto")
    parser.add_argument("--drain-after", type=float, default=6.0, help="seconds of load before the SIGTERM")
    parser.add_argument("--after", type=float, default=6.0, help="seconds of load after the drained one exited")
    parser.add_argument("--ask-every", type=float, default=4.0, help="seconds between a session's questions")
    parser.add_argument("--gap-sessions", type=int, default=10,
                        help="new sessions opened while Redis fails over (0: no failover phase)")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    reason = Topology.missing()
    if reason:
        print(f"skipped: {reason}", file=sys.stderr)
        return 2
    started = time.time()
    info = machine()
    topology = Topology(ROOT / "var" / "topology" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}",
                        gateways=args.gateways, database=args.database,
                        env={"MAX_SESSIONS_PER_USER_PER_HOUR": "1000", "MAX_SESSION_DURATION": "3600"})
    try:
        topology.start()
        os.environ.update(topology.settings)  # this process issues tokens and reads rows like the gateways
        import django

        django.setup()
        from voice.services.auth import issue_access_token

        tag = time.strftime("%H%M%S")
        tokens = [issue_access_token(user_id=f"topo-{tag}-{i}", plan="elite", minutes=60)
                  for i in range(args.sessions)]
        fresh_tokens = [issue_access_token(user_id=f"topo-{tag}-gap-{i}", plan="elite", minutes=60)
                        for i in range(args.gap_sessions)]
        load = asyncio.run(run_load(topology, tokens, args, fresh_tokens))
        outs = load.pop("outs")
        fresh_outs = load["failover"].pop("fresh_outs") if load["failover"] else []
        ids = [o["session_id"] for o in [*outs, *fresh_outs] if "session_id" in o]
        resumed_ids = {o["session_id"] for o in outs if "resume_s" in o}
        rows = rows_report(ids, resumed_ids, load["drained"])
        spooled = sorted(p.name for p in (topology.dir / "spool").glob("*.json")) \
            if (topology.dir / "spool").is_dir() else []
        layout = topology.describe()
    finally:
        topology.stop()

    verdicts = {
        "all_connected": load["connected"] == args.sessions,
        "drained_instance_had_sessions": load["drained_sessions"] > 0,
        "every_drained_session_resumed_same_id": load["resumed_same_id"] == load["drained_sessions"],
        "answered_after_resume": load["answered_after_resume"] == load["drained_sessions"],
        "drain_close_4012": load["close_codes_on_drain"] == [4012],
        "zero_rows_lost": rows["rows_lost"] == 0,
        "resumed_rows_two_connections": rows["resumed_rows_with_2_connections"] == load["drained_sessions"],
        "resumed_streaming_after_the_drained_exit": load["resumed_streaming_after_exit"] == load["drained_sessions"],
        # Every answered question is a turn row; a question cut by the drain may be counted too (it started).
        "turns_all_recorded": (load["turns_answered"] + sum(o["turns"] for o in fresh_outs) <= rows["turns_recorded"]
                               <= load["questions_asked"] + sum(o.get("asked", 0) for o in fresh_outs)),
        "nothing_spooled": not spooled,
        "no_client_errors": not load["errors"],
    }
    failover = load["failover"]
    if failover is not None:
        verdicts.update({
            "redis_every_gateway_back_on_the_new_master": all(
                w["back_on_new_master_s"] is not None for w in failover["gateways"].values()),
            "redis_gap_sessions_admitted_and_answered": (failover["fresh_admitted_and_answered"]
                                                         == failover["fresh_sessions_during_gap"]),
        })
    verdict = ok(all(verdicts.values()))
    payload = {"bench": "topology", "args": vars(args), "machine": info, "topology": layout,
               "elapsed_s": time.time() - started, "loadavg_at_end": loadavg(), "load": load, "rows": rows,
               "spooled": spooled, "verdicts": {k: ok(v) for k, v in verdicts.items()},
               "verdict": verdict}
    path = write_result("topology" + (f"-{args.tag}" if args.tag else ""), payload)
    print(table(["check", "figures", "verdict"], [
        [f"{args.sessions} sessions through nginx over {args.gateways} gateways ({layout['database']})",
         f"{load['connected']} connected, live before the drain {load['live_before_drain']}, "
         f"{load['frames_sent']} frames, {load['turns_answered']}/{load['questions_asked']} questions answered",
         ok(verdicts["all_connected"])],
        [f"SIGTERM {load['drained']} under load",
         f"{load['drained_sessions']} sessions drained (close {load['close_codes_on_drain']}), "
         f"{load['resumed_same_id']} resumed with the same id, {load['answered_after_resume']} answered after; "
         "resume p50/p95/max " + "/".join(fmt(load["resume_s"][k], 2) for k in ("p50", "p95", "max")) + " s, "
         f"{load['resume_retries_total']} retries; exited {load['drained_exit_code']} after "
         f"{load['drained_exit_s']:.1f} s, then {load['resumed_streaming_after_exit']} resumed sessions still "
         "streaming on the others", ok(verdicts["every_drained_session_resumed_same_id"])],
        ["rows", f"{rows['rows_client_closed']}/{rows['sessions']} rows, {rows['rows_lost']} lost; resumed rows "
         f"with 2 connections {rows['resumed_rows_with_2_connections']}; turns {rows['turns_recorded']}; "
         f"spooled {len(spooled)}",
         ok(verdicts["zero_rows_lost"] and verdicts["nothing_spooled"])],
        *([[f"Redis master SIGKILLed under load (down-after {failover['down_after_ms']} ms)",
            f"promoted after {fmt(failover['sentinels_promoted_s'], 2)} s; back on the new master: "
            + ", ".join(f"{name} {fmt(w['back_on_new_master_s'], 2)} s" for name, w in failover["gateways"].items())
            + f"; {failover['fresh_admitted_and_answered']}/{failover['fresh_sessions_during_gap']} new sessions "
            f"admitted and answered in the gap; {failover['questions_answered_by_live_sessions_in_failover']} "
            "questions answered by the live sessions meanwhile",
            ok(verdicts["redis_every_gateway_back_on_the_new_master"]
               and verdicts["redis_gap_sessions_admitted_and_answered"])]] if failover else []),
    ]))
    print(f"\n{verdict}: {path.relative_to(ROOT)} ({payload['elapsed_s']:.0f} s)")
    if load["errors"]:
        print("errors:", load["errors"])
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
