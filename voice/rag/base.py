"""The retriever interface shared by every knowledge backend (local SQLite FTS5, Weaviate)."""

from __future__ import annotations

import abc
from dataclasses import dataclass


@dataclass(frozen=True)
class Passage:
    """One search hit: a chunk of a knowledge document with its backend-specific relevance score."""

    title: str
    text: str
    source: str
    score: float


@dataclass(frozen=True)
class Document:
    """One chunk to ingest. `path` identifies the file it came from: upserting chunks of a path
    replaces every chunk previously stored for that path (so an edited file never leaves orphans)."""

    id: str  # stable: hash of path + chunk index
    path: str
    chunk: int
    title: str
    text: str
    source: str  # human citation ("source:" line), shown to the model


class Retriever(abc.ABC):
    """A knowledge store the voice gateway queries while the user is still speaking."""

    name: str = "abstract"

    @abc.abstractmethod
    async def search(self, query: str, *, limit: int = 3) -> list[Passage]:
        """Called per (partial) user utterance; returns best passages first, [] on any failure."""

    @abc.abstractmethod
    async def health(self) -> dict:
        """Called by health checks; returns {"backend", "reachable", "documents", ...}, never raises."""

    @abc.abstractmethod
    async def upsert(self, docs: list[Document]) -> int:
        """Called by ingestion; replaces all chunks of each path in `docs`, returns chunks written."""

    @abc.abstractmethod
    async def reset(self) -> None:
        """Called by `voice_ingest --reset`; deletes every stored chunk."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Called when the owning event loop shuts down or the retriever is discarded; idempotent."""
