"""Speech recognition capacity: how many utterances one recognition worker (one core) decodes in real time.

Drives `RecognitionService` (the engine's worker process, PocketSphinx + the domain language model)
directly: N streams at once, each the manifest's English questions back to back, fed as 40 ms chunks at
real-time pace, then finished. Per level it reports the worker's CPU-seconds per audio-second (load-
independent), the decode lag (audio sent but not yet decoded, sampled at each chunk), the finish -> final
latency, and how many utterances the engine dropped (lag over LOCAL_ENGINE_STT_MAX_LAG_MS: the turn
gets the "at capacity" placeholder). Also a single-stream in-process figure without the pipe.

  .venv/bin/python bench/stt_capacity.py                 # levels 1,4,8,16,24,32 (~2 min)
  .venv/bin/python bench/stt_capacity.py --levels 1,8 --pin 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
import wave
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    SHARED_AUDIO,
    loadavg,
    machine,
    pct,
    proc_cpu_seconds,
    summary,
    table,
    write_result,
)
from voice.realtime.engine.stt.service import OK, Listener, RecognitionService
from voice.realtime.engine.stt.wer import word_error_rate

CHUNK = 1920  # 40 ms at 24 kHz pcm16


def english_questions() -> list[tuple[str, bytes]]:
    """(transcript, pcm) of the manifest's English WAVs."""
    manifest = json.loads((SHARED_AUDIO / "manifest.json").read_text())
    out = []
    for entry in manifest["files"]:
        if entry["language"] == "en":
            with wave.open(str(SHARED_AUDIO / entry["file"])) as w:
                out.append((entry["transcript"], w.readframes(w.getnframes())))
    return out


def in_process(questions: list[tuple[str, bytes]], model_dir: Path) -> dict[str, Any]:
    """One recogniser in this process, fed as fast as it decodes: the pure decoding cost."""
    from voice.realtime.engine.stt.pocketsphinx_recogniser import PocketSphinxRecogniser

    rows = []
    for _ in range(2):  # the first utterance of a process is decoded twice (cold cepstral mean)
        for transcript, pcm in questions:
            started = time.process_time()
            rec = PocketSphinxRecogniser(model_dir)
            for i in range(0, len(pcm), CHUNK):
                rec.feed(pcm[i : i + CHUNK])
            final = rec.finish()
            rows.append({"cpu_s": time.process_time() - started, "audio_s": len(pcm) / 48000,
                         "wer": word_error_rate(transcript, final), "final": final})  # fmt: skip
    warm = rows[len(questions) :]
    return {"utterances": rows, "cold_cpu_per_audio_s": rows[0]["cpu_s"] / rows[0]["audio_s"],
            "warm_cpu_per_audio_s": sum(r["cpu_s"] for r in warm) / sum(r["audio_s"] for r in warm)}  # fmt: skip


