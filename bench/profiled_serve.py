"""Bench only: the production server (`voice_serve --loop uvloop --no-access-log`'s config) whose threads carry
their Python names in /proc (so CPU per thread can be told apart), and with --out its event loop thread under
cProfile; the stats are written to --out when it stops (SIGTERM drains as usual).

Used by `bench/storm.py --profile` to split one admission's CPU between its components (JWT, access
decision, Redis, upstream handshake, WebSocket handshake, ...). The profiler roughly doubles the loop's
CPU, so read shares of the profile, and absolute CPU from a run without it.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", default="", help="cProfile the loop thread; stats written here")
    args = parser.parse_args()
    _name_os_threads()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "intelia_voice.settings")
    import django

    django.setup()
    from voice.server import VoiceServer, server_config

    config = server_config(host="127.0.0.1", port=args.port, access_log=False, loop="uvloop")
    if not args.out:
        VoiceServer(config).run()
        return
    profiler = cProfile.Profile(time.thread_time)  # the loop thread's CPU, not wall time

    class ProfiledServer(VoiceServer):
        async def shutdown(self, sockets: Any = None) -> None:
            await super().shutdown(sockets)
            profiler.disable()
            profiler.dump_stats(args.out)  # here: uvicorn re-raises SIGTERM once `run` returns

    profiler.enable()
    ProfiledServer(config).run()


def _name_os_threads() -> None:
    """Python threads get their name (e.g. voice-db-writer_0) as the OS thread's (Linux, prctl)."""
    libc = ctypes.CDLL(None)
    bootstrap = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

    def named(self: threading.Thread) -> None:
        libc.prctl(15, self.name[:15].encode(), 0, 0, 0)  # PR_SET_NAME
        bootstrap(self)

    threading.Thread._bootstrap_inner = named  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
