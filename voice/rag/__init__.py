"""Knowledge retrieval (RAG) for the voice gateway.

`get_retriever()` returns the configured backend, one instance per process *per running event loop*:
the Weaviate async client is bound to the loop it connected in, so a retriever is never shared across
loops (Channels workers, tests and management commands each run their own).
"""

from __future__ import annotations

import asyncio
import logging
import weakref

from django.conf import settings

from .base import Document, Passage, Retriever

__all__ = [
    "Document",
    "Passage",
    "Retriever",
    "close_retriever",
    "create_retriever",
    "get_retriever",
    "reset_retrievers",
]

logger = logging.getLogger("voice.rag")

# id(loop) -> (weak ref to the loop, retriever). Keyed by id with a weak ref rather than by the loop in
# a WeakKeyDictionary because the retriever (its client) may reference the loop, which would keep a
# WeakKeyDictionary entry alive forever; closed or collected loops are pruned on every lookup instead.
_retrievers: dict[int, tuple[weakref.ref, Retriever]] = {}

BACKENDS = ("local", "weaviate", "off")


def create_retriever(backend: str | None = None) -> Retriever | None:
    """Build a new (uncached) retriever for `backend` (default RAG_BACKEND); None when "off"."""
    backend = (backend or getattr(settings, "RAG_BACKEND", "local") or "local").strip().lower()
    if backend == "off":
        return None
    if backend == "local":
        from .local import LocalRetriever

        return LocalRetriever(settings.RAG_LOCAL_INDEX, delay_ms=getattr(settings, "RAG_LOCAL_DELAY_MS", 0))
    if backend == "weaviate":
        from .weaviate_store import WeaviateRetriever  # imported lazily: the client is heavy

        return WeaviateRetriever(
            settings.WEAVIATE_URL,
            settings.WEAVIATE_API_KEY,
            settings.WEAVIATE_COLLECTION,
            query_timeout_s=getattr(settings, "RAG_QUERY_TIMEOUT_S", 2.0),
        )
    raise ValueError(f"unknown RAG backend {backend!r} (expected one of {', '.join(BACKENDS)})")


def _prune() -> None:
    for key, (ref, _retriever) in list(_retrievers.items()):
        loop = ref()
        if loop is None or loop.is_closed():
            # The loop is gone: nothing can await close() any more; drop the reference.
            del _retrievers[key]


def get_retriever() -> Retriever | None:
    """Called from async code (consumers, views); returns this loop's retriever, None when "off".

    Must be called with a running event loop (raises RuntimeError otherwise).
    """
    loop = asyncio.get_running_loop()
    _prune()
    entry = _retrievers.get(id(loop))
    if entry is not None and entry[0]() is loop:
        return entry[1]
    retriever = create_retriever()
    if retriever is not None:
        _retrievers[id(loop)] = (weakref.ref(loop), retriever)
    return retriever


async def close_retriever() -> None:
    """Called at loop/worker shutdown; closes and forgets the running loop's retriever."""
    entry = _retrievers.pop(id(asyncio.get_running_loop()), None)
    if entry is not None:
        await entry[1].close()


def reset_retrievers() -> None:
    """Called by tests (and after settings changes); forgets every cached retriever.

    Retrievers are dropped without awaiting close(); call `close_retriever()` in the owning loop first
    when a clean shutdown matters.
    """
    _retrievers.clear()
