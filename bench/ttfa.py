"""TTFA bench: speech end -> first answer audio through the gateway, without RAG, Option A, Option B.

The gateway (`manage.py voice_serve`, one server process per mode: the env differs) relays to the local
engine running standalone (`manage.py realtime_engine`, reached as the "openai" upstream over WebSocket)
and configured OpenAI-like: first audio 558 ms after `response.create`
(LOCAL_ENGINE_FIRST_AUDIO_MS), a transcript script (the transcripts of /work/shared/audio/manifest.json,
in order) so partial transcripts arrive during speech (one word per 250 ms of speech), and a local
retriever in the gateway that takes 447 ms per query (RAG_LOCAL_DELAY_MS). The engine itself never
retrieves (its env has RAG_BACKEND=off), like OpenAI. Modes:

  no_rag     RAG_BACKEND=off
  option_a   sequential: RAG_PREFETCH_MIN_WORDS=1000 (no prefetch during speech: the query runs at turn
             end) and RAG_WAIT_TIMEOUT_MS=2000 (the answer waits for the whole retrieval)
  option_b   defaults: prefetch from 5 words, wait bounded at 200 ms
  option_b_slow_rag  Option B with a 5 s retrieval (never ready): checks the 200 ms bound

Clients stream the shared WAVs (24 kHz pcm16) at real-time pace, 40 ms frames every 40 ms, with silence
between turns (an open microphone), several sessions in parallel. TTFA is measured at the client from
`input_audio_buffer.speech_stopped` (sent after 500 ms of silence) to the first
`response.output_audio.delta`; "injected" is the share of turns whose `gateway.rag.context` said so.

  .venv/bin/python bench/ttfa.py              # 5 sessions x 4 turns per mode (~4 min)
  .venv/bin/python bench/ttfa.py --quick      # 3 sessions x 2 turns per mode (~1.5 min)

--speech: real recognised speech instead of the script. The engine has no script and recognises the
English WAVs itself (voice/realtime/engine/stt, PocketSphinx in a worker process), so partial transcripts
arrive when the recogniser has them; modes default to no_rag,option_b. Also reported per turn: when the
5th transcript word reached the client relative to the end of speech (speech_stopped minus the VAD's
500 ms of silence; negative = before the user stopped), the recognised transcript and its WER.

  .venv/bin/python bench/ttfa.py --speech --sessions 3 --turns 4
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import tempfile
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
    free_port,
    issue_tokens,
    loadavg,
    machine,
    pct,
    prepare_db,
    setup_django,
    table,
    write_result,
)

FRAME_BYTES = 1920  # 40 ms
FRAME_S = 0.040
VAD_SILENCE_S = 0.5  # the gateway's VOICE_VAD_SILENCE_MS: speech_stopped comes this long after speech end
MODES: dict[str, dict[str, Any]] = {
    "no_rag": {"RAG_BACKEND": "off"},
    "option_a": {"RAG_BACKEND": "local", "RAG_PREFETCH_MIN_WORDS": 1000, "RAG_WAIT_TIMEOUT_MS": 2000},
    "option_b": {"RAG_BACKEND": "local", "RAG_PREFETCH_MIN_WORDS": 5, "RAG_WAIT_TIMEOUT_MS": 200},
    # The bound: a retrieval that never finishes in time (5 s) must cost at most the 200 ms wait.
    "option_b_slow_rag": {"RAG_BACKEND": "local", "RAG_PREFETCH_MIN_WORDS": 5, "RAG_WAIT_TIMEOUT_MS": 200,
                          "RAG_LOCAL_DELAY_MS": 5000},
}
ENGINE = {"LOCAL_ENGINE_FIRST_AUDIO_MS": 558, "LOCAL_ENGINE_TTS": "tone", "LOCAL_ENGINE_TRANSCRIPT_DELAY_MS": 0,
          "RAG_BACKEND": "off"}  # the engine never retrieves by itself (OpenAI does not either)
BASE = {"VOICE_UPSTREAM": "openai", "OPENAI_API_KEY": "bench", "RAG_LOCAL_DELAY_MS": 447}


def load_audio() -> tuple[list[tuple[str, bytes]], list[str]]:
    manifest = json.loads((SHARED_AUDIO / "manifest.json").read_text())
    turns, script = [], []
    for entry in manifest["files"]:
        if not entry.get("transcript"):
            continue  # the silence file: no turn
        with wave.open(str(SHARED_AUDIO / entry["file"]), "rb") as wav:
            assert wav.getframerate() == 24000 and wav.getsampwidth() == 2 and wav.getnchannels() == 1
            turns.append((entry["file"], wav.readframes(wav.getnframes())))
        script.append(entry["transcript"])
    return turns, script


async def run_session(url: str, token: str, turns: list[tuple[str, bytes]], n_turns: int, start_delay: float,
                      out: list[dict[str, Any]], errors: list[str]) -> None:
    from websockets.asyncio.client import connect

    await asyncio.sleep(start_delay)
    silence = base64.b64encode(bytes(FRAME_BYTES)).decode()
    try:
        ws = await connect(f"{url}?token={token}", max_size=None, open_timeout=30, proxy=None, compression=None)
    except Exception as exc:
        errors.append(f"connect: {exc!r}"[:160])
        return
    state: dict[str, Any] = {"turn": None}
    ready = asyncio.Event()
    turn_done = asyncio.Event()

    async def reader() -> None:
        async for raw in ws:
            now = time.monotonic()
            event = json.loads(raw)
            kind = event.get("type")
            turn = state["turn"]
            if kind == "gateway.session.ready":
                ready.set()
            elif turn is None:
                continue
            elif kind == "input_audio_buffer.speech_started":
                turn["speech_started"] = turn.get("speech_started") or now
            elif kind == "input_audio_buffer.speech_stopped" and "speech_stopped" not in turn:
                turn["speech_stopped"] = now
            elif kind == "conversation.item.input_audio_transcription.delta":
                if "first_partial" not in turn:
                    turn["first_partial"] = now
                turn["partial_text"] = turn.get("partial_text", "") + str(event.get("delta") or "")
                if "fifth_word" not in turn and len(turn["partial_text"].split()) >= 5:
                    turn["fifth_word"] = now
            elif kind == "conversation.item.input_audio_transcription.completed" and "transcript" not in turn:
                turn["transcript"] = event.get("transcript") or ""
            elif kind == "gateway.rag.context":
                turn["rag"] = {"injected": event.get("injected"), "latency_ms": event.get("latency_ms"),
                               "sources": len(event.get("sources") or []), "at": now}
            elif kind == "response.output_audio.delta" and "speech_stopped" in turn and "first_audio" not in turn:
                turn["first_audio"] = now
            elif kind == "response.done":
                turn["response_status"] = (event.get("response") or {}).get("status")
                turn_done.set()
            elif kind in ("error", "gateway.error"):
                errors.append(json.dumps(event)[:200])

    read_task = asyncio.create_task(reader())
    try:
        await asyncio.wait_for(ready.wait(), 30)
        clock = time.monotonic()

        async def send(chunk_b64: str) -> None:
            nonlocal clock
            clock += FRAME_S
            delay = clock - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await ws.send('{"type":"input_audio_buffer.append","audio":"' + chunk_b64 + '"}')

        for k in range(n_turns):
            name, pcm = turns[k % len(turns)]
            turn: dict[str, Any] = {"file": name, "index": k}
            state["turn"] = turn
            turn_done.clear()
            for offset in range(0, len(pcm), FRAME_BYTES):
                chunk = pcm[offset:offset + FRAME_BYTES]
                if len(chunk) < FRAME_BYTES:
                    chunk += bytes(FRAME_BYTES - len(chunk))
                await send(base64.b64encode(chunk).decode())
            turn["audio_sent"] = time.monotonic()
            deadline = time.monotonic() + 15
            while not turn_done.is_set() and time.monotonic() < deadline:
                await send(silence)  # the microphone stays open
            for _ in range(8):  # a short pause before the next question
                await send(silence)
            out.append(turn)
    except Exception as exc:
        errors.append(f"session: {exc!r}"[:160])
    finally:
        read_task.cancel()
        try:
            await asyncio.wait_for(ws.close(), 3)
        except Exception:
            pass


async def run_mode(url: str, tokens: list[str], turns: list[tuple[str, bytes]], n_turns: int) -> tuple[list, list]:
    out: list[dict[str, Any]] = []
    errors: list[str] = []
    await asyncio.gather(*(run_session(url, tok, turns, n_turns, i * 1.3, out, errors) for i, tok in enumerate(tokens)))
    return out, errors


def warm_recogniser(model_dir: Path, pcm: bytes) -> None:
    """Build the speech model and decode one question, so the engine's first utterance is not a cold one
    (decoded twice: docs/BENCHMARKS.md, section 6, measures that start-up separately)."""
    from voice.realtime.engine.stt.pocketsphinx_recogniser import PocketSphinxRecogniser

    recogniser = PocketSphinxRecogniser(model_dir)
    recogniser.feed(pcm)
    recogniser.finish()


def speech_figures(turns: list[dict[str, Any]], references: dict[str, str]) -> dict[str, Any]:
    """--speech: when the 5th word arrived relative to speech end, and the recognised transcripts' WER."""
    from voice.realtime.engine.stt.wer import word_error_rate

    fifth = [(t["fifth_word"] - (t["speech_stopped"] - VAD_SILENCE_S)) * 1000
             for t in turns if "fifth_word" in t and "speech_stopped" in t]
    wer = [word_error_rate(references[t["file"]], t["transcript"]) for t in turns if "transcript" in t]
    return {"fifth_word_vs_speech_end_ms": {"p50": pct(fifth, 50), "p95": pct(fifth, 95),
                                            "max": max(fifth) if fifth else None, "n": len(fifth)},
            "wer_mean": sum(wer) / len(wer) if wer else None, "wer_max": max(wer) if wer else None,
            "transcripts": sorted({t.get("transcript", "") for t in turns})}


