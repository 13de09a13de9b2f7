"""The soak load generator's CPU per sent frame, without sockets: bench/soak.py's `session` coroutines
driven against a stand-in picows transport (send is a no-op), at real-time pace, on one core.

Measures only the sending side's Python work (pacing, frame choice, bookkeeping): process CPU time over
the streaming window divided by the frames sent. Not the kernel's socket work, not the receiving side.

  .venv/bin/python bench/soak_loadgen_cost.py --sessions 200 --seconds 15   # taskset -c 0 for a quiet core
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class FakeTransport:
    """The picows WSTransport surface the soak's sender uses; sending costs nothing."""

    is_disconnected = False

    def __init__(self) -> None:
        self.sent = 0

    def send(self, kind: Any, payload: bytes) -> None:
        self.sent += 1

    def send_close(self, *args: Any) -> None:
        self.is_disconnected = True

    def disconnect(self, *args: Any) -> None:
        self.is_disconnected = True


async def fake_connect(factory: Any, url: str, **kw: Any) -> tuple[FakeTransport, Any]:
    client = factory()
    client.ready.set_result(None)
    client.gone.set_result(None)
    return FakeTransport(), client


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    import picows
    import uvloop

    from bench import soak
    from bench.common import machine, write_result

    picows.ws_connect = fake_connect  # soak.session imports it at call time
    random.seed(1)
    audio, _script = soak.load_audio()

    async def run() -> tuple[int, float]:
        tot = soak.Totals()
        sem = asyncio.Semaphore(10**6)
        end_at = time.monotonic() + args.seconds
        cpu0 = time.process_time()
        await asyncio.gather(*(soak.session(i, "ws://x", "t", f"u{i}", audio, end_at, random.uniform(1.0, 2.0), 3.0,
                                            tot, sem) for i in range(args.sessions)))
        return tot.sent, time.process_time() - cpu0

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        sent, cpu = runner.run(run())
    print(f"{sent} frames, {cpu:.2f} CPU-s: {cpu / sent * 1e6:.1f} µs per frame (sender only, no sockets)")
    path = write_result("soak-loadgen-cost" + (f"-{args.tag}" if args.tag else ""), {
        "bench": "soak_loadgen_cost", "tag": args.tag, "machine": machine(), "sessions": args.sessions,
        "seconds": args.seconds, "frames": sent, "cpu_s": cpu, "cpu_us_per_frame": cpu / sent * 1e6,
    })  # fmt: skip
    print("->", path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
