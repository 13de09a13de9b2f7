"""The local engine's CPU cost per received audio frame (load-independent: process CPU time, not wall time).

Set-up: `manage.py realtime_engine` in a subprocess (as the soak runs it: tone TTS, first audio 300 ms, scripted
transcripts, RAG off), and N picows clients in this process, both pinned to one core (default 0). Each client
sends the gateway's own `session.update` (server VAD, create_response false, a streaming transcription model),
then streams 40 ms pcm16 frames at real-time pace, in the gateway's canonical append form: silence, and every
`--turn-every` seconds a spoken WAV from /work/shared/audio (a synthetic tone burst when absent), so the VAD
starts and stops turns; on speech_stopped the client asks for the answer (response.create) like the gateway.

Measured over the streaming window (after every session is configured, until the engine has drained the
last frame): the engine's utime + stime (/proc/<pid>/stat) divided by the frames it received. `--profile`
runs the engine under cProfile with the CPU clock instead (slower; for where the time goes, not for the figure)
and prints the top functions.

  .venv/bin/python bench/engine_cost.py                          # 50 sessions x 30 s (~40 s)
  .venv/bin/python bench/engine_cost.py --sessions 50 --seconds 20 --profile --tag prof
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import json
import math
import os
import pstats
import re
import signal
import struct
import sys
import time
import wave
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    CLK_TCK,
    PYTHON,
    ROOT,
    SHARED_AUDIO,
    Server,
    bench_env,
    free_port,
    machine,
    pin_self,
    write_result,
)

FRAME_BYTES = 1920  # 40 ms of 24 kHz pcm16
FRAME_S = 0.040
ENGINE_ENV = {
    "LOCAL_ENGINE_FIRST_AUDIO_MS": 300,
    "LOCAL_ENGINE_TTS": "tone",
    "LOCAL_ENGINE_TRANSCRIPT_DELAY_MS": 0,
    "RAG_BACKEND": "off",
    "LOG_LEVEL": "WARNING",
}  # as bench/soak.py runs the engine
TYPE = re.compile(rb'"type": ?"([^"]+)"')  # the first "type" of an event is the event's
PROFILE_PATH = Path("/tmp/bench-engine-cost.prof")


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process: the kernel's share is mostly the sockets' syscalls."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # utime, stime: fields 14 and 15 of stat(5)


def frames_of(pcm: bytes) -> list[bytes]:
    """The canonical append events of a pcm16 clip, one per 40 ms (the last one zero-padded)."""
    out = []
    for offset in range(0, len(pcm), FRAME_BYTES):
        chunk = pcm[offset : offset + FRAME_BYTES]
        audio = base64.b64encode(chunk + bytes(FRAME_BYTES - len(chunk)))
        out.append(b'{"type":"input_audio_buffer.append","audio":"' + audio + b'"}')
    return out


def load_turns() -> tuple[list[list[bytes]], list[str], str]:
    """Spoken clips as append events, the engine's script, and where they came from."""
    manifest = SHARED_AUDIO / "manifest.json"
    if manifest.exists():
        turns, script = [], []
        for entry in json.loads(manifest.read_text())["files"]:
            if entry.get("transcript"):
                with wave.open(str(SHARED_AUDIO / entry["file"]), "rb") as wav:
                    turns.append(frames_of(wav.readframes(wav.getnframes())))
                script.append(entry["transcript"])
        return turns, script, str(SHARED_AUDIO)
    # 0.5 s silence, 1.5 s of a loud 220 Hz tone, 1 s silence: one VAD turn
    tone = b"".join(struct.pack("<h", int(12000 * math.sin(2 * math.pi * 220 * i / 24000))) for i in range(36000))
    return [frames_of(bytes(24000) + tone + bytes(48000))], ["What is the ideal brooding temperature?"], "synthetic"


def session_update() -> bytes:
    """The gateway's session.update (voice/realtime/session_config.py with the default settings)."""
    detection = {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 500,
        "create_response": False,
        "interrupt_response": True,
    }
    session = {
        "type": "realtime",
        "model": "gpt-realtime",
        "instructions": "You are Intelia Expert.",
        "output_modalities": ["audio"],
        "tools": [],
        "tool_choice": "auto",
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": {"model": "gpt-realtime-whisper"},
                "noise_reduction": {"type": "near_field"},
                "turn_detection": detection,
            },
            "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin"},
        },
    }
    return json.dumps({"type": "session.update", "session": session}).encode()


class Counts:
    """Events received by all clients (one event loop: no locks)."""

    def __init__(self) -> None:
        self.events: dict[str, int] = {}
        self.updated = 0


def client_class(counts: Counts) -> Any:
    from picows import WSListener, WSMsgType

    class EngineClient(WSListener):
        """Counts the engine's events; asks for the answer when a turn ends, as the gateway does."""

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            if frame.msg_type is WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()
                return
            raw = frame.get_payload_as_bytes()
            head = TYPE.search(raw, 0, 80)
            kind = head.group(1).decode() if head else "?"
            counts.events[kind] = counts.events.get(kind, 0) + 1
            if kind == "session.updated":
                counts.updated += 1
            elif kind == "input_audio_buffer.speech_stopped":
                transport.send(WSMsgType.TEXT, b'{"type":"response.create"}')

    return EngineClient


