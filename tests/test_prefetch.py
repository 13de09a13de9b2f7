"""ContextPrefetcher turn logic (narrow unit tests with a fake retriever)."""

from __future__ import annotations

import asyncio
import gc
import logging
import time

import pytest

from voice.rag.base import Document, Passage, Retriever
from voice.realtime.prefetch import (
    ContextPrefetcher,
    PrefetchResult,
    changed_substantially,
    count_words,
    format_context,
)

QUESTION = "Quelle est la température idéale pour des poussins d'un jour pendant la première semaine"


class FakeRetriever(Retriever):
    """Records calls; sleeps `delay` (or delays[i] for call i); optionally raises."""

    name = "fake"

    def __init__(self, delay: float = 0.0, *, delays: list[float] | None = None, fail: bool = False):
        self.delay = delay
        self.delays = delays
        self.fail = fail
        self.calls: list[tuple[str, float]] = []
        self.cancelled: list[str] = []
        self.completed: list[str] = []

    async def search(self, query: str, *, limit: int = 3) -> list[Passage]:
        index = len(self.calls)
        self.calls.append((query, time.monotonic()))
        delay = self.delays[index] if self.delays and index < len(self.delays) else self.delay
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            self.cancelled.append(query)
            raise
        if self.fail:
            raise RuntimeError("backend exploded")
        self.completed.append(query)
        return [Passage(title=f"T{index}", text=f"answer for {query}", source="fake", score=1.0)][:limit]

    async def health(self) -> dict:
        return {"backend": self.name, "reachable": True, "documents": 0}

    async def upsert(self, docs: list[Document]) -> int:
        return 0

    async def reset(self) -> None:
        return None

    async def close(self) -> None:
        return None


def make(retriever: Retriever | None, *, debounce_ms: float = 100, min_words: int = 5) -> ContextPrefetcher:
    return ContextPrefetcher(retriever, min_words=min_words, debounce_ms=debounce_ms, top_k=3)


def prefix(n: int) -> str:
    return " ".join(QUESTION.split()[:n])


async def settle() -> None:
    """Let freshly created tasks run up to their first await."""
    for _ in range(3):
        await asyncio.sleep(0)


def test_helpers():
    assert count_words("Quelle est la température ?") == 4
    assert count_words("d'un jour , !") == 2
    assert changed_substantially(["a", "b"], ["a", "b", "c", "d", "e"])  # 3 new words
    assert not changed_substantially(["a", "b", "c", "d", "e"], ["a", "b", "c", "d", "e", "f"])
    assert changed_substantially(["a", "b", "c", "d", "e"], ["a", "x", "y", "d", "e"])  # ASR revision


async def test_prefetch_starts_at_the_fifth_word_before_speech_ends():
    fake = FakeRetriever(delay=0.01)
    prefetcher = make(fake)
    prefetcher.on_speech_started()
    for n in range(1, 5):
        prefetcher.on_partial_transcript(prefix(n))
        await settle()
    assert fake.calls == []  # 4 words: too early
    prefetcher.on_partial_transcript(prefix(5))
    await settle()
    assert [q for q, _ in fake.calls] == [prefix(5)]
    started_at = fake.calls[0][1]
    await asyncio.sleep(0.05)  # the user keeps speaking
    speech_end = time.monotonic()
    assert started_at < speech_end
    result = await prefetcher.wait(200)
    assert result.ran and result.ready
    assert result.query == prefix(5)
    prefetcher.close()


async def test_debounced_requery_cancels_the_stale_query():
    fake = FakeRetriever(delay=0.5)
    prefetcher = make(fake, debounce_ms=100)
    prefetcher.on_speech_started()
    prefetcher.on_partial_transcript(prefix(5))
    await settle()
    for n in (6, 7, 8, 9):
        prefetcher.on_partial_transcript(prefix(n))
        await settle()
    assert len(fake.calls) == 1  # changes within the debounce window are coalesced
    await asyncio.sleep(0.15)
    await settle()
    assert [q for q, _ in fake.calls] == [prefix(5), prefix(9)]  # re-query uses the latest text
    assert fake.cancelled == [prefix(5)]  # the stale in-flight query was cancelled
    # One more word is not a substantial change: no new query, even after the debounce window.
    prefetcher.on_partial_transcript(prefix(10))
    await asyncio.sleep(0.15)
    assert len(fake.calls) == 2
    prefetcher.close()
    await settle()
    assert fake.cancelled == [prefix(5), prefix(9)]


