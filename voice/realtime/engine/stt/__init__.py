"""Offline speech recognition for the local engine, behind one small interface.

A `Recogniser` takes pcm16 24 kHz mono audio as it arrives (`feed` returns the current hypothesis'
words, which may still be revised) and returns the final transcript at the end of the utterance
(`finish`). `create_recogniser(language, model_dir)` returns the best one available or None; today that is
PocketSphinx for English with a domain language model built from the knowledge base (`domain_lm`).
There is no French recogniser: French turns keep the engine's scripted/placeholder path.

Recognition never runs on the event loop: the engine talks to `service.RecognitionService`, which
runs recognisers in a worker process (PocketSphinx holds the GIL while decoding).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

ENGLISH = "en"


class Recogniser(Protocol):
    """One utterance's incremental recogniser."""

    name: str

    def feed(self, pcm: bytes) -> list[str]:
        """Called with each chunk of pcm16 24 kHz mono audio; returns the current hypothesis' words."""
        ...

    def finish(self) -> str:
        """Called once at the end of the utterance; returns the final transcript."""
        ...


def unavailable_reason(language: str | None = ENGLISH) -> str | None:
    """Why no recogniser can serve `language` here (None when one can)."""
    if (language or ENGLISH).split("-")[0].lower() != ENGLISH:
        return f"no offline recogniser for language {language!r} (English only; see docs/DEPLOYMENT.md)"
    try:
        found = importlib.util.find_spec("pocketsphinx") is not None
    except (ImportError, ValueError):  # a broken or blocked installation counts as none
        found = False
    if not found:
        return "pocketsphinx is not installed (pip install -r requirements/speech.txt)"
    return None


def create_recogniser(language: str | None, model_dir: Path) -> Recogniser | None:
    """Return the best recogniser for `language`, or None; builds the domain model when missing."""
    if unavailable_reason(language) is not None:
        return None
    from .pocketsphinx_recogniser import PocketSphinxRecogniser

    return PocketSphinxRecogniser(model_dir)