async def run_clients(url: str, args: argparse.Namespace, turns: list[list[bytes]], engine_pid: int) -> dict[str, Any]:
    from picows import WSCloseCode, WSMsgType, ws_connect

    counts = Counts()
    listener = client_class(counts)
    transports = []
    for _ in range(args.sessions):
        transport, _client = await ws_connect(listener, url, extra_headers={"Authorization": "Bearer sk-bench"})
        transport.send(WSMsgType.TEXT, session_update())
        transports.append(transport)
    while counts.updated < args.sessions:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    silence = frames_of(bytes(FRAME_BYTES))[0]
    ticks = int(args.seconds / FRAME_S)
    every = max(1, int(args.turn_every / FRAME_S))
    (user0, sys0), client0, sent = cpu_split(engine_pid), time.process_time(), 0
    clock = time.monotonic()
    for tick in range(ticks):
        for i, transport in enumerate(transports):
            # session i starts a turn at its own phase of the cycle, with its own clip
            pos = tick + i * every // args.sessions
            at, clip = pos % every, turns[(i + pos // every) % len(turns)]
            transport.send(WSMsgType.TEXT, clip[at] if at < len(clip) else silence)
            sent += 1
        clock += FRAME_S
        await asyncio.sleep(max(0.0, clock - time.monotonic()))
    await asyncio.sleep(args.drain)  # the last frames, and the answers they started
    user, system = cpu_split(engine_pid)
    user, system = user - user0, system - sys0
    cpu = user + system
    client_cpu = time.process_time() - client0
    for transport in transports:
        transport.send_close(WSCloseCode.OK)
    await asyncio.sleep(0.3)
    for transport in transports:
        transport.disconnect()
    return {
        "frames": sent,
        "engine_cpu_s": cpu,
        "engine_user_s": user,
        "engine_system_s": system,
        "cpu_us_per_frame": cpu / sent * 1e6,
        "client_cpu_s": client_cpu,
        "events": dict(sorted(counts.events.items())),
    }


def serve_profiled(port: int) -> None:
    """The engine process of --profile: `manage.py realtime_engine` under cProfile on the CPU clock."""
    import django

    django.setup()
    import uvloop

    from voice.realtime.engine import EngineConfig
    from voice.realtime.engine.server import serve

    profile = cProfile.Profile(time.process_time)  # the engine is one thread: process CPU = its thread's
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    profile.enable()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve("127.0.0.1", port, EngineConfig()))
    except KeyboardInterrupt:
        pass
    finally:
        profile.disable()
        profile.dump_stats(PROFILE_PATH)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30.0, help="streaming window")
    parser.add_argument("--turn-every", type=float, default=20.0, help="seconds between spoken turns per session")
    parser.add_argument("--drain", type=float, default=1.5, help="seconds after the last frame, still measured")
    parser.add_argument("--cpu", type=int, default=0, help="core of the engine and the clients (-1: unpinned)")
    parser.add_argument("--profile", action="store_true", help="cProfile the engine (CPU clock) instead")
    parser.add_argument("--tag", default="")
    parser.add_argument("--serve-profiled", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_profiled:
        serve_profiled(args.serve_profiled)
        return 0
    cpu = None if args.cpu < 0 else args.cpu
    pin_self(cpu)
    import uvloop

    turns, script, source = load_turns()
    script_path = Path("/tmp/bench-engine-cost-script.json")
    script_path.write_text(json.dumps(script, ensure_ascii=False))
    port = free_port()
    env = bench_env("/tmp/bench-engine-cost.sqlite3", **ENGINE_ENV, LOCAL_ENGINE_SCRIPT=str(script_path))
    cmd = [PYTHON, "manage.py", "realtime_engine", "--port", str(port)]
    if args.profile:
        cmd = [PYTHON, str(Path(__file__).resolve()), "--serve-profiled", str(port)]
    engine = Server("engine-cost", cmd, port, env=env, cpu=cpu)
    try:
        engine.wait_ready()
        url = f"ws://127.0.0.1:{port}/v1/realtime?model=gpt-realtime"
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(run_clients(url, args, turns, engine.pid))
    finally:
        if args.profile and engine.proc.poll() is None:
            engine.proc.send_signal(signal.SIGTERM)
            engine.proc.wait(30)
        engine.stop()
    head = subprocess_head()
    frames, user, system = result["frames"], result["engine_user_s"], result["engine_system_s"]
    payload = {
        "bench": "engine_cost",
        "tag": args.tag,
        "commit": head,
        "machine": machine(),
        "audio": source,
        "sessions": args.sessions,
        "seconds": args.seconds,
        "turn_every_s": args.turn_every,
        "pinned_cpu": cpu,
        "profiled": args.profile,
        **result,
    }
    name = "engine-cost" + (f"-{args.tag}" if args.tag else "")
    path = write_result(name, payload)
    print(
        f"{result['frames']} frames, engine {result['engine_cpu_s']:.2f} CPU-s: "
        f"{result['cpu_us_per_frame']:.1f} µs per frame (user {user / frames * 1e6:.1f}, system "
        f"{system / frames * 1e6:.1f}; clients {result['client_cpu_s']:.2f} CPU-s)"
    )
    print("events:", result["events"])
    print("->", path.relative_to(ROOT))
    if args.profile:
        pstats.Stats(str(PROFILE_PATH)).sort_stats("tottime").print_stats(30)
    return 0


def subprocess_head() -> str:
    """The commit measured (and whether the tree had changes)."""
    import subprocess

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "voice"], cwd=ROOT, capture_output=True, text=True)
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