async def test_requery_after_debounce_window_is_immediate():
    fake = FakeRetriever(delay=0.0)
    prefetcher = make(fake, debounce_ms=50)
    prefetcher.on_speech_started()
    prefetcher.on_partial_transcript(prefix(5))
    await asyncio.sleep(0.08)
    prefetcher.on_partial_transcript(prefix(8))
    await settle()
    assert [q for q, _ in fake.calls] == [prefix(5), prefix(8)]
    result = await prefetcher.wait(200)
    assert result.ready and result.query == prefix(8)
    assert result.passages[0].title == "T1"


async def test_wait_never_exceeds_the_bound_when_retrieval_is_slow():
    fake = FakeRetriever(delay=1.0)
    prefetcher = make(fake)
    prefetcher.on_speech_started()
    prefetcher.on_partial_transcript(prefix(6))
    started = time.monotonic()
    result = await prefetcher.wait(200)
    elapsed = time.monotonic() - started
    assert 0.19 <= elapsed < 0.28
    assert result.ran is True
    assert result.ready is False
    assert result.passages == []
    assert result.latency_ms is None
    assert 190 <= result.waited_ms < 280
    assert result.query == prefix(6)
    await settle()
    assert fake.cancelled == [prefix(6)]  # the useless slow query doesn't keep running


async def test_result_fields_when_retrieval_is_fast():
    fake = FakeRetriever(delay=0.02)
    prefetcher = make(fake)
    prefetcher.on_speech_started()
    await asyncio.sleep(0.05)
    prefetcher.on_partial_transcript(prefix(5))
    await asyncio.sleep(0.06)  # retrieval completes while the user is still talking
    result = await prefetcher.wait(200)
    assert isinstance(result, PrefetchResult)
    assert result.ran and result.ready
    assert [p.title for p in result.passages] == ["T0"]
    assert result.query == prefix(5)
    assert 15 <= result.latency_ms < 100
    assert result.waited_ms < 10
    assert 45 <= result.started_after_speech_ms < 150
    assert result.as_log()["passages"] == 1


async def test_wait_returns_as_soon_as_the_in_flight_query_completes():
    fake = FakeRetriever(delay=0.05)
    prefetcher = make(fake)
    prefetcher.on_speech_started()
    prefetcher.on_partial_transcript(prefix(5))
    result = await prefetcher.wait(500)
    assert result.ready
    assert 40 <= result.waited_ms < 200


async def test_wait_falls_back_to_an_older_completed_result():
    fake = FakeRetriever(delays=[0.0, 1.0])
    prefetcher = make(fake, debounce_ms=0)
    prefetcher.on_speech_started()
    prefetcher.on_partial_transcript(prefix(5))
    await asyncio.sleep(0.02)
    prefetcher.on_partial_transcript(prefix(9))  # slow re-query
    await settle()
    started = time.monotonic()
    result = await prefetcher.wait(100)
    assert time.monotonic() - started < 0.16
    assert result.ready is True
    assert result.query == prefix(5)
    assert [p.title for p in result.passages] == ["T0"]


async def test_wait_flushes_a_pending_requery_without_dropping_the_in_flight_one():
    fake = FakeRetriever(delays=[0.03, 0.5])
    prefetcher = make(fake, debounce_ms=1000)
    prefetcher.on_speech_started()
    prefetcher.on_partial_transcript(prefix(5))
    await settle()
    prefetcher.on_partial_transcript(prefix(10))  # re-query scheduled 1 s later
    result = await prefetcher.wait(100)
    assert [q for q, _ in fake.calls] == [prefix(5), prefix(10)]  # flushed at turn end
    assert result.ready and result.query == prefix(5)  # first query finished, the flushed one didn't


