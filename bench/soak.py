"""Soak bench: N voice sessions for D minutes through the gateway with every feature on; leaks and drift.

Set-up (all subprocesses, throwaway SQLite DB, Redis database 13):
  gateway   `manage.py voice_serve --loop uvloop`, pinned to core 1 (`taskset -c 1`), with JWT auth
            (one distinct user per session, MAX_SESSIONS_PER_USER_PER_HOUR=100000), Redis state and
            channel layer (REDIS_URL=redis://127.0.0.1:6379/13), RAG on (RAG_BACKEND=local, Option B)
            and the local engine as a real WebSocket upstream (VOICE_UPSTREAM=openai).
  engine    `manage.py realtime_engine` on core 0: OpenAI-like (tone TTS, first audio 300 ms, partial
            transcripts from the manifest's transcripts so the gateway's prefetch retrieves during speech,
            RAG_BACKEND=off in its own env like OpenAI).
  clients   this process, on core 0 (uvloop): every session streams 40 ms pcm16 frames at real-time pace
            (silence), and about every 20 s a speech WAV from /work/shared/audio, so turns happen: server
            VAD, transcripts, retrieval, a response with audio. picows clients (compiled framing, a callback per
            received event): with the `websockets` client (until 2026-12-04) this process took ~30 % of core 0
            beside the engine's ~45 %, and the round trips below queued behind the load generator itself.

Phases: a fresh gateway is probed ("cold"); a priming wave of N sessions (one turn each) fills the pools
that legitimately keep their high-water mark (Redis connection pool, worker threads); after everyone has
disconnected and a settle, the gateway is probed again ("warm" = the baseline); then the soak proper (N
new users, D minutes), sampled every 10 s; then all clients disconnect and, after a 5 s settle, the
gateway is probed a last time ("after").

Probes are taken from outside the gateway (it is not modified): RSS (/proc/<pid>/statm), open fds
(/proc/<pid>/fd), sockets among them classified via /proc/net/tcp{,6} (listening, client connections,
upstream connections to the engine, Redis connections, other), threads (/proc/<pid>/status), SQLite handles
(fds on the bench DB and its -wal/-shm, and on the RAG index), and Redis INFO clients (server-wide, so it
includes other users of this Redis; the per-process count of sockets to :6379 is exact).

Verdicts:
  memory      RSS growth from the end of warm-up (first 20 % of the run) to the end of the run < 5 %
  resources   after vs warm baseline: client/upstream sockets back to the baseline exactly; fds, threads,
              SQLite handles, Redis connections of the gateway within a small tolerance (a pool's
              high-water mark may rise by a couple of connections)
  frames      client frames sent == frames the gateway received (VoiceSession.frames_in), audio deltas
              the gateway sent (frames_out) == deltas the clients received; upstream integrity: the
              engine's VAD clock (speech_stopped.audio_end_ms) minus the offset at which the client
              started that WAV is the same for every turn of a file (a lost or duplicated frame shifts it)
  late        client send lateness (frames sent > 40 ms behind their real-time schedule)
  latency     frame round trip: the engine emits speech_stopped while processing a known frame, so the
              client measures send(that frame) -> speech_stopped received (client->gateway->engine->
              gateway->client, including the engine's work); and TTFA (speech_stopped -> first audio)

  .venv/bin/python bench/soak.py --quick                 # 50 sessions x 1 min (~2 min in all)
  .venv/bin/python bench/soak.py                         # 200 sessions x 10 min (~11 min)
  .venv/bin/python bench/soak.py --sessions 150 --minutes 30
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import contextlib
import json
import os
import random
import sys
import time
import wave
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    PYTHON,
    ROOT,
    SHARED_AUDIO,
    Server,
    bench_env,
    fmt,
    free_port,
    gateway_gauges,
    issue_tokens,
    loadavg,
    machine,
    pct,
    pin_self,
    prepare_db,
    proc_cpu_seconds,
    setup_django,
    table,
    write_result,
)

FRAME_BYTES = 1920  # 40 ms of 24 kHz pcm16
FRAME_S = 0.040
RING = 2048  # send times kept per session (82 s of frames)
LATE_MS = 40.0  # a frame sent more than one frame period behind schedule is "late"
MEMORY_GROWTH_LIMIT = 0.05
REDIS_PORT = 6379
# Full collections (each stalls every session's audio): how many, and their total time, at each probe.
GC_GEN2 = ('voice_gc_pause_seconds_count{generation="2"}', 'voice_gc_pause_seconds_sum{generation="2"}')
ENGINE_ENV = {"LOCAL_ENGINE_FIRST_AUDIO_MS": 300, "LOCAL_ENGINE_TTS": "tone", "LOCAL_ENGINE_TRANSCRIPT_DELAY_MS": 0,
              "RAG_BACKEND": "off"}  # like OpenAI, the engine never retrieves by itself
GATEWAY_ENV = {"VOICE_UPSTREAM": "openai", "OPENAI_API_KEY": "x", "RAG_BACKEND": "local",
               "MAX_SESSIONS_PER_USER_PER_HOUR": 100000, "LOG_LEVEL": "WARNING"}


# ==== probes (from outside the gateway) =====================================================================
def tcp_sockets() -> dict[int, tuple[int, int, str]]:
    """inode -> (local port, remote port, state hex) for every TCP socket of this network namespace."""
    out: dict[int, tuple[int, int, str]] = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(path) as f:
            next(f)
            for line in f:
                parts = line.split()
                if len(parts) < 10:
                    continue
                out[int(parts[9])] = (int(parts[1].rsplit(":", 1)[1], 16), int(parts[2].rsplit(":", 1)[1], 16),
                                      parts[3])
    return out


def probe(pid: int, *, gw_port: int, engine_port: int, db_path: str, rag_path: str,
          redis_client: Any = None) -> dict[str, Any]:
    fd_dir = f"/proc/{pid}/fd"
    targets = []
    for name in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            targets.append(os.readlink(f"{fd_dir}/{name}"))
    tcp = tcp_sockets()
    sock = {"listen": 0, "client": 0, "upstream": 0, "redis": 0, "other_tcp": 0, "non_tcp": 0}
    for target in targets:
        if not target.startswith("socket:["):
            continue
        inode = int(target[8:-1])
        entry = tcp.get(inode)
        if entry is None:
            sock["non_tcp"] += 1
        elif entry[2] == "0A":
            sock["listen"] += 1
        elif entry[0] == gw_port:
            sock["client"] += 1
        elif entry[1] == engine_port:
            sock["upstream"] += 1
        elif entry[1] == REDIS_PORT:
            sock["redis"] += 1
        else:
            sock["other_tcp"] += 1
    status = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    out: dict[str, Any] = {
        "t": time.time(), "rss_mb": int(status["VmRSS"].split()[0]) / 1024,
        "hwm_mb": int(status["VmHWM"].split()[0]) / 1024,
        "threads": int(status["Threads"]), "fds": len(targets),
        "sockets": sum(1 for t in targets if t.startswith("socket:")), "sock": sock,
        "sqlite_db_handles": sum(1 for t in targets if t.startswith(db_path)),
        "sqlite_rag_handles": sum(1 for t in targets if t.startswith(rag_path)),
        "pipes": sum(1 for t in targets if t.startswith("pipe:")),
        "anon_inodes": sum(1 for t in targets if t.startswith("anon_inode:")),
        "cpu_s": proc_cpu_seconds(pid),
    }
    gauges = gateway_gauges(gw_port, ("voice_event_loop_tasks", "voice_active_sessions", *GC_GEN2))
    out["loop_tasks"], out["active_sessions"] = gauges["voice_event_loop_tasks"], gauges["voice_active_sessions"]
    out["gc2_count"], out["gc2_seconds"] = (gauges[name] for name in GC_GEN2)
    if redis_client is not None:
        try:
            out["redis_connected_clients"] = int(redis_client.info("clients")["connected_clients"])
            out["redis_clients_db13"] = sum(1 for c in redis_client.client_list() if str(c.get("db")) == "13")
        except Exception as exc:
            out["redis_error"] = repr(exc)[:120]
    return out


def print_probe(p: dict[str, Any]) -> None:
    print(f"{p['phase']}: rss {p['rss_mb']:.1f} MB fds {p['fds']} threads {p['threads']} tasks {p['loop_tasks']} "
          f"sessions {p['active_sessions']} sock {p['sock']}", flush=True)


# ==== audio ====================================================================================================
APPEND_HEAD, APPEND_TAIL = b'{"type":"input_audio_buffer.append","audio":"', b'"}'  # the gateway's canonical form
SILENCE = APPEND_HEAD + base64.b64encode(bytes(FRAME_BYTES)) + APPEND_TAIL  # 40 ms of silence, ready to send


def load_audio() -> tuple[list[tuple[str, tuple[bytes, ...]]], list[str]]:
    """[(file, (append events of its 40 ms frames, ready to send))] for the spoken files, and their
    transcripts (the engine's script). Built once: the sending loop only picks the next payload."""
    manifest = json.loads((SHARED_AUDIO / "manifest.json").read_text())
    turns, script = [], []
    for entry in manifest["files"]:
        if not entry.get("transcript"):
            continue
        with wave.open(str(SHARED_AUDIO / entry["file"]), "rb") as wav:
            assert wav.getframerate() == 24000 and wav.getsampwidth() == 2 and wav.getnchannels() == 1
            pcm = wav.readframes(wav.getnframes())
        frames = []
        for offset in range(0, len(pcm), FRAME_BYTES):
            chunk = pcm[offset:offset + FRAME_BYTES]
            frames.append(APPEND_HEAD + base64.b64encode(chunk + bytes(FRAME_BYTES - len(chunk))) + APPEND_TAIL)
        turns.append((entry["file"], tuple(frames)))
        script.append(entry["transcript"])
    return turns, script


# ==== clients ==================================================================================================
class Totals:
    """Counters shared by every session of one wave (single event loop: no locks)."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.connected = 0
        self.live = 0
        self.sent = 0
        self.late = 0
        self.lateness = array.array("f")
        self.deltas = 0
        self.responses = 0
        self.connect_errors: list[str] = []
        self.errors: list[str] = []
        self.unexpected_close: dict[str, int] = {}
        self.turns: list[dict[str, Any]] = []
        self.sessions: list[dict[str, Any]] = []


def _soak_listener(rec: dict[str, Any], state: dict[str, Any], tot: Totals, send_times: array.array) -> Any:
    from picows import WSListener, WSMsgType

    class SoakClient(WSListener):
        """One soak session's receiving side: the handshake, then one callback per event (picows: compiled
        framing, no task or coroutine per received frame, so the load generator's core is not what the
        frame round trips measure)."""

        def __init__(self) -> None:
            super().__init__()
            self.ready = asyncio.get_running_loop().create_future()
            self.gone = asyncio.get_running_loop().create_future()

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            if frame.msg_type is WSMsgType.CLOSE:
                if not state["closing"]:  # the server's answer to our close is not the server closing
                    state["closed_by_server"] = frame.get_close_code()
                transport.send_close(frame.get_close_code())
                transport.disconnect()
                return
            if frame.msg_type is not WSMsgType.TEXT:
                return
            now = time.monotonic()
            raw = frame.get_payload_as_bytes()
            if not self.ready.done():
                event = json.loads(raw)
                if event.get("type") == "gateway.session.ready":
                    rec["session_id"] = event.get("session_id")
                    self.ready.set_result(None)
                elif event.get("type") == "gateway.error":
                    self.ready.set_exception(RuntimeError(f"refused {event.get('code')}"))
                return
            if b'"response.output_audio.delta"' in raw[:64]:
                rec["deltas"] += 1
                tot.deltas += 1
                turn = state["turn"]
                if turn is not None and "stopped_at" in turn and "first_audio_at" not in turn:
                    turn["first_audio_at"] = now
                return
            event = json.loads(raw)
            kind = event.get("type")
            turn = state["turn"]
            if kind == "input_audio_buffer.speech_stopped" and turn is not None and "stopped_at" not in turn:
                turn["stopped_at"] = now
                end_ms = int(event.get("audio_end_ms") or 0)
                trigger = (end_ms // 20 - 1) // 2  # the client frame the engine was processing
                turn["audio_end_ms"] = end_ms
                turn["vad_offset_ms"] = end_ms - 40 * turn["start_seq"]
                if 0 <= state["seq"] - trigger < RING and trigger >= turn["start_seq"]:
                    turn["frame_rtt_ms"] = (now - send_times[trigger % RING]) * 1000
            elif kind == "input_audio_buffer.speech_started" and turn is not None:
                turn.setdefault("started_at", now)
            elif kind == "gateway.rag.context" and turn is not None:
                turn["rag_injected"] = bool(event.get("injected"))
            elif kind == "response.done":
                tot.responses += 1
                if turn is not None:
                    turn["response_status"] = (event.get("response") or {}).get("status")
                state["turn_done"].set()
            elif kind in ("error", "gateway.error"):
                tot.errors.append(json.dumps(event)[:200])

        def on_ws_disconnected(self, transport: Any) -> None:
            if state["closed_by_server"] is None and not state["closing"]:
                state["closed_by_server"] = 1006
            if not self.ready.done():
                self.ready.set_exception(ConnectionError("closed during the handshake"))
            if not self.gone.done():
                self.gone.set_result(None)

    return SoakClient


class _Sender:
    """One session's frame pacing, as a timer callback per frame: the same schedule as a coroutine that
    sleeps until each frame is due, without a sleep future and a task step per frame (~5000 a second)."""

    def __init__(self, transport: Any, state: dict[str, Any], rec: dict[str, Any], tot: Totals,
                 send_times: array.array, audio: list[tuple[str, tuple[bytes, ...]]], k: int, end_at: float,
                 first_turn: float, turn_every: float) -> None:
        from picows import WSMsgType

        self.text = WSMsgType.TEXT
        self.transport, self.state, self.rec, self.tot, self.send_times = transport, state, rec, tot, send_times
        self.audio, self.k, self.end_at, self.turn_every = audio, k, end_at, turn_every  # k: the next file
        self.turn_done: asyncio.Event = state["turn_done"]
        self.frames: tuple[bytes, ...] = ()  # the WAV being sent; frames[pos:] still to send
        self.pos = 0
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.clock = time.monotonic()
        self.next_turn = self.clock + first_turn
        self._schedule()

    def _schedule(self) -> None:
        """The next frame is due FRAME_S after the previous one's slot: a timer, or now when already late."""
        while not self.done.done():
            self.clock += FRAME_S
            delay = self.clock - time.monotonic()
            if delay > 0:
                self.loop.call_later(delay, self._tick)
                return
            self._send()

    def _tick(self) -> None:
        """Called by the loop's timer when a frame is due."""
        if self.done.done():  # the session was cancelled meanwhile
            return
        self._send()
        self._schedule()

    def _send(self) -> None:
        """One frame (the WAV's next, else silence), its send time for the round trip, and the bookkeeping."""
        state, tot = self.state, self.tot
        try:
            now = time.monotonic()
            if self.transport.is_disconnected:
                if state["closed_by_server"] in (None, 1000) and now < self.end_at:
                    state["closed_by_server"] = "ended_early"
                self.done.set_result(None)
                return
            pending = self.pos < len(self.frames)
            if now >= self.end_at and not pending:
                self.done.set_result(None)
                return
            lateness = (now - self.clock) * 1000
            if lateness > LATE_MS:
                tot.late += 1
            tot.lateness.append(lateness)
            if not pending and now >= self.next_turn and state["turn"] is None:
                name, self.frames = self.audio[self.k % len(self.audio)]
                self.k += 1
                self.pos, pending = 0, True
                state["turn"] = {"file": name, "start_seq": state["seq"], "sent_at": now}
                self.turn_done.clear()
                self.next_turn = now + self.turn_every * random.uniform(0.9, 1.1)
            if pending:
                payload = self.frames[self.pos]
                self.pos += 1
                pending = self.pos < len(self.frames)
            else:
                payload = SILENCE
            seq = state["seq"]
            self.send_times[seq % RING] = time.monotonic()
            self.transport.send(self.text, payload)
            state["seq"] = seq + 1
            self.rec["sent"] += 1
            tot.sent += 1
            turn = state["turn"]
            if turn is not None and not pending and (self.turn_done.is_set() or now - turn["sent_at"] > 15):
                tot.turns.append(turn)
                state["turn"] = None
        except Exception as exc:  # ends the stream: the session records it (as "stream ...") and closes
            self.done.set_exception(exc)


