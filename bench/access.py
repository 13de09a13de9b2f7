"""Access-decision bench: JWT validation + plan + rollout + budget + rate limit + concurrency slot.

Calls `voice.services.auth.identity_from_jwt` then `voice.services.access.access_decide` in process, on a
uvloop event loop, against the local Redis (database 13) and a throwaway migrated SQLite database with the
rollout at 100 %, exactly as the consumer does on each connection. The slot taken by an admission is
released after each call (untimed), as a session ending would. Scenarios:

  recurring    a pool of known users (their local user/profile rows exist): the common case
  distinct     a new user on every call: the first connection creates the local user + profile (writes)
  burst        recurring users, 32 decisions in flight at once (a reconnect storm after a deploy)

Each component is timed inside the decision (ContextVar-scoped wrappers): jwt, rollout snapshot (cached),
the DB lookup through `sync_to_async` (user/profile + cached plans, including the thread hop), budget,
rate-limit check (Redis Lua via `limits`), slot acquire (Redis Lua).

  .venv/bin/python bench/access.py            # 3000 per scenario (~20 s)
  .venv/bin/python bench/access.py --quick    # 500 per scenario
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import gc
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, loadavg, machine, pct, prepare_db, setup_django, table, write_result

TARGET_P99_MS = 2.0
_timings: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("timings", default=None)


def _add(name: str, seconds: float) -> None:
    bucket = _timings.get()
    if bucket is not None:
        bucket[name] = bucket.get(name, 0.0) + seconds


def instrument() -> None:
    """Wrap the decision's dependencies with timers (the decision code itself is untouched)."""
    from voice.services import access, state

    labels = {"_resolve_identity": "db_user_profile", "_resolve_identities": "db_user_profile",
              "month_spend_usd": "db_budget"}
    real_run_db = access.run_db

    async def timed_run_db(func: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await real_run_db(func, *args, **kwargs)
        finally:
            _add(labels.get(getattr(func, "__name__", ""), "db_other"), time.perf_counter() - started)

    access.run_db = timed_run_db

    real_rollout = access.rollout_snapshot

    async def timed_rollout() -> Any:
        started = time.perf_counter()
        try:
            return await real_rollout()
        finally:
            _add("rollout", time.perf_counter() - started)

    access.rollout_snapshot = timed_rollout

    for method, label in (("rate_check", "redis_rate_check"), ("slot_acquire", "redis_slot_acquire")):
        real = getattr(state.SharedState, method)

        def make(real: Any = real, label: str = label) -> Any:
            async def timed(self: Any, *a: Any, **kw: Any) -> Any:
                started = time.perf_counter()
                try:
                    return await real(self, *a, **kw)
                finally:
                    _add(label, time.perf_counter() - started)

            return timed

        setattr(state.SharedState, method, make())


async def decide_once(token: str, samples: list[dict[str, float]]) -> None:
    from voice.services.access import Admission, access_decide, concurrency_key
    from voice.services.auth import identity_from_jwt
    from voice.services.state import get_state

    bucket: dict[str, float] = {}
    _timings.set(bucket)
    session_id = uuid.uuid4().hex
    started = time.perf_counter()
    identity = identity_from_jwt(token)
    jwt_done = time.perf_counter()
    decision = await access_decide(identity=identity, session_id=session_id)
    ended = time.perf_counter()
    _timings.set(None)
    if not isinstance(decision, Admission):
        raise RuntimeError(f"refused: {decision}")
    bucket["jwt"] = jwt_done - started
    bucket["total"] = ended - started
    samples.append({k: v * 1000 for k, v in bucket.items()})
    await get_state().slot_release(concurrency_key(identity.user_id), session_id)  # the session ends


async def scenario(name: str, tokens: list[str], iterations: int, concurrency: int) -> dict[str, Any]:
    samples: list[dict[str, float]] = []
    if concurrency <= 1:
        for i in range(iterations):
            await decide_once(tokens[i % len(tokens)], samples)
    else:
        queue = iter(range(iterations))

        async def worker() -> None:
            for i in queue:
                await decide_once(tokens[i % len(tokens)], samples)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarise(name, samples, concurrency)


def summarise(name: str, samples: list[dict[str, float]], concurrency: int) -> dict[str, Any]:
    totals = [s["total"] for s in samples]
    mean_total = sum(totals) / len(totals)
    components = sorted({k for s in samples for k in s} - {"total"})
    parts = {}
    for comp in components:
        values = [s.get(comp, 0.0) for s in samples]
        parts[comp] = {"mean": sum(values) / len(values), "p50": pct(values, 50), "p99": pct(values, 99),
                       "share_of_mean_total": sum(values) / len(values) / mean_total}
    return {"scenario": name, "calls": len(samples), "concurrency": concurrency,
            "total_ms": {"mean": mean_total, "p50": pct(totals, 50), "p95": pct(totals, 95),
                         "p99": pct(totals, 99), "max": max(totals)},
            "components_ms": parts}


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from voice.services.auth import issue_access_token
    from voice.services.state import get_state

    tag = time.strftime("%H%M%S")
    recurring = [issue_access_token(user_id=f"acc-{tag}-r{i}", plan="elite", minutes=120) for i in range(args.users)]
    distinct = [issue_access_token(user_id=f"acc-{tag}-d{i}", plan="elite", minutes=120)
                for i in range(args.iterations)]
    warm: list[dict[str, float]] = []
    for token in recurring:  # creates the local users/profiles: later calls are the recurring path
        await decide_once(token, warm)
    # Like the production server (voice/server.py VoiceServer.startup): long-lived objects frozen out of
    # the garbage collector, so a gen-2 collection does not stall the loop for ~70 ms.
    gc.collect()
    gc.freeze()
    results = [
        await scenario("recurring", recurring, args.iterations, 1),
        await scenario("distinct (first connection: creates user+profile)", distinct, args.iterations, 1),
        await scenario(f"burst ({args.burst} in flight, recurring)", recurring, args.iterations, args.burst),
    ]
    await get_state().aclose()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--users", type=int, default=200, help="recurring user pool")
    parser.add_argument("--burst", type=int, default=32, help="decisions in flight in the burst scenario")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    parser.add_argument("--db", default="/tmp/bench-access.sqlite3")
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations, args.users = 500, 100
    started = time.time()
    prepare_db(args.db)
    setup_django(args.db)
    instrument()
    if args.loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    info = machine()
    results = asyncio.run(run(args))
    payload = {"bench": "access", "args": vars(args), "machine": info, "loadavg_at_end": loadavg(),
               "elapsed_s": time.time() - started, "target_p99_ms": TARGET_P99_MS, "results": results}
    path = write_result("access", payload)
    rows = []
    for r in results:
        t, comps = r["total_ms"], r["components_ms"]
        db = comps.get("db_user_profile", {})
        redis = sum(comps.get(k, {}).get("mean", 0.0) for k in ("redis_rate_check", "redis_slot_acquire"))
        rows.append([r["scenario"], r["calls"], t["p50"], t["p95"], t["p99"], t["mean"],
                     f"{db.get('mean', 0):.3f} ({100 * db.get('share_of_mean_total', 0):.0f} %)",
                     f"{redis:.3f} ({100 * redis / t['mean']:.0f} %)",
                     f"{comps.get('jwt', {}).get('mean', 0):.3f}"])
    print(table(["scenario", "calls", "p50 ms", "p95 ms", "p99 ms", "mean ms", "DB lookup mean ms (share)",
                 "Redis mean ms (share)", "JWT mean ms"], rows))
    print("\ncomponents (mean / p99 ms):")
    for r in results:
        print(" ", r["scenario"] + ":", ", ".join(
            f"{k} {v['mean']:.3f}/{v['p99']:.3f}" for k, v in r["components_ms"].items()))
    print(f"\ntarget p99 < {TARGET_P99_MS} ms; raw results: {path.relative_to(ROOT)}; load {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
