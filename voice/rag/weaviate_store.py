"""The `weaviate` backend: hybrid search through the weaviate-client v4 async client.

The async client is bound to the event loop it connects in, so one instance lives per loop (see
`voice.rag.get_retriever`). Every failure degrades to "no context": searches return [] and the outage is
logged once, not once per query; reconnection is retried at most every RETRY_AFTER_S seconds so an
outage never adds a connect attempt to every user turn.
"""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import urlsplit

import weaviate
from weaviate.classes.config import Configure, DataType, Property, Tokenization
from weaviate.classes.data import DataObject
from weaviate.classes.init import AdditionalConfig, Auth, Timeout
from weaviate.classes.query import Filter, MetadataQuery
from weaviate.exceptions import WeaviateQueryError
from weaviate.util import generate_uuid5

from voice.logging import redact

from .base import Document, Passage, Retriever

logger = logging.getLogger("voice.rag")

RETRY_AFTER_S = 5.0
CLOUD_SUFFIXES = (".weaviate.cloud", ".weaviate.network", ".weaviate.io")
DEFAULT_GRPC_PORT = 50051


class WeaviateRetriever(Retriever):
    """Hybrid (BM25 + vector) search on one Weaviate collection; never raises from `search`."""

    name = "weaviate"

    def __init__(
        self,
        url: str,
        api_key: str,
        collection: str,
        *,
        query_timeout_s: float = 2.0,
        connect_timeout_s: float = 2.0,
    ) -> None:
        self.url = url.strip()
        self._api_key = api_key
        self.collection = collection
        self.query_timeout_s = query_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._client: weaviate.WeaviateAsyncClient | None = None
        self._connect_lock = asyncio.Lock()
        self._available = True  # flips on the first failure so the outage is logged once
        self._retry_at = 0.0
        self._keyword_only = False  # set when the collection has no vectorizer (hybrid unavailable)

    # --- connection --------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The host part of WEAVIATE_URL, safe to log and to show in health output."""
        parts = urlsplit(self.url if "://" in self.url else f"https://{self.url}")
        return parts.hostname or ""

    def _build_client(self) -> weaviate.WeaviateAsyncClient:
        parts = urlsplit(self.url if "://" in self.url else f"https://{self.url}")
        secure = parts.scheme == "https"
        host = parts.hostname or ""
        config = AdditionalConfig(
            timeout=Timeout(init=self.connect_timeout_s, query=self.query_timeout_s, insert=60)
        )
        auth = Auth.api_key(self._api_key) if self._api_key else None
        if auth is not None and host.endswith(CLOUD_SUFFIXES):
            return weaviate.use_async_with_weaviate_cloud(
                cluster_url=self.url, auth_credentials=auth, additional_config=config, skip_init_checks=True
            )
        http_port = parts.port or (443 if secure else 8080)
        # Self-hosted: gRPC on the conventional port, which must differ from the HTTP one.
        grpc_port = DEFAULT_GRPC_PORT if http_port != DEFAULT_GRPC_PORT else DEFAULT_GRPC_PORT + 1
        return weaviate.use_async_with_custom(
            http_host=host,
            http_port=http_port,
            http_secure=secure,
            grpc_host=host,
            grpc_port=grpc_port,
            grpc_secure=secure,
            auth_credentials=auth,
            additional_config=config,
            skip_init_checks=True,
        )

    def _describe(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"[:300]
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return redact(text)

    def _mark_down(self, reason: str) -> None:
        self._retry_at = time.monotonic() + RETRY_AFTER_S
        if self._available:
            self._available = False
            logger.warning(
                "rag.weaviate unavailable (host=%s, collection=%s): %s; answering without knowledge "
                "context until it recovers",
                self.host or "-",
                self.collection,
                reason,
            )

    def _mark_up(self) -> None:
        if not self._available:
            logger.info("rag.weaviate recovered (host=%s)", self.host)
        self._available = True

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await asyncio.wait_for(client.close(), 1.0)
            except Exception:  # closing a broken client is best effort
                logger.debug("rag.weaviate close failed", exc_info=True)

    async def _get_client(self, *, ignore_backoff: bool = False) -> weaviate.WeaviateAsyncClient | None:
        if self._client is not None:
            return self._client
        if not self.url:
            self._mark_down("WEAVIATE_URL is not configured")
            return None
        if not ignore_backoff and time.monotonic() < self._retry_at:
            return None
        async with self._connect_lock:
            if self._client is not None:
                return self._client
            client = self._build_client()
            try:
                await asyncio.wait_for(client.connect(), self.connect_timeout_s)
            except Exception as exc:  # noqa: BLE001 - any connect failure means "no context"
                self._mark_down(self._describe(exc))
                try:
                    await asyncio.wait_for(client.close(), 1.0)
                except Exception:  # best effort
                    logger.debug("rag.weaviate close after failed connect failed", exc_info=True)
                return None
            self._client = client
            return client

    # --- Retriever API -------------------------------------------------------------------------------

    async def search(self, query: str, *, limit: int = 3) -> list[Passage]:
        """Called per (partial) user utterance; returns best passages first, [] on any failure."""
        if not query.strip() or limit <= 0:
            return []
        client = await self._get_client()
        if client is None:
            return []
        coll = client.collections.use(self.collection)
        try:
            if self._keyword_only:
                coro = coll.query.bm25(query=query, limit=limit, return_metadata=MetadataQuery(score=True))
            else:
                coro = coll.query.hybrid(query=query, limit=limit, return_metadata=MetadataQuery(score=True))
            result = await asyncio.wait_for(coro, self.query_timeout_s)
        except WeaviateQueryError as exc:
            if not self._keyword_only and "vector" in str(exc).lower():
                # A collection without a vectorizer cannot run hybrid; fall back to BM25 from now on.
                self._keyword_only = True
                return await self.search(query, limit=limit)
            self._mark_down(self._describe(exc))
            return []
        except Exception as exc:  # noqa: BLE001 - timeouts, gRPC and HTTP errors all mean "no context"
            self._mark_down(self._describe(exc))
            await self._drop_client()
            return []
        self._mark_up()
        passages = []
        for obj in result.objects:
            props = obj.properties or {}
            score = obj.metadata.score if obj.metadata and obj.metadata.score is not None else 0.0
            passages.append(
                Passage(
                    title=str(props.get("title") or ""),
                    text=str(props.get("text") or ""),
                    source=str(props.get("source") or ""),
                    score=float(score),
                )
            )
        return passages

    async def health(self) -> dict:
        """Called by health checks; tries a bounded connection even during back-off, never raises."""
        report: dict = {
            "backend": self.name,
            "reachable": False,
            "documents": None,
            "configured": bool(self.url),
            "host": self.host,
            "collection": self.collection,
        }
        client = await self._get_client(ignore_backoff=True)
        if client is None:
            return report
        try:
            report["reachable"] = bool(await asyncio.wait_for(client.is_ready(), self.query_timeout_s))
            coll = client.collections.use(self.collection)
            agg = await asyncio.wait_for(coll.aggregate.over_all(total_count=True), self.query_timeout_s)
            report["documents"] = agg.total_count
        except Exception as exc:  # noqa: BLE001 - health must report, not raise
            report["error"] = self._describe(exc)
        return report

    async def _collection_for_write(self):  # -> CollectionAsync
        client = await self._get_client(ignore_backoff=True)
        if client is None:
            raise RuntimeError(f"Weaviate is not reachable (host={self.host or 'unset'})")
        if not await client.collections.exists(self.collection):
            # Weaviate Cloud ships the text2vec-weaviate embedder; self-hosted gets a keyword-only
            # collection (search falls back to BM25) unless ops created it with their own vectorizer.
            cloud = self.host.endswith(CLOUD_SUFFIXES)
            await client.collections.create(
                self.collection,
                vector_config=Configure.Vectors.text2vec_weaviate()
                if cloud
                else Configure.Vectors.self_provided(),
                properties=[
                    Property(name="title", data_type=DataType.TEXT),
                    Property(name="text", data_type=DataType.TEXT),
                    Property(name="source", data_type=DataType.TEXT, skip_vectorization=True),
                    Property(
                        name="path",
                        data_type=DataType.TEXT,
                        tokenization=Tokenization.FIELD,
                        skip_vectorization=True,
                    ),
                    Property(name="chunk", data_type=DataType.INT, skip_vectorization=True),
                ],
            )
        return client.collections.use(self.collection)

    async def upsert(self, docs: list[Document]) -> int:
        """Called by ingestion; replaces all chunks of each path in `docs`; raises when unreachable."""
        if not docs:
            return 0
        coll = await self._collection_for_write()
        paths = sorted({d.path for d in docs})
        await coll.data.delete_many(where=Filter.by_property("path").contains_any(paths))
        objects = [
            DataObject(
                uuid=generate_uuid5(d.id),  # deterministic: re-ingesting overwrites instead of duplicating
                properties={
                    "title": d.title,
                    "text": d.text,
                    "source": d.source,
                    "path": d.path,
                    "chunk": d.chunk,
                },
            )
            for d in docs
        ]
        result = await coll.data.insert_many(objects)
        if result.has_errors:
            first = next(iter(result.errors.values()))
            raise RuntimeError(f"Weaviate rejected {len(result.errors)} chunk(s): {first.message}")
        return len(objects)

    async def reset(self) -> None:
        """Called by `voice_ingest --reset`; drops the collection (recreated on the next upsert)."""
        client = await self._get_client(ignore_backoff=True)
        if client is None:
            raise RuntimeError(f"Weaviate is not reachable (host={self.host or 'unset'})")
        await client.collections.delete(self.collection)

    async def close(self) -> None:
        """Called when the owning loop shuts down; closes the client (bounded), idempotent."""
        await self._drop_client()
