"""Knowledge prefetch while the user is still speaking ("Option B" turn logic).

Retrieval starts from the partial transcript as soon as it holds `min_words` words, so by the time the
user stops speaking the context is usually ready; at turn end the gateway waits a short, hard-bounded
time (`wait(timeout_ms)`) and answers without context rather than adding latency. Re-queries follow the
transcript when it changes substantially, at most once per `debounce_ms`, and cancel stale in-flight
queries. Nothing here ever raises a retrieval failure into the gateway: failures mean "no context".
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from difflib import SequenceMatcher

from voice.rag.base import Passage, Retriever
from voice.rag.text import words as folded_words

logger = logging.getLogger("voice.realtime.prefetch")

REQUERY_NEW_WORDS = 3  # this many new words since the last query's text justify a fresh query
REQUERY_MIN_CHANGE = 0.30  # or this fraction of the (folded) word sequence changed (ASR revisions)
FINAL_MIN_WORDS = 2  # a completed transcript shorter than min_words still gets a query if this long

CONTEXT_HEADER = "Relevant Intelia knowledge (cite if useful):"
_WORD = re.compile(r"\w", re.UNICODE)


@dataclass
class PrefetchResult:
    """What `ContextPrefetcher.wait` found at the user's turn end."""

    ran: bool = False  # a retrieval was started this turn
    passages: list[Passage] = field(default_factory=list)
    latency_ms: float | None = None  # duration of the retrieval whose passages are returned
    waited_ms: float = 0.0  # time spent inside wait()
    started_after_speech_ms: float | None = None  # speech start -> start of the retrieval used
    ready: bool = False  # a retrieval finished (without error) within the bound
    query: str = ""  # the transcript text of the retrieval used

    def as_log(self) -> dict:
        """Called when logging/measuring a turn; numbers rounded, passage text left out."""

        def rnd(value: float | None) -> float | None:
            return None if value is None else round(value, 1)

        return {
            "ran": self.ran,
            "ready": self.ready,
            "passages": len(self.passages),
            "latency_ms": rnd(self.latency_ms),
            "waited_ms": rnd(self.waited_ms),
            "started_after_speech_ms": rnd(self.started_after_speech_ms),
        }


class _Query:
    """One retrieval started during the turn."""

    __slots__ = ("failed", "finished", "passages", "started", "task", "text", "words")

    def __init__(self, text: str, started: float) -> None:
        self.text = text
        self.words = folded_words(text)
        self.started = started
        self.finished: float | None = None
        self.passages: list[Passage] = []
        self.failed = False
        self.task: asyncio.Task | None = None

    @property
    def usable(self) -> bool:
        return self.finished is not None and not self.failed


def count_words(text: str) -> int:
    """Return the number of spoken words in `text` (punctuation-only tokens don't count)."""
    return sum(1 for token in text.split() if _WORD.search(token))


def changed_substantially(old: Sequence[str], new: Sequence[str]) -> bool:
    """Return True when `new` (folded words) warrants a re-query compared to `old`."""
    if len(new) - len(old) >= REQUERY_NEW_WORDS:
        return True
    if not old or not new:
        return bool(old) != bool(new)
    return 1.0 - SequenceMatcher(None, list(old), list(new), autojunk=False).ratio() > REQUERY_MIN_CHANGE