async def session(i: int, url: str, token: str, user_id: str, audio: list[tuple[str, tuple[bytes, ...]]],
                  end_at: float, first_turn: float, turn_every: float, tot: Totals, sem: asyncio.Semaphore) -> None:
    from picows import WSCloseCode, ws_connect

    rec: dict[str, Any] = {"i": i, "user_id": user_id, "sent": 0, "deltas": 0, "session_id": None}
    send_times = array.array("d", bytes(8 * RING))
    state: dict[str, Any] = {"turn": None, "seq": 0, "closed_by_server": None, "closing": False,
                             "turn_done": asyncio.Event()}
    turn_done: asyncio.Event = state["turn_done"]
    try:
        async with sem:
            transport, client = await ws_connect(_soak_listener(rec, state, tot, send_times), f"{url}?token={token}",
                                                 websocket_handshake_timeout=60, max_frame_size=2**26)
            await asyncio.wait_for(asyncio.shield(client.ready), 60)
    except Exception as exc:
        tot.connect_errors.append(f"{type(exc).__name__}: {exc}"[:160])
        return
    tot.connected += 1
    tot.live += 1
    tot.sessions.append(rec)
    try:
        await _Sender(transport, state, rec, tot, send_times, audio, i, end_at, first_turn, turn_every).done
        # Let an answer in flight finish (it is counted), then close like a browser.
        if state["turn"] is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(turn_done.wait(), 8)
            tot.turns.append(state["turn"])
            state["turn"] = None
    except Exception as exc:
        tot.errors.append(f"stream {type(exc).__name__}: {exc}"[:160])
    if not transport.is_disconnected:
        state["closing"] = True
        transport.send_close(WSCloseCode.OK)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(client.gone), 6)  # the server's close answer
        transport.disconnect()
    if state["closed_by_server"] is not None and state["closed_by_server"] not in (1000,):
        code = str(state["closed_by_server"])
        tot.unexpected_close[code] = tot.unexpected_close.get(code, 0) + 1
    rec["closed_by_server"] = state["closed_by_server"]
    tot.live -= 1


