"""How long glibc's malloc_trim(0) makes the event loop's thread wait for its own allocations.

The gateway's loop allocates an audio frame's buffers (a few KB, from glibc's heap) for every frame; a trim
in another thread holds the heap's lock while it walks it. This builds a fragmented heap of the gateway's
size under a soak (~150 MB of few-KB blocks, every other one freed), trims it from a thread a few times, and
times every frame-sized allocation of the main thread meanwhile. `--heap-mb` scales the heap.

    .venv/bin/python bench/malloc_trim_stall.py [--heap-mb 150] [--trims 5]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, pct, write_result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heap-mb", type=float, default=150.0)
    parser.add_argument("--trims", type=int, default=5)
    args = parser.parse_args(argv)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    blocks = int(args.heap_mb * 1e6 / 8600)  # 2.6-14.6 KB: frames, deltas, JSON documents
    held = [os.urandom(2600 + i % 12000) for i in range(blocks)]
    del held[::2]  # holes all over the heap, none at its top
    trims_ms: list[float] = []

    def trimmer() -> None:
        nonlocal held
        for _ in range(args.trims):
            time.sleep(0.3)
            started = time.perf_counter()
            libc.malloc_trim(0)
            trims_ms.append((time.perf_counter() - started) * 1000)
            held = [os.urandom(2600 + i % 12000) for i in range(blocks // 2)]  # fragment again
            del held[::2]

    thread = threading.Thread(target=trimmer)
    thread.start()
    waits_ms: list[float] = []
    recent: list[bytearray] = []
    while thread.is_alive():
        started = time.perf_counter()
        recent.append(bytearray(2600))  # one client frame's worth
        waits_ms.append((time.perf_counter() - started) * 1000)
        if len(recent) > 2000:
            del recent[:1000]
        time.sleep(0.0002)
    result = {
        "bench": "malloc_trim_stall", "args": vars(args), "machine": machine(),
        "trim_ms": [round(t, 1) for t in trims_ms],
        "main_thread_alloc_ms": {"n": len(waits_ms), "p99": pct(waits_ms, 99), "p99_9": pct(waits_ms, 99.9),
                                 "max": max(waits_ms)},
    }
    print(f"trims: {', '.join(f'{t:.1f}' for t in trims_ms)} ms; main-thread allocation during them: "
          f"p99.9 {result['main_thread_alloc_ms']['p99_9']:.2f} ms, max {max(waits_ms):.1f} ms")
    print(f"raw results: {write_result('malloc-trim-stall', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