def summarise(mode: str, turns: list[dict[str, Any]], errors: list[str]) -> dict[str, Any]:
    ttfa = [(t["first_audio"] - t["speech_stopped"]) * 1000
            for t in turns if "first_audio" in t and "speech_stopped" in t]
    rag = [t.get("rag") for t in turns]
    injected = sum(1 for r in rag if r and r.get("injected"))
    ret_lat = [r["latency_ms"] for r in rag if r and r.get("latency_ms") is not None]
    return {"mode": mode, "turns": len(turns), "measured": len(ttfa),
            "ttfa_ms": {"p50": pct(ttfa, 50), "p95": pct(ttfa, 95), "max": max(ttfa) if ttfa else None,
                        "min": min(ttfa) if ttfa else None},
            "injected": injected, "injected_share": injected / len(turns) if turns else None,
            "retrieval_latency_ms_p50": pct(ret_lat, 50), "errors": errors[:10], "ttfa_all_ms": ttfa,
            "turn_files": [t["file"] for t in turns]}


def run_modes(args: argparse.Namespace, tag: str, engine_url: str,
              audio: list[tuple[str, bytes]], references: dict[str, str] | None = None) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        port = free_port()
        env = bench_env(args.db, **{**BASE, **MODES[mode]}, OPENAI_REALTIME_URL=engine_url)
        cmd = [PYTHON, "manage.py", "voice_serve", "--port", str(port), "--loop", "uvloop", "--no-access-log"]
        server = Server(f"ttfa-{mode}", cmd, port, env=env,
                        cpu=None if args.server_cpu < 0 else args.server_cpu).wait_ready()
        try:
            tokens = issue_tokens(f"ttfa-{tag}-{mode}", args.sessions)
            load_before = loadavg()[0]
            turns, errors = asyncio.run(run_mode(f"ws://127.0.0.1:{port}/v1/ws/voice", tokens, audio, args.turns))
        finally:
            server.stop()
        summary = summarise(mode, turns, errors)
        summary["loadavg_before"] = load_before
        summary["env"] = {**BASE, **MODES[mode]}
        if references:
            summary["speech"] = speech_figures(turns, references)
        results.append(summary)
        t = summary["ttfa_ms"]
        print(f"{mode:9s} turns {summary['turns']:3d} TTFA p50 {t['p50']:.0f} p95 {t['p95']:.0f} max {t['max']:.0f} ms "
              f"injected {summary['injected']}/{summary['turns']} errors {len(errors)} load {load_before}", flush=True)
    return results

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=5)
    parser.add_argument("--turns", type=int, default=4, help="turns per session")
    parser.add_argument("--modes", default="no_rag,option_a,option_b,option_b_slow_rag")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--server-cpu", type=int, default=-1, help="pin the gateway to this core (-1: unpinned)")
    parser.add_argument("--db", default="/tmp/bench-ttfa.sqlite3")
    parser.add_argument("--speech", action="store_true", help="recognised English speech instead of the script")
    args = parser.parse_args(argv)
    if args.quick:
        args.sessions, args.turns = 3, 2
    if args.speech and args.modes == parser.get_default("modes"):
        args.modes = "no_rag,option_b"
    started = time.time()
    prepare_db(args.db)
    setup_django(args.db)
    audio, script = load_audio()
    script_path = Path("/tmp/bench-ttfa-script.json")
    script_path.write_text(json.dumps(script, ensure_ascii=False))
    references = None
    engine_env: dict[str, Any] = {**ENGINE, "LOCAL_ENGINE_SCRIPT": str(script_path)}
    if args.speech:  # English only: there is no French recogniser
        references = dict(zip([name for name, _ in audio], script, strict=True))
        audio = [(name, pcm) for name, pcm in audio if name.startswith("en_")]
        model_dir = Path(tempfile.mkdtemp(prefix="bench-ttfa-speech-"))
        warm_recogniser(model_dir, audio[0][1])
        engine_env.update(LOCAL_ENGINE_SCRIPT="", LOCAL_ENGINE_STT="auto", LOCAL_ENGINE_STT_MODEL_DIR=str(model_dir))
    info = machine()
    tag = time.strftime("%H%M%S")
    # One standalone engine for every mode (`manage.py realtime_engine`): in process, the engine would fall
    # back to its own retrieval when the gateway injected nothing, which OpenAI never does.
    engine_port = free_port()
    engine = Server("ttfa-engine", [PYTHON, "manage.py", "realtime_engine", "--port", str(engine_port)],
                    engine_port, env=bench_env(args.db, **engine_env)).wait_ready()
    try:
        results = run_modes(args, tag, f"ws://127.0.0.1:{engine_port}/v1/realtime", audio, references)
    finally:
        engine.stop()
    by = {r["mode"]: r for r in results}
    verdict: dict[str, Any] = {}
    if "no_rag" in by and "option_b" in by and by["no_rag"]["measured"] and by["option_b"]["measured"]:
        base, b = by["no_rag"]["ttfa_ms"], by["option_b"]["ttfa_ms"]
        verdict = {
            "option_b_added_p50_ms": b["p50"] - base["p50"],
            "option_b_added_p95_ms": b["p95"] - base["p95"],
            "option_b_max_minus_no_rag_p50_ms": b["max"] - base["p50"],
            "goal_p95_le_30ms": b["p95"] - base["p95"] <= 30,
            "goal_never_more_than_200ms": b["max"] - base["p50"] <= 200,
        }
    if "no_rag" in by and "option_b_slow_rag" in by and by["option_b_slow_rag"]["measured"]:
        slow, base = by["option_b_slow_rag"]["ttfa_ms"], by["no_rag"]["ttfa_ms"]
        verdict["slow_rag_added_p50_ms"] = slow["p50"] - base["p50"]
        verdict["slow_rag_max_minus_no_rag_p50_ms"] = slow["max"] - base["p50"]
        verdict["slow_rag_bounded_by_200ms"] = slow["max"] - base["p50"] <= 200 + 30
    if "no_rag" in by and "option_a" in by and by["option_a"]["measured"]:
        verdict["option_a_added_p50_ms"] = by["option_a"]["ttfa_ms"]["p50"] - by["no_rag"]["ttfa_ms"]["p50"]
        verdict["option_a_added_p95_ms"] = by["option_a"]["ttfa_ms"]["p95"] - by["no_rag"]["ttfa_ms"]["p95"]
    payload = {"bench": "ttfa", "args": vars(args), "machine": info, "loadavg_at_end": loadavg(),
               "elapsed_s": time.time() - started, "engine": ENGINE, "gateway": BASE, "script": script,
               "results": results, "verdict": verdict}
    path = write_result("ttfa-speech" if args.speech else "ttfa", payload)
    print()
    print(table(["mode", "turns", "TTFA p50 ms", "TTFA p95 ms", "max ms", "context injected", "retrieval p50 ms"],
                [[r["mode"], r["turns"], r["ttfa_ms"]["p50"], r["ttfa_ms"]["p95"], r["ttfa_ms"]["max"],
                  f"{r['injected']}/{r['turns']} ({100 * (r['injected_share'] or 0):.0f} %)",
                  r["retrieval_latency_ms_p50"]] for r in results]))
    print("\n" + json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in verdict.items()}))
    for r in results:
        if "speech" in r:
            print(f"{r['mode']}: 5th word vs speech end {r['speech']['fifth_word_vs_speech_end_ms']}, "
                  f"WER mean {r['speech']['wer_mean']}")
    print(f"raw results: {path.relative_to(ROOT)} ({payload['elapsed_s']:.0f} s, load {loadavg()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