async def wave_run(url: str, tokens: list[str], users: list[str], audio: list[tuple[str, tuple[bytes, ...]]],
                   duration: float, turn_every: float, first_turn_max: float, sampler: Any = None) -> Totals:
    tot = Totals()
    sem = asyncio.Semaphore(16)
    start = tot.start = time.monotonic()
    end_at = start + duration
    tasks = [asyncio.create_task(session(i, url, tok, users[i], audio, end_at,
                                         random.uniform(1.0, first_turn_max), turn_every, tot, sem))
             for i, tok in enumerate(tokens)]
    sample_task = asyncio.create_task(sampler(tot, start, end_at)) if sampler else None
    await asyncio.gather(*tasks)
    if sample_task is not None:
        sample_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sample_task
    return tot


# ==== orchestration ============================================================================================
def _growth(samples: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    loaded = [s for s in samples if s["phase"] == "load"]
    warm = [s for s in loaded if s["t_run"] >= 0.2 * duration]
    if len(warm) < 2:
        return {"verdict": "n/a (too few samples)"}
    first, last = warm[0], warm[-1]
    growth = (last["rss_mb"] - first["rss_mb"]) / first["rss_mb"]
    xs = [s["t_run"] / 60 for s in warm]
    ys = [s["rss_mb"] for s in warm]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs) or 1.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den
    return {"rss_at_warmup_end_mb": first["rss_mb"], "rss_at_end_mb": last["rss_mb"],
            "t_warmup_end_s": first["t_run"], "t_end_s": last["t_run"], "growth": growth,
            "slope_mb_per_min": slope, "rss_max_mb": max(ys),
            "verdict": "PASS" if growth < MEMORY_GROWTH_LIMIT else "FAIL"}


