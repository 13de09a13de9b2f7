"""Which knowledge files the domain language model is built from (shared by ingest and first use)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from . import domain_lm

BUNDLED_DIR = Path(__file__).resolve().parents[3] / "knowledge"  # voice/knowledge
SUFFIXES = (".md", ".markdown", ".txt")


def bundled_files() -> list[Path]:
    """The knowledge bundled with the product (what the local RAG index is seeded with)."""
    return sorted(p for p in BUNDLED_DIR.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


def rebuild(model_dir: Path, ingested: Iterable[Path], *, reset: bool = False) -> dict:
    """Called by `voice_ingest`: rebuild from the files just ingested plus, unless the index was reset,
    those the previous model was built from (else the bundled knowledge)."""
    from .pocketsphinx_recogniser import wheel_dictionary

    files = [p.resolve() for p in ingested]
    if not reset:
        files += domain_lm.previous_sources(model_dir) or bundled_files()
    return domain_lm.build(files, model_dir, wheel_dictionary())
