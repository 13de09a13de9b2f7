"""`manage.py voice_ingest PATH`: load Markdown/text knowledge files into the RAG backend."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from voice.rag import create_retriever
from voice.rag.base import Retriever
from voice.rag.ingest import SUFFIXES, ingest_files, iter_files

BAR_WIDTH = 30


class Command(BaseCommand):
    help = (
        "Ingest knowledge documents (.md, .markdown, .txt; a file or a directory, recursively) into the "
        "RAG backend. Files are split into ~500-800 character chunks with stable ids (hash of the file "
        "path and chunk index): re-ingesting is idempotent and an edited file replaces its old chunks."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Called by Django to declare the command line."""
        parser.add_argument("path", help="A knowledge file or a directory searched recursively.")
        parser.add_argument(
            "--backend",
            choices=("local", "weaviate"),
            default=None,
            help="Target backend (default: RAG_BACKEND setting; 'local' when that is 'off').",
        )
        parser.add_argument(
            "--reset", action="store_true", help="Delete every stored chunk before ingesting."
        )

    def handle(self, *args, **options) -> None:
        """Called by Django with the parsed options; raises CommandError (exit status 1) on failure."""
        path = Path(options["path"]).expanduser()
        if not path.exists():
            raise CommandError(f"Path not found: {path}")
        files = iter_files(path)
        if not files:
            raise CommandError(f"No knowledge files ({', '.join(SUFFIXES)}) under {path}")
        backend = options["backend"] or settings.RAG_BACKEND
        if backend == "off":
            backend = "local"
        retriever = create_retriever(backend)
        if retriever is None:  # unreachable: "off" was mapped to "local" above
            raise CommandError("RAG is disabled")
        started = time.monotonic()
        try:
            chunks = asyncio.run(self._ingest(retriever, files, reset=options["reset"]))
        except CommandError:
            raise
        except Exception as exc:  # any failure becomes a clean non-zero exit
            raise CommandError(f"Ingestion into {backend} failed: {type(exc).__name__}: {exc}") from exc
        elapsed = time.monotonic() - started
        self.stdout.write(
            self.style.SUCCESS(
                f"Ingested {len(files)} file(s) as {chunks} chunk(s) into {retriever.name} in {elapsed:.2f}s"
            )
        )
        self._rebuild_speech_model(files, reset=options["reset"])

    def _rebuild_speech_model(self, files: list[Path], *, reset: bool) -> None:
        """The local engine's speech recogniser listens for the knowledge base's words: rebuild its model."""
        from voice.realtime.engine.stt import unavailable_reason

        reason = unavailable_reason("en")
        if reason is not None:
            self.stdout.write(f"Speech model not rebuilt: {reason}.")
            return
        from voice.realtime.engine.stt.knowledge import rebuild

        model_dir = Path(settings.LOCAL_ENGINE_STT_MODEL_DIR)
        try:
            summary = rebuild(model_dir, files, reset=reset)
        except (OSError, ValueError) as exc:
            raise CommandError(f"Speech model rebuild failed: {exc}") from exc
        self.stdout.write(
            f"Speech model rebuilt in {model_dir}: {summary['words']} words from {summary['files']} English "
            f"file(s); running engines use it from their next utterance."
        )

    async def _ingest(self, retriever: Retriever, files: list[Path], *, reset: bool) -> int:
        try:
            if reset:
                await retriever.reset()
                self.stderr.write(f"Reset the {retriever.name} index.")
            chunks = await ingest_files(retriever, files, progress=self._progress)
            health = await retriever.health()
            self.stdout.write(f"Index now holds {health.get('documents')} chunk(s).")
            return chunks
        finally:
            await retriever.close()

    def _progress(self, done: int, total: int, path: Path) -> None:
        filled = round(BAR_WIDTH * done / total)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        # One line per file: readable both in a terminal and in CI logs (no carriage-return redraws).
        self.stderr.write(f"[{bar}] {done}/{total} files  {path.name}")
