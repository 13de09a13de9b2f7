"""Response audio: espeak-ng (French or English voice) when installed, else a speech-like tone; cached."""

from __future__ import annotations

import asyncio
import base64
import shutil
import struct
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .language import ENGLISH, FRENCH, normalise_language
from .vad import BYTES_PER_MS, SAMPLE_RATE

CHARS_PER_SECOND = 14.0  # tone duration: roughly a speaking rate
_CACHE_MAX = 512
ESPEAK_VOICES = {FRENCH: "fr-fr", ENGLISH: "en"}  # Debian espeak-ng-data ships both
_cache: dict[tuple[str, str, str, int], Clip] = {}


@dataclass(frozen=True)
class Clip:
    """Synthesized audio for one text, pre-split into base64 pcm16 chunks ready for delta events."""

    text: str
    chunks: tuple[str, ...]
    chunk_ms: tuple[int, ...]  # duration of each chunk (the last may be shorter)
    duration_ms: int
    backend: str  # "espeak" | "tone"


@lru_cache(maxsize=1)
def espeak_path() -> str | None:
    """Where espeak-ng is, looked up once per process."""
    return shutil.which("espeak-ng")


def tone_pcm(text: str) -> bytes:
    """A syllable-modulated voiced tone whose length follows the text; silent at spaces and punctuation."""
    seconds = max(0.6, len(text) / CHARS_PER_SECOND)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n, dtype=np.float32) / SAMPLE_RATE
    pitch = 140.0 + 25.0 * np.sin(2 * np.pi * 0.7 * t)  # slow intonation glide
    phase = np.cumsum(2 * np.pi * pitch / SAMPLE_RATE, dtype=np.float64).astype(np.float32)
    voice = np.sin(phase) + 0.5 * np.sin(2 * phase) + 0.25 * np.sin(3 * phase)
    # Map every sample to a character: letters are voiced, everything else is a short pause.
    chars = np.frombuffer(text.encode("utf-32-le") or b"\0\0\0\0", dtype="<u4")
    voiced = np.array([chr(c).isalnum() for c in chars.tolist()], dtype=np.float32)
    gate = voiced[np.minimum((t / seconds * len(voiced)).astype(np.int64), len(voiced) - 1)]
    # 10 ms moving average (via cumsum: O(n)) removes clicks at the gate's edges.
    width = SAMPLE_RATE // 100
    csum = np.concatenate(([0.0], np.cumsum(gate, dtype=np.float64)))
    smooth = ((csum[width:] - csum[:-width]) / width).astype(np.float32)
    gate = np.concatenate((smooth, np.full(width - 1, smooth[-1], dtype=np.float32)))
    syllables = 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t) ** 2  # ~4 syllables per second
    signal = voice * gate * syllables * (0.18 * 32767)
    return np.clip(signal, -32768, 32767).astype("<i2").tobytes()


def _wav_payload(wav: bytes) -> tuple[int, bytes]:
    """Sample rate and pcm data of espeak's streamed WAV (its size fields may be bogus, so scan)."""
    rate = struct.unpack_from("<I", wav, 24)[0]
    pos = wav.find(b"data", 12)
    if pos < 0:
        raise ValueError("no data chunk")
    return rate, wav[pos + 8 :]


def resample(pcm: bytes, rate: int) -> bytes:
    """Linear-interpolation resample of pcm16 mono to 24 kHz."""
    src = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.float32)
    if rate == SAMPLE_RATE or not len(src):
        return src.astype("<i2").tobytes()
    n_out = int(len(src) * SAMPLE_RATE / rate)
    x_out = np.arange(n_out, dtype=np.float64) * (rate / SAMPLE_RATE)
    return np.interp(x_out, np.arange(len(src)), src).astype("<i2").tobytes()


def espeak_voice(language: str | None) -> str:
    """The espeak-ng voice for an answer language ("fr", "en-US"...); English for anything else."""
    return ESPEAK_VOICES[normalise_language(language)]


async def espeak_pcm(text: str, language: str) -> bytes:
    """Run espeak-ng off the event loop (asyncio subprocess; text on stdin so it is never an option)."""
    exe = espeak_path()
    if exe is None:
        raise FileNotFoundError("espeak-ng")
    proc = await asyncio.create_subprocess_exec(
        exe, "--stdout", "--stdin", "-v", espeak_voice(language),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(text.encode("utf-8")), timeout=30)
    if proc.returncode != 0 or len(out) < 44:
        raise RuntimeError(f"espeak-ng failed (rc={proc.returncode})")
    rate, pcm = _wav_payload(out)
    return resample(pcm, rate)


def chunk_clip(text: str, pcm: bytes, chunk_ms: int, backend: str) -> Clip:
    """Split pcm into base64 chunks once, so streaming a cached answer costs no encoding."""
    step = max(1, chunk_ms) * BYTES_PER_MS
    parts = [pcm[i : i + step] for i in range(0, len(pcm), step)]
    return Clip(
        text=text,
        chunks=tuple(base64.b64encode(p).decode("ascii") for p in parts),
        chunk_ms=tuple(len(p) // BYTES_PER_MS for p in parts),
        duration_ms=len(pcm) // BYTES_PER_MS,
        backend=backend,
    )


async def synthesize(text: str, *, backend: str = "auto", language: str = "en", chunk_ms: int = 200) -> Clip:
    """Called once per response with audio output; returns the (cached) clip for `text`."""
    use_espeak = backend in ("auto", "espeak") and espeak_path() is not None
    kind = "espeak" if use_espeak else "tone"
    key = (text, kind, espeak_voice(language) if use_espeak else "", chunk_ms)
    clip = _cache.get(key)
    if clip is not None:
        return clip
    pcm = b""
    if use_espeak:
        try:
            pcm = await espeak_pcm(text, language)
        except (OSError, RuntimeError, ValueError, TimeoutError):
            kind = "tone"  # a broken espeak must not break the conversation
    if not pcm:
        kind, pcm = "tone", tone_pcm(text)
    clip = chunk_clip(text, pcm, chunk_ms, kind)
    if len(_cache) >= _CACHE_MAX:
        _cache.pop(next(iter(_cache)))  # FIFO eviction keeps memory bounded under varied answers
    _cache[key] = clip
    return clip
