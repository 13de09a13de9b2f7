"""Energy voice-activity detection on pcm16 24 kHz mono, O(n) numpy per append."""

from __future__ import annotations

import numpy as np

try:  # np.einsum's compiled core, without its Python wrapper and dispatch (~1 µs of a ~5 µs append)
    from numpy._core.multiarray import c_einsum as _einsum
except ImportError:  # another numpy layout: the public function computes the same
    _einsum = np.einsum

SAMPLE_RATE = 24000
BYTES_PER_MS = 48  # 24 kHz * 2 bytes
FRAME_MS = 20
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000
FRAME_BYTES = FRAME_SAMPLES * 2
MIN_SPEECH_FRAMES = 2  # 40 ms of loud audio before speech counts: ignores clicks


def threshold_to_dbfs(threshold: float) -> float:
    """Map OpenAI's 0..1 `threshold` onto an RMS level: 0 -> -70 dBFS, 0.5 -> -45, 1 -> -20."""
    return -70.0 + 50.0 * min(max(float(threshold), 0.0), 1.0)


class EnergyVad:
    """Server-VAD look-alike: emits ("start", audio_start_ms) and ("stop", audio_end_ms) on the buffer clock.

    The clock counts every byte ever fed (OpenAI measures from the start of all audio written to the
    session's buffer), so timestamps stay monotonic across turns.
    """

    def __init__(self, threshold: float = 0.5, prefix_padding_ms: int = 300, silence_duration_ms: int = 500):
        rms = 32768.0 * 10 ** (threshold_to_dbfs(threshold) / 20.0)
        # Compare the frame's sum of squares directly: no sqrt/log per frame.
        self._energy_threshold = float(rms * rms * FRAME_SAMPLES)
        self.prefix_padding_ms = int(prefix_padding_ms)
        self._silence_frames = max(1, int(silence_duration_ms) // FRAME_MS)
        self._carry = b""
        self._frame = 0  # index of the next frame on the session clock
        self._run = 0  # consecutive loud frames while idle
        self._quiet = 0  # consecutive quiet frames while in speech
        self._onset = 0  # frame where the current speech began
        self._floor_ms = 0  # audio before this was committed/cleared: speech cannot start earlier
        self.in_speech = False

    @property
    def speech_ms(self) -> int:
        """Milliseconds since the current speech onset (0 when idle); paces early transcripts."""
        return (self._frame - self._onset) * FRAME_MS if self.in_speech else 0

    def reset(self, at_ms: int) -> None:
        """Called on commit/clear: forget the current speech; earlier audio is no longer in the buffer."""
        self.in_speech = False
        self._run = self._quiet = 0
        self._floor_ms = at_ms

    def feed(self, pcm: bytes) -> list[tuple[str, int]]:
        """Called for each appended chunk; returns the turn boundaries it crossed, in order."""
        data = self._carry + pcm if self._carry else pcm
        frames = len(data) // FRAME_BYTES
        usable = frames * FRAME_BYTES
        self._carry = data[usable:]
        if not frames:
            return []
        samples = np.frombuffer(data, dtype="<i2", count=usable // 2).reshape(frames, FRAME_SAMPLES)
        flt = samples.astype(np.float32)
        loud = (_einsum("ij,ij->i", flt, flt) > self._energy_threshold).tolist()
        events: list[tuple[str, int]] = []
        for is_loud in loud:  # a few frames per append: the Python loop is cheap
            self._frame += 1
            if not self.in_speech:
                self._run = self._run + 1 if is_loud else 0
                if self._run >= MIN_SPEECH_FRAMES:
                    self.in_speech, self._quiet = True, 0
                    self._onset = self._frame - self._run
                    start = max(self._floor_ms, self._onset * FRAME_MS - self.prefix_padding_ms, 0)
                    events.append(("start", start))
            elif is_loud:
                self._quiet = 0
            else:
                self._quiet += 1
                if self._quiet >= self._silence_frames:
                    self.in_speech, self._run = False, 0
                    events.append(("stop", self._frame * FRAME_MS))
        return events
