"""CPU cost of each component of one admission, measured in process (time.process_time: every thread of this
process, so the database threads' share is counted too; other processes' load barely changes it).

Each component is called the way the gateway calls it, --iterations times after a warm-up, on a uvloop event
loop, against the local Redis (database 13), a throwaway migrated SQLite database and bench/relay.py's picows
echo upstream (a subprocess). With a Sentry DSN set (nobody answers it), as in the relay and storm benches,
so the SDK's per-call instrumentation is counted where it applies.

  .venv/bin/python bench/admission_cost.py                 # 300 iterations per component (~1 min)
  .venv/bin/python bench/admission_cost.py --iterations 100
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    PYTHON,
    ROOT,
    Server,
    free_port,
    loadavg,
    machine,
    prepare_db,
    setup_django,
    table,
    write_result,
)

SENTRY_DSN = os.environ.get("BENCH_SENTRY_DSN", "http://bench@127.0.0.1:9/1")


async def cpu_ms(call: Callable[[int], Awaitable[Any] | Any], iterations: int) -> float:
    """Mean CPU ms of `call(i)` (sync or async), after 20 warm-up calls."""
    for i in range(20):
        result = call(-1 - i)
        if inspect.isawaitable(result):
            await result
    gc.collect()
    started = time.process_time()
    for i in range(iterations):
        result = call(i)
        if inspect.isawaitable(result):
            await result
    return 1000 * (time.process_time() - started) / iterations


async def measure(iterations: int, upstream_url: str, users: list[str]) -> dict[str, float]:
    from channels.layers import get_channel_layer

    from voice.realtime.openai_upstream import OpenAIUpstream
    from voice.services import sessions
    from voice.services.access import access_decide, concurrency_key
    from voice.services.auth import identity_from_jwt, issue_access_token
    from voice.services.db import run_db_write
    from voice.services.state import get_state

    state = get_state()
    tokens = [issue_access_token(user_id=u, plan="elite", minutes=120) for u in users]
    identities = [identity_from_jwt(t) for t in tokens]
    session_ids = [str(uuid.uuid4()) for _ in users]
    out: dict[str, float] = {}

    out["JWT verify (HS256)"] = await cpu_ms(lambda i: identity_from_jwt(tokens[i]), iterations)

    async def decide(i: int) -> None:
        await access_decide(identity=identities[i], session_id=session_ids[i])
        await state.slot_release(concurrency_key(identities[i].user_id), session_ids[i])

    out["access decision (rollout, DB lookup on its thread, budget, rate check, slot) + slot release"] = (
        await cpu_ms(decide, iterations))
    out["one Redis round trip (slot release)"] = await cpu_ms(
        lambda i: state.slot_release("cost-bench", session_ids[i]), iterations)
    out["presence refresh (one slot: ZADD + EXPIRE)"] = await cpu_ms(
        lambda i: state.slot_refresh("cost-bench", session_ids[i], ttl=30), iterations)
    meta = sessions.SessionMeta(session_id="x", user_id="u", plan="elite", cohort="all", started_at=time.time(),
                                max_duration_s=600)
    out["resume state save (Redis SET)"] = await cpu_ms(lambda i: sessions.session_meta_save(meta), iterations)
    layer = get_channel_layer()
    channel = await layer.new_channel()
    # Once per process since 2026-12-04 (sessions join no group of their own); kept to compare with older runs.
    out["channel-layer group join (ZADD + EXPIRE)"] = await cpu_ms(
        lambda i: layer.group_add(f"voice.session.{session_ids[i]}", channel), iterations)
    out["resume token issue (signing)"] = await cpu_ms(
        lambda i: sessions.resume_token_issue(session_id=session_ids[i], user_id="u"), iterations)

    start_params = inspect.signature(sessions.voice_session_start).parameters
    extra = {"resumed": False} if "resumed" in start_params else {}
    metas = [sessions.SessionMeta(session_id=str(uuid.uuid4()), user_id=u, plan="elite", cohort="all",
                                  started_at=time.time(), max_duration_s=600) for u in users]
    out["session row at start (writer thread)"] = await cpu_ms(
        lambda i: run_db_write(sessions.voice_session_start, meta=metas[i], user_pk=None, upstream="openai",
                               instance="bench", **extra), iterations)
    from voice.realtime.accounting import TurnStats

    turn_row = TurnStats(index=0, speech_ms=1500, retrieval_used=True, rag_injected=True, first_audio_ms=300.0,
                         input_tokens=500, output_tokens=80, cost_usd=0.01, response_status="completed").row()
    out["turn row, per answered turn (writer thread)"] = await cpu_ms(
        lambda i: run_db_write(sessions.voice_turns_save, session_id=metas[i].session_id,
                               rows=[{**turn_row, "index": max(i, 0)}]), iterations)
    stats = sessions.SessionStats() if hasattr(sessions, "SessionStats") else None
    out["session row at end (writer thread)"] = await cpu_ms(
        lambda i: run_db_write(sessions.voice_session_end, sessions.session_end_record(
            meta=metas[i], stats=stats, user_pk=None, upstream="openai", instance="bench", end_reason="client_closed",
            close_code=1000, error="", connected_s=1.0)), iterations)

    async def upstream_handshake(i: int) -> None:
        upstream = OpenAIUpstream(url=upstream_url, api_key="bench")
        await upstream.connect()
        await upstream.recv()  # session.created
        await upstream.close()

    out["upstream connect (TCP + WebSocket handshake + session.created)"] = await cpu_ms(
        upstream_handshake, min(iterations, 200))
    await state.aclose()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--db", default="/tmp/bench-admission-cost.sqlite3")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    started = time.time()
    prepare_db(args.db)
    setup_django(args.db, SENTRY_DSN=SENTRY_DSN)
    port = free_port()
    upstream = Server("echo-upstream", [PYTHON, str(ROOT / "bench" / "relay.py"), "upstream", "--port", str(port)],
                      port).wait_ready()
    import uvloop

    from voice.services.users import user_for_identity

    users = [f"cost-{time.strftime('%H%M%S')}-{i}" for i in range(args.iterations + 20)]
    for user in users:
        user_for_identity(external_id=user, plan="elite")  # known users, as in a reconnect storm
    try:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        costs = asyncio.run(measure(args.iterations, f"ws://127.0.0.1:{port}/v1/realtime", users))
    finally:
        upstream.stop()
    payload = {"bench": "admission-cost", "args": vars(args), "machine": machine(), "loadavg_at_end": loadavg(),
               "elapsed_s": time.time() - started, "cpu_ms": costs}
    path = write_result("admission-cost" + (f"-{args.tag}" if args.tag else ""), payload)
    print(table(["component (as the gateway calls it)", "CPU ms per call"],
                [[k, f"{v:.3f}"] for k, v in costs.items()]))
    print(f"\nraw results: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