def _flat(p: dict[str, Any]) -> dict[str, Any]:
    keys = ("fds", "sockets", "threads", "sqlite_db_handles", "sqlite_rag_handles", "pipes", "anon_inodes",
            "loop_tasks", "active_sessions", "rss_mb", "redis_connected_clients", "redis_clients_db13")
    out = {k: p.get(k) for k in keys}
    out.update({f"sock_{k}": v for k, v in p["sock"].items()})
    return out


# Exact: a connection left behind is a leak. Tolerant: pools keep their high-water mark.
EXACT = ("sock_client", "sock_upstream", "sock_listen", "sock_other_tcp", "sqlite_db_handles", "active_sessions")
# Pools (Redis connections, and the fds/sockets they are) may end at the soak's own high-water mark.
POOLED = ("sock_redis", "sockets", "fds")
# loop_tasks: a live session owns ~7, so one session's leftovers exceed the tolerance (a scrape's own task
# and a rollout poll in flight may be counted at either probe).
TOLERANCE = {"loop_tasks": 2, "fds": 4, "sockets": 4, "threads": 2, "sock_redis": 3, "sock_non_tcp": 2,
             "sqlite_rag_handles": 1, "pipes": 0, "anon_inodes": 0}


def _pool_plateau(key: str, samples: list[dict[str, Any]], after: dict[str, Any]) -> int | None:
    """The load's peak of a pooled resource when the pool plateaued (the second half of the load never
    exceeded the first half's peak) and the after-probe is no higher: a high-water mark, not a leak."""
    loaded = [_flat(s)[key] for s in samples if s["phase"] == "load"]
    if len(loaded) < 4 or None in loaded:
        return None
    half = len(loaded) // 2
    first_peak, second_peak = max(loaded[:half]), max(loaded[half:])
    return first_peak if second_peak <= first_peak and after[key] <= first_peak else None


