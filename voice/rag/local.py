"""The `local` backend: an SQLite FTS5 (BM25) index in its own file, independent of Django's database."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from .base import Document, Passage, Retriever
from .ingest import BUNDLED_KNOWLEDGE_DIR, iter_files, load_file
from .text import fts_query

logger = logging.getLogger("voice.rag")

# remove_diacritics 2 folds accents at index and query time, so "temperature" matches "température".
_SCHEMA = """
CREATE VIRTUAL TABLE IF NOT EXISTS chunks USING fts5(
    title, text, source UNINDEXED, path UNINDEXED, chunk_id UNINDEXED, chunk UNINDEXED,
    tokenize = 'unicode61 remove_diacritics 2'
);
"""
TITLE_WEIGHT = 3.0  # a question naming the topic of a document should beat a passing mention
MAX_CHUNKS_PER_FILE = 2  # keep the top-k diverse instead of three overlapping chunks of one file

# Serialises schema creation, seeding and writes across every instance in the process (there is one
# retriever per event loop); reads need no lock thanks to WAL. Other processes queue on sqlite's lock.
_WRITE_LOCK = threading.Lock()


class LocalRetriever(Retriever):
    """BM25 keyword search over an FTS5 index; queries run in a worker thread, one connection each."""

    name = "local"

    def __init__(
        self,
        index_path: str | Path,
        *,
        delay_ms: float = 0,
        bundled_dir: Path | None = BUNDLED_KNOWLEDGE_DIR,
    ) -> None:
        self.index_path = Path(index_path)
        self.delay_ms = delay_ms
        self.bundled_dir = bundled_dir
        self._schema_ready = False
        self._seeded = False

    # --- sqlite (worker thread only) -------------------------------------------------------------

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """Yield a fresh autocommit connection (cheap for a local file; never shared across threads)."""
        conn = sqlite3.connect(self.index_path, timeout=10, isolation_level=None)
        try:
            yield conn
        finally:
            conn.close()

    def _ensure_schema(self) -> None:
        if self._schema_ready:
            return
        with _WRITE_LOCK:
            if self._schema_ready:
                return
            self.index_path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as conn:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
            self._schema_ready = True

    def _ensure_seeded(self) -> None:
        """On first read, fill an empty index with the bundled knowledge so the demo works as is."""
        self._ensure_schema()
        if self._seeded:
            return
        with _WRITE_LOCK:
            if self._seeded:
                return
            if self.bundled_dir is not None and self.bundled_dir.is_dir():
                docs = [doc for path in iter_files(self.bundled_dir) for doc in load_file(path)]
                if self._write(docs, only_if_empty=True):  # one transaction: a few ms
                    logger.info("rag.local seeded %s with %d bundled chunks", self.index_path, len(docs))
            self._seeded = True

    def _write(self, docs: list[Document], *, only_if_empty: bool = False) -> int:
        """Replace the chunks of every path in `docs` in one transaction; returns chunks written."""
        with self._connect() as conn:
            # IMMEDIATE takes the write lock up front, so concurrent writers (other loops or worker
            # processes seeding the same file) queue on the busy timeout instead of failing.
            conn.execute("BEGIN IMMEDIATE")
            try:
                if only_if_empty and conn.execute("SELECT count(*) FROM chunks").fetchone()[0]:
                    conn.execute("ROLLBACK")
                    return 0
                paths = sorted({doc.path for doc in docs})
                conn.executemany("DELETE FROM chunks WHERE path = ?", [(p,) for p in paths])
                conn.executemany(
                    "INSERT INTO chunks (title, text, source, path, chunk_id, chunk) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [(d.title, d.text, d.source, d.path, d.id, d.chunk) for d in docs],
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return len(docs)

    def _search_sync(self, match: str, limit: int) -> list[Passage]:
        self._ensure_seeded()
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT title, text, source, path, bm25(chunks, ?, 1.0) AS rank FROM chunks "
                "WHERE chunks MATCH ? ORDER BY rank LIMIT ?",
                (TITLE_WEIGHT, match, limit * 4),
            ).fetchall()
        passages: list[Passage] = []
        per_file: dict[str, int] = {}
        for title, text, source, path, rank in rows:
            if per_file.get(path, 0) >= MAX_CHUNKS_PER_FILE:
                continue
            per_file[path] = per_file.get(path, 0) + 1
            # bm25() is "lower is better" and negative; expose "higher is better".
            passages.append(Passage(title=title, text=text, source=source, score=-rank))
            if len(passages) >= limit:
                break
        return passages

    def _health_sync(self) -> dict:
        self._ensure_seeded()
        with self._connect() as conn:
            documents = conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
            files = conn.execute("SELECT count(DISTINCT path) FROM chunks").fetchone()[0]
        return {"backend": self.name, "reachable": True, "documents": documents, "files": files}

    def _upsert_sync(self, docs: list[Document]) -> int:
        self._ensure_schema()
        with _WRITE_LOCK:
            return self._write(docs)

    def _reset_sync(self) -> None:
        self._ensure_schema()
        with _WRITE_LOCK, self._connect() as conn:
            conn.execute("DELETE FROM chunks")

    # --- async API ---------------------------------------------------------------------------------

    async def search(self, query: str, *, limit: int = 3) -> list[Passage]:
        """Called per (partial) user utterance; returns best passages first, [] on any failure."""
        match = fts_query(query)
        passages: list[Passage] = []
        if match and limit > 0:
            try:
                passages = await asyncio.to_thread(self._search_sync, match, limit)
            except Exception:  # a broken index must cost the answer its context, not crash it
                logger.warning("rag.local search failed (index %s)", self.index_path, exc_info=True)
        if self.delay_ms > 0:
            # Mimics a remote store's round trip (RAG_LOCAL_DELAY_MS) for latency experiments.
            await asyncio.sleep(self.delay_ms / 1000)
        return passages

    async def health(self) -> dict:
        """Called by health checks; reports the chunk count, never raises."""
        try:
            return await asyncio.to_thread(self._health_sync)
        except Exception as exc:  # noqa: BLE001 - health must report, not raise
            return {"backend": self.name, "reachable": False, "documents": None, "error": type(exc).__name__}

    async def upsert(self, docs: list[Document]) -> int:
        """Called by ingestion; replaces all chunks of each path in `docs`, returns chunks written."""
        if not docs:
            return 0
        return await asyncio.to_thread(self._upsert_sync, docs)

    async def reset(self) -> None:
        """Called by `voice_ingest --reset`; deletes every stored chunk."""
        await asyncio.to_thread(self._reset_sync)

    async def close(self) -> None:
        """Called at loop shutdown; nothing to release (connections are per call)."""