async def one_stream(service: RecognitionService, questions: list, delay: float, out: dict) -> None:
    """One simulated speaker: every question once, real-time pace, then the final."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(delay)
    for transcript, pcm in questions:
        final: asyncio.Future = loop.create_future()
        listener = Listener(loop, lambda words: None, lambda text, why, f=final: f.done() or f.set_result((text, why)))
        stream = service.open("en", listener)
        if stream is None:
            out["refused"] += 1
            continue
        clock = time.monotonic()
        for i in range(0, len(pcm), CHUNK):
            stream.feed(pcm[i : i + CHUNK])
            if not stream.done:
                out["lag_ms"].append(max(0.0, stream.sent_ms - stream.decoded_ms))
            clock += 0.040
            await asyncio.sleep(max(0.0, clock - time.monotonic()))
        finished = time.monotonic()
        stream.finish()
        try:
            text, why = await asyncio.wait_for(final, 30)
        except TimeoutError:
            text, why = "", "timeout"
        out["final_ms"].append((time.monotonic() - finished) * 1000)
        out["audio_s"] += len(pcm) / 48000
        if why == OK:
            out["wer"].append(word_error_rate(transcript, text))
        else:
            out["dropped"] += 1


async def level(model_dir: Path, streams: int, questions: list, max_lag_ms: float, max_streams: int) -> dict[str, Any]:
    service = RecognitionService(model_dir, max_streams=max_streams, max_lag_ms=max_lag_ms)
    service.start()
    while not service.ready:
        await asyncio.sleep(0.05)
    pid = service._proc.pid
    out: dict[str, Any] = {"lag_ms": [], "final_ms": [], "wer": [], "dropped": 0, "refused": 0, "audio_s": 0.0}
    cpu0, wall0, load0 = proc_cpu_seconds(pid), time.monotonic(), loadavg()[0]
    rng = random.Random(streams)
    await asyncio.gather(*(one_stream(service, questions, rng.uniform(0, 1.0), out) for _ in range(streams)))
    cpu = proc_cpu_seconds(pid) - cpu0
    service.stop()
    utterances = streams * len(questions)
    return {
        "streams": streams, "utterances": utterances, "dropped": out["dropped"], "refused": out["refused"],
        "wall_s": time.monotonic() - wall0, "worker_cpu_s": cpu, "audio_s": out["audio_s"],
        "cpu_per_audio_s": cpu / out["audio_s"] if out["audio_s"] else None,
        "lag_ms": summary(out["lag_ms"]), "final_ms": summary(out["final_ms"]),
        "wer_mean": sum(out["wer"]) / len(out["wer"]) if out["wer"] else None, "loadavg_before": load0,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,4,8,16,24,32")
    parser.add_argument("--max-lag-ms", type=float, default=2000)
    parser.add_argument("--max-streams", type=int, default=1000,
                        help="admission limit (LOCAL_ENGINE_STT_MAX_STREAMS; default: none, to find the limit)")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    args = parser.parse_args(argv)
    questions = english_questions()
    model_dir = Path(tempfile.mkdtemp(prefix="bench-speech-"))
    started = time.time()
    info = machine()
    single = in_process(questions, model_dir)
    print(f"in process: cold {single['cold_cpu_per_audio_s']:.3f}, warm {single['warm_cpu_per_audio_s']:.3f} "
          f"CPU-s per audio-s", flush=True)  # fmt: skip
    levels = []
    for n in (int(x) for x in args.levels.split(",")):
        result = asyncio.run(level(model_dir, n, questions, args.max_lag_ms, args.max_streams))
        levels.append(result)
        lag, final = result["lag_ms"]["p95"] or 0, result["final_ms"]["p95"] or 0
        print(f"{n:3d} streams: refused {result['refused']} dropped {result['dropped']}/{result['utterances']} "
              f"cpu/audio {result['cpu_per_audio_s'] or 0:.3f} lag p95 {lag:.0f} ms final p95 {final:.0f} ms "
              f"load {result['loadavg_before']}", flush=True)
    payload = {"bench": "stt_capacity", "args": vars(args), "machine": info, "loadavg_at_end": loadavg(),
               "elapsed_s": time.time() - started, "in_process": single, "levels": levels}  # fmt: skip
    path = write_result("stt-capacity" + (f"-{args.tag}" if args.tag else ""), payload)
    print()
    print(table(["streams", "CPU-s per audio-s", "lag p95 ms", "final p50 ms", "final p95 ms", "refused", "dropped",
                 "WER"],
                [[r["streams"], f"{r['cpu_per_audio_s'] or 0:.3f}", r["lag_ms"]["p95"], r["final_ms"]["p50"],
                  r["final_ms"]["p95"],
                  f"{r['refused']}/{r['utterances']}", f"{r['dropped']}/{r['utterances']}", r["wer_mean"]]
                 for r in levels]))  # fmt: skip
    print(f"raw results: {path} (p50 of lag over all levels: {pct([r['lag_ms']['p50'] or 0 for r in levels], 50)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