def _resources(cold: dict[str, Any], warm: dict[str, Any], after: dict[str, Any],
               samples: list[dict[str, Any]]) -> dict[str, Any]:
    c, w, a = _flat(cold), _flat(warm), _flat(after)
    rows, ok = [], True
    for key in (*EXACT, *TOLERANCE):
        tol = 0 if key in EXACT else TOLERANCE[key]
        passed = a[key] is not None and w[key] is not None and a[key] <= w[key] + tol
        verdict = "PASS" if passed else "FAIL"
        if not passed and key in POOLED:
            plateau = _pool_plateau(key, samples, a)
            if plateau is not None:  # the soak's own peak concurrency exceeded the priming wave's
                passed, verdict = True, f"PASS (pool high-water {plateau}, flat for the second half)"
        ok &= passed
        rows.append({"what": key, "cold": c[key], "warm_baseline": w[key], "after": a[key], "tolerance": tol,
                     "verdict": verdict})
    for key in ("redis_connected_clients", "redis_clients_db13", "rss_mb"):
        rows.append({"what": key + " (info)", "cold": c[key], "warm_baseline": w[key], "after": a[key],
                     "tolerance": None, "verdict": "info"})
    return {"rows": rows, "verdict": "PASS" if ok else "FAIL"}


def _accounting(tot: Totals, prefix: str) -> dict[str, Any]:
    from voice.models import VoiceSession, VoiceTurn

    rows = {r.external_user_id: r for r in VoiceSession.objects.filter(external_user_id__startswith=prefix)}
    missing, in_mismatch, out_mismatch = 0, [], []
    sent = recv = gw_in = gw_out = 0
    reasons: dict[str, int] = {}
    for rec in tot.sessions:
        row = rows.get(rec["user_id"])
        if row is None:
            missing += 1
            continue
        sent, recv = sent + rec["sent"], recv + rec["deltas"]
        gw_in, gw_out = gw_in + row.frames_in, gw_out + row.frames_out
        reasons[row.end_reason] = reasons.get(row.end_reason, 0) + 1
        if row.frames_in != rec["sent"]:
            in_mismatch.append((rec["user_id"], rec["sent"], row.frames_in))
        if row.frames_out != rec["deltas"]:
            out_mismatch.append((rec["user_id"], row.frames_out, rec["deltas"]))
    turns = VoiceTurn.objects.filter(session__external_user_id__startswith=prefix)
    first_audio = [t.first_audio_ms for t in turns if t.first_audio_ms is not None]
    return {
        "sessions_with_row": len(tot.sessions) - missing, "sessions_missing_row": missing,
        "client_frames_sent": sent, "gateway_frames_in": gw_in, "frames_lost_client_to_gateway": sent - gw_in,
        "gateway_deltas_out": gw_out, "client_deltas_received": recv, "deltas_lost_gateway_to_client": gw_out - recv,
        "sessions_frames_in_mismatch": in_mismatch[:10], "sessions_frames_out_mismatch": out_mismatch[:10],
        "n_in_mismatch": len(in_mismatch), "n_out_mismatch": len(out_mismatch), "end_reasons": reasons,
        "db_turns": turns.count(), "db_rag_injected": turns.filter(rag_injected=True).count(),
        "db_first_audio_ms": {"p50": pct(first_audio, 50), "p99": pct(first_audio, 99)},
    }


