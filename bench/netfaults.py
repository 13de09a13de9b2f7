"""The client's link under real faults: audio continuity, turn latency, blackouts, dead links, resume.

A client namespace behind a shaped link (tests/netns.py: a userspace netem between two TUN devices) talks
to a gateway process bound only to the link's root-side address, answering with the local engine in real
time (LOCAL_ENGINE_SPEED=1). Scenarios:

  clean     no shaping: the reference
  farm      2 % loss, 150 ms ± 50 ms each way (RTT ~300 ms): typed turns
  blackout  farm + all packets dropped for 5 s once 1 s of an answer has arrived; then the next turn
  drop      farm + the phone changes network mid-answer: the client's socket dies and its interface is
            down for 5 s (connects fail at once); the client resumes with voice-client.js's backoff
  dead      farm + the client vanishes for good: how long until the gateway ends the session (ping timeout)

Audio continuity is the JS client's jitter buffer replayed over the measured arrival times
(`tests.netfault_client.playback_gaps`) for several `initialBufferMs`. Raw JSON: bench/results/netfaults-*.json.

    .venv/bin/python bench/netfaults.py                     # all scenarios (~3 min)
    .venv/bin/python bench/netfaults.py --ping 10,10        # the gateway's ping interval,timeout
    .venv/bin/python bench/netfaults.py --backoff 250,400,8000,5 --scenarios drop
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    PYTHON,
    Server,
    bench_env,
    free_port,
    machine,
    prepare_db,
    rnd,
    setup_django,
    summary,
    write_result,
)

DB = "/tmp/bench-netfaults.sqlite3"
FARM = {"loss": 0.02, "delay_ms": 150, "jitter_ms": 50}
BUFFERS_MS = [100, 200, 300, 500, 800]  # fixed jitter buffers; "100-800" is the adaptive one (x2 per underrun)
ADAPTIVE = (100, 800)  # voice-client.js: initialBufferMs, maxBufferMs; the grown buffer carries to the next answer
QUESTIONS = [
    "My flock is 12000 Ross 308 broilers at day 21. What temperature should the house be?",
    "And how much water should they drink per day?",
    "What about the lighting program?",
]


def wait_listening(host: str, port: int, proc: Any, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("gateway exited")
        try:
            with socket.create_connection((host, port), timeout=0.3):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("gateway not listening")


async def session_ended(session_id: str) -> bool:
    """Whether the gateway has ended (and recorded) the session: its row has an end time."""
    from voice.models import VoiceSession

    return await VoiceSession.objects.filter(pk=session_id, ended_at__isnull=False).aexists()


def turn_figures(turn: Any, blackout_end: float | None = None, adaptive_from: float = ADAPTIVE[0]
                 ) -> dict[str, Any]:
    """Latency, arrival gaps, and the replayed playback for each buffer size (the adaptive one starting
    from `adaptive_from`, what the session's earlier answers grew it to)."""
    from tests.netfault_client import playback_gaps

    arrivals = [t for t, _ in turn.deltas]
    inter = [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]
    out: dict[str, Any] = {
        "first_audio_ms": (turn.first_audio_s or 0) * 1000 if turn.deltas else None,
        "audio_ms": turn.audio_ms,
        "deltas": len(turn.deltas),
        "completed": bool(turn.done and turn.done["response"]["status"] == "completed"),
        "transcript_intact": bool(turn.done) and turn.transcript == turn.final_transcript(),
        "inter_arrival_ms": summary(inter),
        "max_inter_arrival_ms": max(inter) if inter else None,
        "playback": {},
        "arrivals": [[t - turn.sent_at, ms] for t, ms in turn.deltas],  # raw: replay other buffers later
    }
    for buffer_ms in [*BUFFERS_MS, ADAPTIVE]:
        if isinstance(buffer_ms, tuple):
            play = playback_gaps(turn.deltas, adaptive_from, turn.done_at, max_buffer_ms=buffer_ms[1])
            buffer_ms = f"{buffer_ms[0]}-{buffer_ms[1]}"
            out["adaptive_buffer_ms_after"] = play["buffer_ms"]
        else:
            play = playback_gaps(turn.deltas, buffer_ms, turn.done_at)
        gaps = play["gaps"]
        if blackout_end is not None:  # the blackout's own silence, separated from the loss/jitter ones
            outage = [g for g in gaps if g["at"] <= blackout_end + 10 and g["at"] + g["ms"] / 1000 >= blackout_end - 6]
            others = [g for g in gaps if g not in outage]
        else:
            outage, others = [], gaps
        out["playback"][str(buffer_ms)] = {
            "start_ms": (play["started_at"] - turn.sent_at) * 1000 if play["started_at"] else None,
            "gaps": len(others), "gap_ms": sum(g["ms"] for g in others),
            "outage_silence_ms": sum(g["ms"] for g in outage),
        }
    if blackout_end is not None:
        after = [t for t in arrivals if t > blackout_end]
        out["audio_back_after_blackout_ms"] = (after[0] - blackout_end) * 1000 if after else None
    return out


async def scenario(name: str, url: str, token: str, link: Any, args: argparse.Namespace) -> dict[str, Any]:
    from tests.netfault_client import Backoff, LinkClient
    from voice.services.sessions import session_meta_load

    backoff = Backoff(*[float(v) for v in args.backoff.split(",")[:3]], attempts=int(args.backoff.split(",")[3]))
    link.set_client_link(True)
    link.shape(**({} if name == "clean" else FARM))
    client = LinkClient(url, token, link.socket, backoff)
    ready = await client.connect()
    result: dict[str, Any] = {"scenario": name, "session_id": ready["session_id"], "turns": []}
    marks: dict[str, float] = {}

    if name == "dead":
        await asyncio.sleep(3)  # idle: nothing in flight, only the gateway's pings can find out
        link.blackout(3600)
        gone_at = time.monotonic()
        while time.monotonic() - gone_at < args.dead_wait:
            if await session_ended(ready["session_id"]):
                result["server_ended_session_after_s"] = time.monotonic() - gone_at
                break
            await asyncio.sleep(0.25)
        else:
            result["server_ended_session_after_s"] = None
        client.client.ws.transport.abort()
        link.blackout(0)
        return result

    def fault(turn: Any) -> None:
        if marks or turn.audio_ms < 1000:
            return
        marks["at"] = time.monotonic()
        if name == "blackout":
            link.blackout(args.blackout)
            marks["end"] = marks["at"] + args.blackout
        elif name == "drop":
            link.set_client_link(False)
            client.client.ws.transport.abort()  # the OS drops the socket when the network changes
            asyncio.get_running_loop().call_later(args.blackout, link.set_client_link, True)
            marks["end"] = marks["at"] + args.blackout

    adaptive = ADAPTIVE[0]
    for index, question in enumerate(QUESTIONS[: args.turns]):
        faulty = name in ("blackout", "drop") and index == 0
        try:
            turn = await client.ask(question, on_audio=fault if faulty else None, timeout=120)
        except ConnectionError:  # every resume attempt failed: the client gives up (refused "network")
            result["gave_up_after_s"] = time.monotonic() - marks["at"]
            break
        figures = turn_figures(turn, marks.get("end") if faulty else None, adaptive)
        adaptive = figures["adaptive_buffer_ms_after"]
        result["turns"].append(figures)
    if client.resumes:
        result["resumes"] = [{"attempts": r["attempts"], "ready_after_link_back_ms":
                              (r["ready_at"] - marks["end"]) * 1000 if marks else None} for r in client.resumes]
    result["connections"] = len(client.readies)
    result["same_session"] = all(r["session_id"] == ready["session_id"] for r in client.readies)
    await client.close()
    await asyncio.sleep(0.5)
    meta = await session_meta_load(ready["session_id"])
    asked = QUESTIONS[: args.turns]
    result["history_users"] = [e["user"] for e in meta.history] if meta else None
    result["conversation_intact"] = bool(meta) and result["history_users"] == asked
    return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.common import issue_tokens
    from tests.netns import ShapedLink, netem_available, unavailable_reason

    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    interval, timeout = (float(v) for v in args.ping.split(","))
    out: dict[str, Any] = {"machine": machine(), "netem_in_kernel": netem_available(), "link": FARM,
                           "blackout_s": args.blackout, "ping_interval_s": interval, "ping_timeout_s": timeout,
                           "backoff": args.backoff, "tcp_rto_max_ms": args.rto_max_ms, "engine_speed": args.speed,
                           "runs": []}
    with ShapedLink(seed=args.seed) as link:
        port = free_port()
        env = bench_env(DB, LOCAL_ENGINE_SPEED=args.speed, VOICE_WS_PING_INTERVAL_SECONDS=interval,
                        VOICE_WS_PING_TIMEOUT_SECONDS=timeout, VOICE_TCP_RTO_MAX_MS=args.rto_max_ms)
        server = Server("netfaults-gateway", [PYTHON, "manage.py", "voice_serve", "--host", link.root_addr,
                                              "--port", str(port), "--no-access-log"], port, env=env)
        try:
            wait_listening(link.root_addr, port, server.proc)
            url = f"ws://{link.root_addr}:{port}/v1/ws/voice"
            tokens = iter(issue_tokens(f"netfaults-{os.getpid()}-{int(time.time())}", 100))
            for repeat in range(args.repeat):
                for name in args.scenarios.split(","):
                    started = time.monotonic()
                    result = await scenario(name, url, next(tokens), link, args)
                    result["repeat"], result["wall_s"] = repeat, time.monotonic() - started
                    out["runs"].append(result)
                    print(name, {k: v for k, v in result.items() if k not in ("turns", "history_users")},
                          [(t["first_audio_ms"], t.get("audio_back_after_blackout_ms"),
                            {b: (p["gaps"], round(p["gap_ms"]), round(p["outage_silence_ms"]))
                             for b, p in t["playback"].items()}) for t in result.get("turns", [])],
                          flush=True)
        finally:
            server.stop()
            out["link_stats"] = link.stats()
    return out


def summarize(out: dict[str, Any]) -> dict[str, Any]:
    """Per scenario: medians and lists over the repeats (what docs/RELIABILITY.md quotes)."""
    from bench.common import median

    by: dict[str, list[dict[str, Any]]] = {}
    for run_ in out["runs"]:
        by.setdefault(run_["scenario"], []).append(run_)
    result: dict[str, Any] = {}
    for name, runs in by.items():
        turns = [t for r in runs for t in r.get("turns", [])]
        clean_turns = [t for r in runs for i, t in enumerate(r.get("turns", []))
                       if not (name in ("blackout", "drop") and i == 0)]
        entry: dict[str, Any] = {
            "runs": len(runs),
            "first_audio_ms_median": median([t["first_audio_ms"] for t in turns if t["first_audio_ms"]]),
            "same_session": sum(bool(r.get("same_session", True)) for r in runs),
            "conversation_intact": sum(bool(r.get("conversation_intact")) for r in runs),
        }
        buffers = turns[0]["playback"].keys() if turns else []
        entry["silences_per_answer"] = {
            b: {"count": sum(t["playback"][b]["gaps"] for t in clean_turns) / max(1, len(clean_turns)),
                "ms": sum(t["playback"][b]["gap_ms"] for t in clean_turns) / max(1, len(clean_turns)),
                "start_ms": median([t["playback"][b]["start_ms"] for t in clean_turns])}
            for b in buffers
        }
        if name == "blackout":
            entry["audio_back_after_link_ms"] = [r["turns"][0].get("audio_back_after_blackout_ms") for r in runs]
            entry["blackout_silence_ms_100"] = [r["turns"][0]["playback"]["100"]["outage_silence_ms"]
                                                for r in runs]
        if name == "drop":
            entry["gave_up"] = sum("gave_up_after_s" in r for r in runs)
            entry["resumed_after_link_ms"] = [(r.get("resumes") or [{}])[0].get("ready_after_link_back_ms")
                                              for r in runs]
            entry["resume_attempts"] = [(r.get("resumes") or [{}])[0].get("attempts") for r in runs]
        if name == "dead":
            entry["server_ended_session_after_s"] = [r.get("server_ended_session_after_s") for r in runs]
        result[name] = entry
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="clean,farm,blackout,drop,dead")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--speed", type=float, default=1.0,
                        help="LOCAL_ENGINE_SPEED: 1 real time, 8 OpenAI-like bursts")
    parser.add_argument("--blackout", type=float, default=5.0)
    parser.add_argument("--ping", default="10,10", help="the gateway's ws ping interval,timeout (s); before: 20,20")
    parser.add_argument("--backoff", default="250,400,2000,15",
                        help="resume first_ms,base_ms,max_ms,attempts (voice-client.js; before: 250,400,8000,5)")
    parser.add_argument("--rto-max-ms", type=int, default=1000, help="VOICE_TCP_RTO_MAX_MS (0: kernel default)")
    parser.add_argument("--dead-wait", type=float, default=90.0)
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    setup_django(DB)
    prepare_db(DB)
    out = asyncio.run(run(args))
    out["summary"] = summarize(out)
    print(json.dumps(rnd(out["summary"], 0), indent=1))
    path = write_result("netfaults" + (f"-{args.tag}" if args.tag else ""), out)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
