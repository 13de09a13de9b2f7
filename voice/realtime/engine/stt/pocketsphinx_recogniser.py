"""PocketSphinx (en-us acoustic model from the wheel) with the knowledge base's domain language model."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from pathlib import Path

from . import domain_lm
from .resample import Resampler24to16

log = logging.getLogger(__name__)
_BUILD_LOCK = threading.Lock()
CHANNEL_NAME = "channel-mean.json"  # not part of the model: survives rebuilds


def wheel_dictionary() -> Path:
    """The CMU pronunciation dictionary bundled in the pocketsphinx wheel."""
    from pocketsphinx import get_model_path

    return Path(get_model_path()) / "en-us" / "cmudict-en-us.dict"


def ensure_model(model_dir: Path) -> tuple[Path, Path]:
    """Return (lm, dict) paths, building them from the bundled knowledge first when missing."""
    lm, dic = model_dir / domain_lm.LM_NAME, model_dir / domain_lm.DICT_NAME
    with _BUILD_LOCK:
        if not (lm.is_file() and dic.is_file()):
            from .knowledge import bundled_files

            summary = domain_lm.build(bundled_files(), model_dir, wheel_dictionary())
            log.info("speech: built the domain language model in %s (%s)", model_dir, summary)
    return lm, dic


class ChannelMean:
    """The cepstral mean of recent utterances, the start point of the next one (kept in the model dir).

    The acoustic model was trained with per-utterance (batch) mean normalisation; streaming must start
    from an estimate, and PocketSphinx's built-in default is far enough from real input that a first
    utterance can come out as nonsense. So each finished utterance refines the estimate (saved, so a
    restarted worker starts warm), and an utterance started without one is decoded a second time at
    the end with its own mean."""

    def __init__(self) -> None:
        self.value: list[float] | None = None
        self.path: Path | None = None

    def load(self, model_dir: Path) -> None:
        """Called when a recogniser is created: read the saved estimate once per model directory."""
        path = model_dir / CHANNEL_NAME
        if self.path == path:
            return
        self.path = path
        try:
            value = json.loads(path.read_text())
            self.value = [float(v) for v in value] if isinstance(value, list) and value else None
        except (OSError, ValueError, TypeError):
            self.value = None

    def update(self, cmn: str) -> None:
        """Called after each utterance with the decoder's mean over it."""
        new = [float(v) for v in cmn.split(",")]
        self.value = new if self.value is None else [(a + b) / 2 for a, b in zip(self.value, new, strict=True)]
        if self.path is not None:
            with contextlib.suppress(OSError):
                domain_lm.write_atomic(self.path, json.dumps([round(v, 4) for v in self.value]))

    def text(self) -> str | None:
        """The estimate in PocketSphinx's format, or None before the first utterance."""
        return None if self.value is None else ",".join(f"{v:.4f}" for v in self.value)


CHANNEL = ChannelMean()


class PocketSphinxRecogniser:
    """One utterance; a fresh decoder per utterance (~30 ms) so a rebuilt model is picked up at once."""

    name = "pocketsphinx"

    def __init__(self, model_dir: Path, channel: ChannelMean = CHANNEL) -> None:
        from pocketsphinx import Decoder

        lm, dic = ensure_model(model_dir)
        # No flat-lexicon second pass: it costs ~75 ms at every turn end (measured: the final is ready in
        # ~2 ms without it) for one or two words on the test questions (docs/BENCHMARKS.md, section 6).
        self._decoder = Decoder(lm=str(lm), dict=str(dic), fwdflat=False, loglevel="FATAL")
        self._channel = channel
        channel.load(model_dir)
        self._cold = channel.text() is None
        if not self._cold:
            self._decoder.set_cmn(channel.text())
        self._resampler = Resampler24to16()
        self._audio = bytearray()  # 16 kHz, for the second pass of a cold utterance
        self._decoder.start_utt()
        self._final: str | None = None

    def feed(self, pcm: bytes) -> list[str]:
        """Called with each pcm16 24 kHz chunk; returns the current hypothesis' words."""
        audio = self._resampler.feed(pcm)
        if audio:
            self._decoder.process_raw(audio, False, False)
            if self._cold:
                self._audio += audio
        return self._words()

    def finish(self) -> str:
        """Called once at the end of the utterance; returns the final transcript."""
        if self._final is None:
            self._decoder.end_utt()
            if self._cold and self._audio:
                self._decoder.start_utt()  # again, whole utterance at once: its own mean, as trained
                self._decoder.set_cmn(self._decoder.get_cmn(True))
                self._decoder.process_raw(bytes(self._audio), False, True)
                self._decoder.end_utt()
            if self._audio or not self._cold:
                self._channel.update(self._decoder.get_cmn(True))
            self._final = " ".join(self._words())
        return self._final

    def _words(self) -> list[str]:
        hyp = self._decoder.hyp()
        return hyp.hypstr.split() if hyp is not None and hyp.hypstr else []