async def test_retriever_exceptions_mean_no_context(caplog):
    fake = FakeRetriever(delay=0.0, fail=True)
    prefetcher = make(fake)
    prefetcher.on_speech_started()
    with caplog.at_level(logging.WARNING, logger="voice.realtime.prefetch"):
        prefetcher.on_partial_transcript(prefix(5))
        result = await prefetcher.wait(200)
    assert result.ran is True
    assert result.ready is False
    assert result.passages == []
    assert format_context(result.passages) == ""
    assert "retrieval failed" in caplog.text


async def test_final_transcript_triggers_a_query_when_none_ran():
    fake = FakeRetriever(delay=0.0)
    prefetcher = make(fake)
    prefetcher.on_speech_started()
    prefetcher.on_partial_transcript("Gumboro vaccine")
    prefetcher.on_final_transcript("Gumboro vaccine timing")
    result = await prefetcher.wait(200)
    assert result.ready and result.query == "Gumboro vaccine timing"
    # After the turn ended, late transcripts don't start useless queries.
    prefetcher.on_final_transcript("Gumboro vaccine timing for broilers in winter please")
    await settle()
    assert len(fake.calls) == 1


async def test_short_question_is_queried_at_turn_end():
    fake = FakeRetriever(delay=0.01)
    prefetcher = make(fake)
    prefetcher.on_speech_started()
    prefetcher.on_partial_transcript("Marek vaccine timing")
    await settle()
    assert fake.calls == []  # below min_words while speaking
    result = await prefetcher.wait(200)
    assert result.ran and result.ready and result.query == "Marek vaccine timing"


async def test_no_retriever_or_no_words_means_no_run():
    prefetcher = make(None)
    prefetcher.on_speech_started()
    prefetcher.on_partial_transcript(QUESTION)
    result = await prefetcher.wait(200)
    assert result == PrefetchResult(ran=False, waited_ms=result.waited_ms, query="")
    assert not prefetcher.enabled

    fake = FakeRetriever()
    prefetcher = make(fake)
    prefetcher.on_speech_started()
    prefetcher.on_partial_transcript("Bonjour")
    result = await prefetcher.wait(200)
    assert result.ran is False and result.waited_ms < 5
    assert fake.calls == []


async def test_new_turn_cancels_the_previous_turn_without_leaking_tasks(caplog):
    fake = FakeRetriever(delay=5.0)
    prefetcher = make(fake, debounce_ms=10)
    prefetcher.on_speech_started()
    prefetcher.on_partial_transcript(prefix(5))
    await settle()
    prefetcher.on_partial_transcript(prefix(9))  # debounced re-query pending
    prefetcher.on_speech_started()  # barge-in: new turn
    await asyncio.sleep(0.05)
    assert fake.cancelled == [prefix(5)]
    assert len(fake.calls) == 1  # the pending re-query timer died with its turn
    prefetcher.on_partial_transcript(prefix(6))
    await settle()
    prefetcher.close()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        await settle()
        gc.collect()
    assert fake.cancelled == [prefix(5), prefix(6)]
    assert not prefetcher._cancelled  # every cancelled task actually finished
    assert "Task was destroyed" not in caplog.text


def test_format_context_is_compact():
    passages = [
        Passage(title=f"Doc {i}", text="word " * 400 + "\n| a | b |", source=f"src {i}", score=1.0)
        for i in range(5)
    ]
    text = format_context(passages)
    lines = text.splitlines()
    assert lines[0] == "Relevant Intelia knowledge (cite if useful):"
    assert len(lines) == 4  # header + top 3 passages
    assert lines[1].startswith("[1] Doc 0: word word")
    assert "…" in lines[1] and "(source: src 0)" in lines[1]
    assert len(text) < 2200
    assert format_context([]) == ""


@pytest.mark.parametrize("timeout_ms", [0, 50])
async def test_tiny_bounds_are_respected(timeout_ms):
    fake = FakeRetriever(delay=0.3)
    prefetcher = make(fake)
    prefetcher.on_speech_started()
    prefetcher.on_partial_transcript(prefix(7))
    started = time.monotonic()
    result = await prefetcher.wait(timeout_ms)
    assert time.monotonic() - started < timeout_ms / 1000 + 0.06
    assert result.ran and not result.ready
