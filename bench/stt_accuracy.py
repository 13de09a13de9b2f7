"""Speech recognition accuracy (WER) of the local engine's recogniser, on the test questions and on held-out ones.

The manifest's English WAVs are the acceptance set. The held-out questions below were written for this
bench (other topics of the knowledge base, several phrasings that match none of the language model's
question forms) and synthesised with espeak-ng at run time like the manifest's (24 kHz, 0.5 s of silence
before, 1 s after), so the figure says how much the question forms flatter the test set. Each language
model is measured warm (the channel estimate from one other utterance) with the product's recogniser.
What matters for answers is also given: whether the local retriever's top document for the recognised
transcript is the one it finds for the true question ("same top document").

  .venv/bin/python bench/stt_accuracy.py        # ~1 min; needs requirements/speech.txt and espeak-ng
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SHARED_AUDIO, loadavg, machine, setup_django, table, write_result
from voice.realtime.engine.stt import domain_lm
from voice.realtime.engine.stt.knowledge import bundled_files
from voice.realtime.engine.stt.pocketsphinx_recogniser import ChannelMean, PocketSphinxRecogniser, wheel_dictionary
from voice.realtime.engine.stt.wer import word_error_rate

HELD_OUT = [
    "How much feed does a broiler eat per day at three weeks?",
    "What is the minimum ventilation rate in winter?",
    "How many hours of light do laying hens need?",
    "What relative humidity should the house have at placement?",
    "How do I keep the litter dry?",
    "What are the signs of heat stress in broilers?",
    "What stocking density is recommended for broilers?",
    "When should pullets be photostimulated?",
    "How do I check crop fill after placement?",
    "What water quality problems affect broilers?",
    "Which vaccines are given at the hatchery?",
    "Why are my chicks huddling under the heater?",
]


def espeak_wav(text: str, path: Path) -> bytes:
    """`text` spoken by espeak-ng as pcm16 24 kHz mono with the manifest's padding; returns the pcm."""
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-w", str(raw), text], check=True, capture_output=True)
    with wave.open(str(raw)) as w:
        rate, pcm = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)
    spectrum = np.fft.rfft(pcm)
    size = round(len(pcm) * 24000 / rate)
    resampled = np.fft.irfft(spectrum, n=size) * size / len(pcm)
    padded = np.concatenate((np.zeros(12000), resampled, np.zeros(24000)))
    return np.clip(np.rint(padded), -32768, 32767).astype("<i2").tobytes()


def manifest_set() -> list[tuple[str, str, bytes]]:
    """(name, transcript, pcm) of the manifest's English WAVs."""
    out = []
    for entry in json.loads((SHARED_AUDIO / "manifest.json").read_text())["files"]:
        if entry["language"] == "en":
            with wave.open(str(SHARED_AUDIO / entry["file"])) as w:
                out.append((entry["file"], entry["transcript"], w.readframes(w.getnframes())))
    return out


def top_document(retriever: Any, text: str) -> str | None:
    """The title of the retriever's best passage for `text` (None: nothing found)."""
    import asyncio

    passages = asyncio.run(retriever.search(text, limit=1))
    return passages[0].title if passages else None


def decode(model_dir: Path, pcm: bytes, warm_with: bytes) -> str:
    """The final transcript of `pcm`, the channel estimate warmed by another utterance."""
    channel = ChannelMean()
    for audio in (warm_with, pcm):
        recogniser = PocketSphinxRecogniser(model_dir, channel)
        recogniser.feed(audio)
        text = recogniser.finish()
    return text


def main() -> int:
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="bench-stt-accuracy-"))
    setup_django(str(work / "db.sqlite3"))
    from voice.rag.local import LocalRetriever

    retriever = LocalRetriever(work / "knowledge.sqlite3")
    sets: dict[str, list[tuple[str, str, bytes]]] = {"manifest": manifest_set()}
    if shutil.which("espeak-ng"):
        sets["held_out"] = [(f"q{i}", q, espeak_wav(q, work / f"q{i}.wav")) for i, q in enumerate(HELD_OUT)]
    forms = domain_lm.question_sentences
    models = {"knowledge + question forms (shipped)": forms, "knowledge only": lambda topics, **kw: []}
    results: list[dict[str, Any]] = []
    for label, builder in models.items():
        model_dir = work / label.split()[0].replace("+", "") / label.split()[-1].strip("()")
        domain_lm.question_sentences = builder
        domain_lm.build(bundled_files(), model_dir, wheel_dictionary())
        domain_lm.question_sentences = forms
        for set_name, items in sets.items():
            rows = []
            for i, (name, reference, pcm) in enumerate(items):
                other = items[(i + 1) % len(items)][2]
                text = decode(model_dir, pcm, other)
                expected, found = top_document(retriever, reference), top_document(retriever, text)
                rows.append({"name": name, "reference": reference, "transcript": text,
                             "wer": word_error_rate(reference, text), "top_document": found,
                             "same_top_document": found == expected})  # fmt: skip
            mean = sum(r["wer"] for r in rows) / len(rows)
            same = sum(r["same_top_document"] for r in rows)
            results.append({"model": label, "set": set_name, "wer_mean": mean, "same_top_document": same,
                            "wer_max": max(r["wer"] for r in rows), "utterances": rows})  # fmt: skip
            print(f"{label:40s} {set_name:9s} WER mean {mean:.3f} same top document {same}/{len(rows)}", flush=True)
    payload = {"bench": "stt_accuracy", "machine": machine(), "loadavg_at_end": loadavg(),
               "elapsed_s": time.time() - started, "results": results}  # fmt: skip
    path = write_result("stt-accuracy", payload)
    print()
    print(table(["language model", "set", "utterances", "WER mean", "WER max", "same top document"],
                [[r["model"], r["set"], len(r["utterances"]), f"{r['wer_mean']:.3f}", f"{r['wer_max']:.3f}",
                  f"{r['same_top_document']}/{len(r['utterances'])}"] for r in results]))  # fmt: skip
    print(f"raw results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
