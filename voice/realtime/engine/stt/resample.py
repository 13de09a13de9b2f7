"""Streaming 24 kHz -> 16 kHz resampling of pcm16 (x2 up, low-pass FIR, /3 down), numpy only."""

from __future__ import annotations

import numpy as np

TAPS = 95  # at 48 kHz: ~1 ms of delay, > 50 dB of alias rejection above 8 kHz


def _lowpass(taps: int = TAPS, cutoff_hz: float = 7600.0, rate_hz: float = 48000.0) -> np.ndarray:
    n = np.arange(taps) - (taps - 1) / 2
    h = np.sinc(2 * cutoff_hz / rate_hz * n) * np.hamming(taps)
    return (h / h.sum() * 2).astype(np.float32)  # x2: the zero-stuffed signal lost half its energy


_FILTER = _lowpass()


class Resampler24to16:
    """Keeps the filter history between chunks, so chunk boundaries leave no clicks."""

    def __init__(self) -> None:
        self._history = np.zeros(TAPS - 1, np.float32)
        self._phase = 0  # index in the next filtered block of the next sample to keep
        self._odd = b""  # an odd trailing byte of the last chunk

    def feed(self, pcm: bytes) -> bytes:
        """Called with each pcm16 24 kHz chunk; returns the pcm16 16 kHz samples it completes."""
        data = self._odd + pcm
        usable = len(data) & ~1
        self._odd = data[usable:]
        x = np.frombuffer(data[:usable], dtype="<i2").astype(np.float32)
        if not len(x):
            return b""
        up = np.zeros(2 * len(x), np.float32)
        up[::2] = x
        block = np.concatenate((self._history, up))
        filtered = np.convolve(block, _FILTER, mode="valid")
        out = filtered[self._phase :: 3]
        self._phase = (self._phase - len(filtered)) % 3
        self._history = block[-(TAPS - 1) :]
        return np.clip(np.rint(out), -32768, 32767).astype("<i2").tobytes()