def _turn_stats(tot: Totals, duration: float, started: float) -> dict[str, Any]:
    turns = tot.turns
    rtt = [t["frame_rtt_ms"] for t in turns if "frame_rtt_ms" in t]
    ttfa = [(t["first_audio_at"] - t["stopped_at"]) * 1000 for t in turns if "first_audio_at" in t]
    offsets: dict[str, dict[int, int]] = {}
    for t in turns:
        if "vad_offset_ms" in t:
            per = offsets.setdefault(t["file"], {})
            per[t["vad_offset_ms"]] = per.get(t["vad_offset_ms"], 0) + 1
    # Integrity: one VAD offset per file (the modal one); other values = shifted audio.
    shifted = sum(sum(v for k, v in per.items() if k != max(per, key=per.get)) for per in offsets.values())

    def window(lo: float, hi: float) -> list[float]:
        return [t["frame_rtt_ms"] for t in turns if "frame_rtt_ms" in t and lo <= t["sent_at"] - started < hi]

    early, late = window(0.2 * duration, 0.4 * duration), window(0.8 * duration, duration + 60)
    return {
        "turns": len(turns), "speech_stopped": sum(1 for t in turns if "stopped_at" in t),
        "answered": sum(1 for t in turns if "first_audio_at" in t),
        "completed": sum(1 for t in turns if t.get("response_status") == "completed"),
        "rag_injected": sum(1 for t in turns if t.get("rag_injected")),
        "frame_rtt_ms": {"n": len(rtt), "p50": pct(rtt, 50), "p95": pct(rtt, 95), "p99": pct(rtt, 99),
                         "max": max(rtt) if rtt else None},
        "frame_rtt_ms_20_40pct": {"n": len(early), "p50": pct(early, 50), "p99": pct(early, 99)},
        "frame_rtt_ms_last_20pct": {"n": len(late), "p50": pct(late, 50), "p99": pct(late, 99)},
        "ttfa_ms": {"n": len(ttfa), "p50": pct(ttfa, 50), "p95": pct(ttfa, 95), "p99": pct(ttfa, 99),
                    "max": max(ttfa) if ttfa else None},
        "vad_offsets_by_file": {f: {str(k): v for k, v in per.items()} for f, per in offsets.items()},
        "turns_with_shifted_audio": shifted,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="50 sessions x 1 min")
    parser.add_argument("--turn-every", type=float, default=20.0, help="seconds between spoken turns per session")
    parser.add_argument("--prime", type=float, default=None, help="priming wave seconds (default 25, quick 15)")
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--sample-every", type=float, default=10.0)
    parser.add_argument("--server-cpu", type=int, default=1, help="-1: unpinned")
    parser.add_argument("--client-cpu", type=int, default=0, help="load generator and engine core (-1: unpinned)")
    parser.add_argument("--db", default="/tmp/bench-soak.sqlite3")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    if args.quick:
        args.sessions, args.minutes = 50, 1.0
    args.prime = args.prime if args.prime is not None else (15.0 if args.quick else 25.0)
    server_cpu = None if args.server_cpu < 0 else args.server_cpu
    client_cpu = None if args.client_cpu < 0 else args.client_cpu
    duration = args.minutes * 60
    started = time.time()

    prepare_db(args.db)
    setup_django(args.db)
    pin_self(client_cpu)
    import redis
    import uvloop
    from django.conf import settings as dj

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    rcli = redis.Redis.from_url(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"))
    info = machine()
    audio, script = load_audio()
    script_path = Path("/tmp/bench-soak-script.json")
    script_path.write_text(json.dumps(script, ensure_ascii=False))
    rag_path = dj.RAG_LOCAL_INDEX
    tag = time.strftime("%H%M%S")

    engine_port, gw_port = free_port(), free_port()
    engine = Server("soak-engine", [PYTHON, "manage.py", "realtime_engine", "--port", str(engine_port)], engine_port,
                    env=bench_env(args.db, **ENGINE_ENV, LOCAL_ENGINE_SCRIPT=str(script_path)), cpu=client_cpu)
    gateway = None
    samples: list[dict[str, Any]] = []
    try:
        engine.wait_ready()
        gw_env = bench_env(args.db, **GATEWAY_ENV, OPENAI_REALTIME_URL=f"ws://127.0.0.1:{engine_port}/v1/realtime")
        gateway = Server("soak-gateway", [PYTHON, "manage.py", "voice_serve", "--host", "127.0.0.1", "--port",
                                          str(gw_port), "--loop", "uvloop", "--no-access-log"],
                         gw_port, env=gw_env, cpu=server_cpu).wait_ready()
        url = f"ws://127.0.0.1:{gw_port}/v1/ws/voice"
        time.sleep(1.0)

        def take(phase: str, t_run: float = 0.0) -> dict[str, Any]:
            p = probe(gateway.pid, gw_port=gw_port, engine_port=engine_port, db_path=args.db, rag_path=rag_path,
                      redis_client=rcli)
            p.update(phase=phase, t_run=t_run, loadavg=loadavg()[0])
            return p

        cold = take("cold")
        print_probe(cold)

        # --- priming wave ---------------------------------------------------------------------------------
        prime_users = [f"soak-{tag}-prime-{i}" for i in range(args.sessions)]
        prime_tokens = issue_tokens(f"soak-{tag}-prime", args.sessions)
        t = time.time()
        prime = asyncio.run(wave_run(url, prime_tokens, prime_users, audio, args.prime, args.turn_every,
                                     max(2.0, args.prime / 3)))
        print(f"prime: {prime.connected}/{args.sessions} connected, {prime.responses} responses, "
              f"{len(prime.connect_errors)} connect errors in {time.time() - t:.0f} s", flush=True)
        time.sleep(args.settle)
        warm = take("warm")
        print_probe(warm)

        # --- soak --------------------------------------------------------------------------------------
        users = [f"soak-{tag}-run-{i}" for i in range(args.sessions)]
        tokens = issue_tokens(f"soak-{tag}-run", args.sessions)
        soak_start_wall = time.time()

        async def sampler(tot: Totals, start: float, end_at: float) -> None:
            last_cpu, last_t, last_sent = proc_cpu_seconds(gateway.pid), time.monotonic(), 0
            next_at = start + args.sample_every
            while True:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at += args.sample_every
                now = time.monotonic()
                s = take("load" if now <= end_at else "closing", now - start)
                s["server_cpu_util"] = (s["cpu_s"] - last_cpu) / (now - last_t)
                s["clients_live"], s["frames_sent"], s["deltas_received"] = tot.live, tot.sent, tot.deltas
                s["send_rate"] = (tot.sent - last_sent) / (now - last_t)
                s["late_frames"], s["turns"] = tot.late, len(tot.turns)
                last_cpu, last_t, last_sent = s["cpu_s"], now, tot.sent
                samples.append(s)
                print(f"t={s['t_run']:5.0f}s live {tot.live:3d} rss {s['rss_mb']:6.1f} MB fds {s['fds']:4d} "
                      f"thr {s['threads']:2d} tasks {s['loop_tasks']} "
                      f"client/up/redis {s['sock']['client']}/{s['sock']['upstream']}/"
                      f"{s['sock']['redis']} sqlite {s['sqlite_db_handles']} cpu {s['server_cpu_util']:.2f} "
                      f"send {s['send_rate']:.0f}/s late {tot.late} turns {len(tot.turns)} "
                      f"load {s['loadavg']}", flush=True)

        run = asyncio.run(wave_run(url, tokens, users, audio, duration, args.turn_every, args.turn_every,
                                   sampler))
        closed_wall = time.time()
        print(f"soak: {run.connected}/{args.sessions} connected, {run.sent} frames sent, {len(run.turns)} turns, "
              f"{run.responses} responses; all closed {closed_wall - soak_start_wall:.0f} s after start", flush=True)
        time.sleep(args.settle)
        after = take("after", closed_wall - soak_start_wall + args.settle)
        print_probe(after)
        gw_log_tail = gateway.log_path.read_text(errors="replace")[-3000:]
    finally:
        if gateway is not None:
            gateway.stop()
        engine.stop()

    memory = _growth(samples, duration)
    resources = _resources(cold, warm, after, samples)
    accounting = _accounting(run, f"soak-{tag}-run-")
    turns = _turn_stats(run, duration, run.start)
    lat = run.lateness
    lateness = {"p50": pct(list(lat), 50), "p99": pct(list(lat), 99), "max": max(lat) if lat else None,
                "late_frames": run.late, "late_share": run.late / max(1, run.sent)}
    frames_ok = (accounting["frames_lost_client_to_gateway"] == 0 and accounting["deltas_lost_gateway_to_client"] == 0
                 and accounting["sessions_missing_row"] == 0 and turns["turns_with_shifted_audio"] == 0)
    sessions_ok = run.connected == args.sessions and not run.unexpected_close
    verdicts = {
        "memory_growth_after_warmup_lt_5pct": memory.get("verdict"),
        "resources_back_to_baseline": resources["verdict"],
        "no_frame_lost": "PASS" if frames_ok else "FAIL",
        "all_sessions_connected_and_ended_cleanly": "PASS" if sessions_ok else "FAIL",
        "late_frames_lt_0.1pct": "PASS" if lateness["late_share"] < 0.001 else "FAIL",
    }
    foreign_note = [s["loadavg"] for s in samples]
    payload = {
        "bench": "soak", "args": vars(args), "machine": info, "loadavg_at_end": loadavg(),
        "elapsed_s": time.time() - started, "gateway_env": GATEWAY_ENV, "engine_env": ENGINE_ENV,
        "verdicts": verdicts, "memory": memory, "resources": resources, "accounting": accounting,
        "turns": turns, "client_send_lateness_ms": lateness, "gc_full": _gc_full(warm, after, duration),
        "sessions": {"requested": args.sessions, "connected": run.connected, "connect_errors": run.connect_errors[:10],
                     "connect_error_counts": _counts(run.connect_errors),
                     "unexpected_close_codes": run.unexpected_close, "errors": run.errors[:20],
                     "n_errors": len(run.errors), "responses": run.responses, "frames_sent": run.sent,
                     "deltas_received": run.deltas},
        "prime": {"connected": prime.connected, "responses": prime.responses, "errors": prime.errors[:5],
                  "connect_errors": prime.connect_errors[:5]},
        "probes": {"cold": cold, "warm": warm, "after": after}, "samples": samples,
        "loadavg_during": foreign_note, "gateway_log_tail": gw_log_tail,
    }
    name = "soak-quick" if args.quick else "soak"
    path = write_result(name + (f"-{args.tag}" if args.tag else ""), payload)

    print()
    print(table(["resource", "cold", "warm baseline", "after (+5 s settle)", "tolerance", "verdict"],
                [[r["what"], r["cold"], r["warm_baseline"], r["after"], r["tolerance"], r["verdict"]]
                 for r in resources["rows"]]))
    print()
    m = memory
    print(table(["check", "figures", "verdict"], [
        ["memory growth after warm-up (< 5 %)",
         f"{fmt(m.get('rss_at_warmup_end_mb'))} -> {fmt(m.get('rss_at_end_mb'))} MB "
         f"({fmt(100 * m['growth'] if 'growth' in m else None, 2)} %, "
         f"slope {fmt(m.get('slope_mb_per_min'), 2)} MB/min)",
         verdicts["memory_growth_after_warmup_lt_5pct"]],
        ["resources back to baseline", "see table above", verdicts["resources_back_to_baseline"]],
        ["frames", f"sent {accounting['client_frames_sent']} / gateway in {accounting['gateway_frames_in']}; "
                   f"deltas out {accounting['gateway_deltas_out']} / received {accounting['client_deltas_received']}; "
                   f"shifted-audio turns {turns['turns_with_shifted_audio']}", verdicts["no_frame_lost"]],
        ["sessions", f"{run.connected}/{args.sessions} connected, unexpected closes {run.unexpected_close or 0}"
                     + (f", connect errors {_counts(run.connect_errors)}" if run.connect_errors else ""),
         verdicts["all_sessions_connected_and_ended_cleanly"]],
        ["late frames (> 40 ms behind schedule)",
         f"{run.late} ({fmt(100 * lateness['late_share'], 3)} %), lateness p99 {fmt(lateness['p99'])} ms",
         verdicts["late_frames_lt_0.1pct"]],
        ["turns", f"{turns['turns']} turns, {turns['answered']} answered, {turns['rag_injected']} with RAG context",
         "info"],
        ["frame round trip (speech_stopped)", f"p50 {fmt(turns['frame_rtt_ms']['p50'])} / p99 "
                                              f"{fmt(turns['frame_rtt_ms']['p99'])} ms", "info"],
        ["TTFA (speech_stopped -> first audio)", f"p50 {fmt(turns['ttfa_ms']['p50'])} / p99 "
                                                 f"{fmt(turns['ttfa_ms']['p99'])} ms", "info"],
        ["full collections (soak proper)", f"{payload['gc_full']['count']} ({fmt(payload['gc_full']['per_min'])}/min), "
                                           f"mean {fmt(payload['gc_full']['mean_ms'])} ms", "info"],
    ]))
    print(f"\nraw results: {path.relative_to(ROOT)} ({payload['elapsed_s']:.0f} s, load {loadavg()})")
    return 0


def _gc_full(warm: dict[str, Any], after: dict[str, Any], duration: float) -> dict[str, Any]:
    """Generation-2 collections between the warm and the after probe (the gateway's voice_gc_pause_seconds)."""
    if after.get("loop_tasks") is None:  # the gateway's /metrics did not answer
        return {"count": None, "per_min": None, "mean_ms": None}
    count = (after.get("gc2_count") or 0) - (warm.get("gc2_count") or 0)  # absent: none observed yet
    seconds = (after.get("gc2_seconds") or 0) - (warm.get("gc2_seconds") or 0)
    return {"count": int(count), "per_min": count / (duration / 60),
            "mean_ms": 1000 * seconds / count if count else 0.0}


def _counts(messages: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for message in messages:
        out[message] = out.get(message, 0) + 1
    return out


if __name__ == "__main__":
    sys.exit(main())
