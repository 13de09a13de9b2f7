"""The recognition worker process: `python -m voice.realtime.engine.stt.worker MODEL_DIR`.

Reads framed messages on stdin, runs one recogniser per open stream, and writes back the hypothesis
(after each batch of audio) and the final transcript. Everything that arrived in one read is decoded
before hypotheses are sent, so a worker that falls behind catches up in larger, cheaper steps.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from . import Recogniser, create_recogniser, unavailable_reason, wire
from .pocketsphinx_recogniser import ensure_model

BYTES_PER_MS = 48


class Stream:
    """One utterance being recognised."""

    def __init__(self, recogniser: Recogniser) -> None:
        self.recogniser = recogniser
        self.audio_bytes = 0
        self.cpu_s = 0.0
        self.words: list[str] = []
        self.dirty = False  # the hypothesis changed since it was last sent
        self.fed = False  # audio arrived since progress was last sent


def main(model_dir: Path) -> int:
    """Called as the worker's entry point; returns the exit status."""
    out = os.fdopen(sys.stdout.fileno(), "wb", buffering=0)
    reason = unavailable_reason("en")
    if reason is None:
        try:
            ensure_model(model_dir)
        except Exception as exc:  # noqa: BLE001 - reported to the engine, which degrades
            reason = f"cannot build the domain language model: {type(exc).__name__}: {exc}"
    if reason is not None:
        out.write(wire.json_frame(wire.FAILED, 0, {"reason": reason}))
        return 1
    out.write(wire.json_frame(wire.READY, 0, {"recogniser": "pocketsphinx", "model_dir": str(model_dir)}))
    streams: dict[int, Stream] = {}
    reader = wire.FrameReader(sys.stdin.fileno())
    while (messages := reader.read()) is not None:
        replies: list[bytes] = []
        # A cancelled utterance's audio still queued is skipped: it matters when the worker is behind.
        cancelled = {sid for op, sid, _ in messages if op == wire.CANCEL}
        for op, sid, payload in messages:
            if op != wire.AUDIO or sid not in cancelled:
                handle(op, sid, payload, streams, replies, model_dir)
        for sid, stream in streams.items():
            if stream.fed:  # progress on every batch (the engine's lag bound), words only when changed
                body = {"audio_ms": stream.audio_bytes // BYTES_PER_MS, "changed": stream.dirty}
                if stream.dirty:
                    body["words"] = stream.words
                replies.append(wire.json_frame(wire.HYP, sid, body))
                stream.fed = stream.dirty = False
        if replies:
            out.write(b"".join(replies))
    return 0


def handle(
    op: int, sid: int, payload: bytes, streams: dict[int, Stream], replies: list[bytes], model_dir: Path
) -> None:
    """Apply one engine message to the open streams, appending replies."""
    try:
        if op == wire.OPEN:
            started = time.process_time()
            recogniser = create_recogniser(payload.decode() or "en", model_dir)
            if recogniser is None:
                replies.append(wire.json_frame(wire.FAILED, sid, {"reason": unavailable_reason(payload.decode())}))
                return
            streams[sid] = Stream(recogniser)
            streams[sid].cpu_s += time.process_time() - started
        elif op == wire.AUDIO and sid in streams:
            stream = streams[sid]
            started = time.process_time()
            words = stream.recogniser.feed(payload)
            stream.cpu_s += time.process_time() - started
            stream.audio_bytes += len(payload)
            stream.fed = True
            stream.dirty = stream.dirty or words != stream.words
            stream.words = words
        elif op == wire.FINISH and sid in streams:
            stream = streams.pop(sid)
            started = time.process_time()
            text = stream.recogniser.finish()
            stream.cpu_s += time.process_time() - started
            replies.append(
                wire.json_frame(
                    wire.FINAL,
                    sid,
                    {"text": text, "audio_ms": stream.audio_bytes // BYTES_PER_MS, "cpu_s": round(stream.cpu_s, 4)},
                )
            )
        elif op == wire.CANCEL:
            streams.pop(sid, None)
    except Exception as exc:  # noqa: BLE001 - one broken utterance must not take the others down
        streams.pop(sid, None)
        replies.append(wire.json_frame(wire.FAILED, sid, {"reason": f"{type(exc).__name__}: {exc}"}))


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "var/speech")))