class ContextPrefetcher:
    """Per-session retrieval scheduler driven by the gateway's speech and transcript events."""

    def __init__(
        self,
        retriever: Retriever | None,
        *,
        min_words: int,
        debounce_ms: float,
        top_k: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._retriever = retriever
        self._min_words = max(1, min_words)
        self._debounce_s = max(0.0, debounce_ms) / 1000
        self._top_k = top_k
        self._clock = clock
        self._speech_started: float | None = None
        self._text = ""
        self._queries: list[_Query] = []
        self._timer: asyncio.TimerHandle | None = None
        self._turn_closed = False  # set by wait(): late transcripts must not start useless queries
        # Cancelled tasks are kept referenced until they actually finish (no GC of pending tasks).
        self._cancelled: set[asyncio.Task] = set()

    @classmethod
    def from_settings(cls, retriever: Retriever | None) -> ContextPrefetcher:
        """Called by the gateway per session; reads the RAG_* settings."""
        from django.conf import settings

        return cls(
            retriever,
            min_words=settings.RAG_PREFETCH_MIN_WORDS,
            debounce_ms=settings.RAG_REQUERY_DEBOUNCE_MS,
            top_k=settings.RAG_TOP_K,
        )

    @property
    def enabled(self) -> bool:
        """True when a retriever is configured (RAG_BACKEND is not "off")."""
        return self._retriever is not None

    # --- events --------------------------------------------------------------------------------------

    def on_speech_started(self) -> None:
        """Called when the user starts speaking (VAD): starts a new turn, dropping the previous one."""
        self._cancel_timer()
        self._cancel_queries(keep=None)
        self._queries = []
        self._text = ""
        self._turn_closed = False
        self._speech_started = self._clock()

    def on_partial_transcript(self, text: str) -> None:
        """Called with the accumulated partial transcript whenever it grows (or is revised)."""
        if self._retriever is None or self._turn_closed:
            return
        self._text = text
        if count_words(text) < self._min_words:
            return
        last = self._latest()
        if last is None:
            self._start(text)
            return
        if self._timer is not None or not changed_substantially(last.words, folded_words(text)):
            return  # a scheduled re-query will pick up the latest text when it fires
        delay = last.started + self._debounce_s - self._clock()
        if delay <= 0:
            self._start(text)
            return
        try:
            self._timer = asyncio.get_running_loop().call_later(delay, self._fire_debounced)
        except RuntimeError:
            logger.debug("prefetch re-query skipped: no running event loop")

    def on_final_transcript(self, text: str) -> None:
        """Called when the completed transcript arrives; queries it if nothing (relevant) ran yet."""
        if self._retriever is None or self._turn_closed:
            return
        self._text = text
        self._cancel_timer()
        last = self._latest()
        if last is None:
            if count_words(text) >= min(FINAL_MIN_WORDS, self._min_words):
                self._start(text)
        elif changed_substantially(last.words, folded_words(text)):
            self._start(text)

    async def wait(self, timeout_ms: float) -> PrefetchResult:
        """Called at the user's turn end; returns within `timeout_ms` with whatever context is ready."""
        began = self._clock()
        self._turn_closed = True
        if self._timer is not None:
            # A debounced re-query is pending: start it now, keeping the in-flight one as a fallback.
            self._cancel_timer()
            last = self._latest()
            if last is None or changed_substantially(last.words, folded_words(self._text)):
                self._start(self._text, cancel_stale=False)
        if not self._queries and self._retriever is not None:
            # A short question ("Marek vaccine timing?") never reached min_words: try it within the bound.
            if count_words(self._text) >= min(FINAL_MIN_WORDS, self._min_words):
                self._start(self._text)
        if not self._queries:
            return PrefetchResult(waited_ms=self._elapsed_ms(began), query=self._text)
        newest = self._queries[-1]
        if newest.task is not None and not newest.task.done() and timeout_ms > 0:
            # asyncio.wait never cancels or awaits past the timeout: the bound is hard.
            await asyncio.wait({newest.task}, timeout=timeout_ms / 1000)
        chosen = next((q for q in reversed(self._queries) if q.usable), None)
        # Whatever is still running cannot be used any more for this turn.
        self._cancel_queries(keep=chosen)
        used = chosen or newest
        return PrefetchResult(
            ran=True,
            passages=list(chosen.passages) if chosen else [],
            latency_ms=(chosen.finished - chosen.started) * 1000 if chosen and chosen.finished else None,
            waited_ms=self._elapsed_ms(began),
            started_after_speech_ms=(
                (used.started - self._speech_started) * 1000 if self._speech_started is not None else None
            ),
            ready=chosen is not None,
            query=used.text,
        )

    def close(self) -> None:
        """Called when the session ends; cancels the timer and every in-flight retrieval (no await)."""
        self._cancel_timer()
        self._cancel_queries(keep=None)
        self._turn_closed = True

    # --- internals -----------------------------------------------------------------------------------

    def _latest(self) -> _Query | None:
        return self._queries[-1] if self._queries else None

    def _elapsed_ms(self, since: float) -> float:
        return (self._clock() - since) * 1000

    def _fire_debounced(self) -> None:
        self._timer = None
        last = self._latest()
        if self._turn_closed:
            return
        if last is not None and not changed_substantially(last.words, folded_words(self._text)):
            return
        self._start(self._text)

    def _start(self, text: str, *, cancel_stale: bool = True) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            logger.debug("prefetch skipped: no running event loop")
            return
        if cancel_stale:
            self._cancel_queries(keep=None)
        query = _Query(text, self._clock())
        query.task = loop.create_task(self._run(query), name="voice-rag-prefetch")
        self._queries.append(query)

    async def _run(self, query: _Query) -> None:
        assert self._retriever is not None
        try:
            passages = await self._retriever.search(query.text, limit=self._top_k)
            query.passages = list(passages or [])
        except Exception:  # a failed retrieval means "no context", never a failed turn
            query.failed = True
            logger.warning("prefetch retrieval failed (%s)", self._retriever.name, exc_info=True)
        query.finished = self._clock()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _cancel_queries(self, *, keep: _Query | None) -> None:
        # Completed queries stay in the turn's list: they remain valid fallbacks for wait().
        for query in self._queries:
            task = query.task
            if query is keep or task is None or task.done():
                continue
            task.cancel()
            self._cancelled.add(task)
            task.add_done_callback(self._cancelled.discard)


def format_context(passages: Sequence[Passage], *, max_passages: int = 3, max_chars: int = 600) -> str:
    """Called before injecting context; returns the system-item text ("" when there is nothing)."""
    lines = [CONTEXT_HEADER]
    for index, passage in enumerate(passages[:max_passages], start=1):
        text = " ".join(passage.text.split())  # tables and line breaks cost tokens, not meaning
        if len(text) > max_chars:
            cut = text.rfind(" ", 0, max_chars)
            text = text[: cut if cut > max_chars // 2 else max_chars].rstrip(" ,;:") + "…"
        source = f" (source: {passage.source})" if passage.source else ""
        lines.append(f"[{index}] {passage.title}: {text}{source}")
    return "\n".join(lines) if len(lines) > 1 else ""
