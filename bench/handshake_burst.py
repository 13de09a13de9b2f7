"""Handshake burst: how long the server's loop stalls when N upgrade requests arrive at once on accepted
connections (a reconnect storm's clients connect one by one, then send their requests together).

The server (uvicorn with the voice protocols: PacedH11Protocol, VoiceWebSocketProtocol; a trivial app) runs
pinned to core 1 with Django and its objects frozen out of the collector and full collections off, as
`voice_serve` does; the client process, pinned to core 0, opens N TCP connections, waits, then writes N upgrade
requests back to back. A 2 ms timer on the server's loop records how late it fires.

  .venv/bin/python bench/handshake_burst.py                      # 250 connections, paced (the gateway's)
  .venv/bin/python bench/handshake_burst.py --http h11           # uvicorn's own h11 protocol, unpaced
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "intelia_voice.settings")

REQUEST = (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


async def app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
    await receive()
    await send({"type": "websocket.accept"})
    while (await receive())["type"] != "websocket.disconnect":
        pass


def clients(port: int, n: int, go: multiprocessing.synchronize.Event) -> None:
    os.sched_setaffinity(0, {0})
    go.wait()
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    time.sleep(0.2)  # every connection accepted before any request arrives
    for sock in socks:
        sock.sendall(REQUEST)
    time.sleep(2)


async def serve_and_measure(http_name: str, n: int) -> dict[str, float]:
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from voice.handshake_pacing import PacedH11Protocol
    from voice.server_ws import VoiceWebSocketProtocol

    os.sched_setaffinity(0, {1})
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 1_000_000)
    http = {"paced": PacedH11Protocol, "h11": H11Protocol}[http_name]
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, http=http, ws=VoiceWebSocketProtocol, lifespan="off",
                                           log_level="warning", ws_ping_interval=None, backlog=2048))
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started:
        await asyncio.sleep(0.01)
    go = multiprocessing.Event()
    proc = multiprocessing.Process(target=clients, args=(port, n, go))
    proc.start()
    lateness: list[float] = []

    async def probe() -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.002)
            lateness.append((time.perf_counter() - started - 0.002) * 1000)

    probing = asyncio.create_task(probe())
    go.set()
    await asyncio.sleep(2.0)
    probing.cancel()
    await asyncio.to_thread(proc.join)
    server.should_exit = True
    await serving
    lateness.sort()
    return {"connections": n, "http": http_name, "max_lateness_ms": round(lateness[-1], 1),
            "p99_lateness_ms": round(lateness[int(0.99 * (len(lateness) - 1))], 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=250)
    parser.add_argument("--http", choices=("paced", "h11"), default="paced")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    import django
    import uvloop

    django.setup()
    runs = [uvloop.run(serve_and_measure(args.http, args.connections)) for _ in range(args.repeat)]
    for run in runs:
        print(json.dumps(run), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
