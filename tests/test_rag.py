"""Knowledge retrieval: local FTS5 index, ingestion, the voice_ingest command, Weaviate degradation."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from voice.rag import create_retriever, get_retriever, reset_retrievers
from voice.rag.base import Passage
from voice.rag.ingest import BUNDLED_KNOWLEDGE_DIR, chunk_text, iter_files, load_file, parse_file
from voice.rag.local import LocalRetriever
from voice.rag.text import fts_query, query_terms
from voice.rag.weaviate_store import WeaviateRetriever


@pytest.fixture
def index_path(tmp_path, settings):
    path = tmp_path / "idx" / "knowledge.sqlite3"
    settings.RAG_BACKEND = "local"
    settings.RAG_LOCAL_INDEX = str(path)
    settings.RAG_LOCAL_DELAY_MS = 0
    reset_retrievers()
    yield path
    reset_retrievers()


@pytest.fixture
def local(index_path):
    return LocalRetriever(index_path)


def chunk_count(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT count(*) FROM chunks").fetchone()[0]


# --- query normalisation ---------------------------------------------------------------------------


def test_query_terms_strip_stopwords_accents_and_elisions():
    terms = query_terms("Quelle est la température idéale pour des poussins d'un jour ?")
    assert terms == ["temperature", "ideale", "poussin", "jour"]
    assert query_terms("What is the ideal brooding temperature?") == ["ideal", "brooding", "temperature"]
    assert fts_query("poussins d'un jour") == '"poussin"* OR "jour"*'
    assert fts_query("? ! d' l'") == ""  # nothing searchable: no FTS syntax error


# --- local backend -----------------------------------------------------------------------------------

QUESTIONS = [
    (
        "Quelle est la température idéale pour des poussins d'un jour pendant la première semaine ?",
        "fr-temperature-demarrage.md",
    ),
    ("quelle est la temperature ideale pour des poussins d un jour", "fr-temperature-demarrage.md"),
    (
        "What is the ideal brooding temperature for day old chicks during the first week?",
        "en-brooding-temperature.md",
    ),
    ("How much water should a broiler drink per day at four weeks of age?", "en-water-intake-broilers.md"),
    ("Combien d'eau boit un poulet de chair à quatre semaines ?", "fr-consommation-eau.md"),
    ("What ammonia level is too high in a broiler house?", "en-minimum-ventilation.md"),
    ("Quand faut-il photostimuler les poulettes ?", "fr-photostimulation-pondeuses.md"),
    ("When should I vaccinate against Gumboro disease?", "en-vaccination-basics.md"),
]


@pytest.mark.parametrize(("question", "expected_file"), QUESTIONS)
async def test_local_finds_the_right_document(local, question, expected_file):
    passages = await local.search(question, limit=3)
    assert passages, question
    expected = parse_file(
        (BUNDLED_KNOWLEDGE_DIR / expected_file).read_text(encoding="utf-8"), fallback_title=""
    )
    assert passages[0].title == expected.title
    assert passages[0].source == expected.source
    assert passages[0].score > 0
    assert [p.score for p in passages] == sorted((p.score for p in passages), reverse=True)


async def test_temperature_answer_is_in_the_passage(local):
    accented = await local.search("température idéale poussins d'un jour première semaine")
    plain = await local.search("temperature ideale poussins d un jour premiere semaine")
    assert [p.title for p in accented] == [p.title for p in plain]
    assert "32–33 °C" in accented[0].text


async def test_local_auto_seeds_bundled_knowledge(index_path, local):
    assert not index_path.exists()
    health = await local.health()
    assert health["backend"] == "local"
    assert health["reachable"] is True
    assert health["files"] == len(iter_files(BUNDLED_KNOWLEDGE_DIR))
    assert health["files"] >= 25
    assert health["documents"] >= health["files"]


async def test_concurrent_first_use_seeds_once(index_path):
    first, second = LocalRetriever(index_path), LocalRetriever(index_path)
    await asyncio.gather(first.search("water"), second.search("water"), first.health(), second.health())
    expected = sum(len(load_file(p)) for p in iter_files(BUNDLED_KNOWLEDGE_DIR))
    assert chunk_count(index_path) == expected


async def test_local_search_tolerates_junk(local):
    assert await local.search("") == []
    assert await local.search("?? ... !!") == []
    # FTS5 operators and syntax characters are searched as plain words, never a syntax error.
    assert isinstance(await local.search('AND OR NOT NEAR "quote" * ( ) ^ : -'), list)
    assert await local.search('AND OR NOT "xqzv" * ( ) ^ : -') == []
    assert await local.search("xyzzyplugh frobnicate") == []


async def test_local_delay_is_honoured(index_path):
    fast = LocalRetriever(index_path)
    await fast.search("water")  # seeds the index so the timing below measures the delay only
    slow = LocalRetriever(index_path, delay_ms=300)
    started = time.monotonic()
    passages = await slow.search("broiler water intake")
    elapsed = time.monotonic() - started
    assert passages
    assert 0.29 <= elapsed < 1.0


async def test_local_search_does_not_block_the_event_loop(index_path):
    retriever = LocalRetriever(index_path, delay_ms=0)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        await asyncio.gather(*(retriever.search("brooding temperature chicks") for _ in range(5)))
    finally:
        task.cancel()
    assert ticks > 1  # the loop kept running while sqlite worked in threads
    assert threading.main_thread().is_alive()


# --- ingestion ---------------------------------------------------------------------------------------


def write_doc(path: Path, title: str, paragraphs: list[str]) -> Path:
    body = "\n\n".join(paragraphs)
    path.write_text(f"---\ntitle: {title}\nsource: test suite\n---\n\n{body}\n", encoding="utf-8")
    return path


def test_chunking_respects_size_and_overlaps():
    paragraphs = [f"Paragraph {i}. " + ("Litter moisture must stay low. " * 12) for i in range(6)]
    chunks = chunk_text("\n\n".join(paragraphs))
    assert len(chunks) > 1
    assert all(len(c) <= 800 for c in chunks)
    # The tail of a chunk reappears at the start of the next one (overlap), so facts aren't cut.
    assert chunks[1].split("\n\n")[0] in chunks[0]


def test_load_file_has_stable_ids_and_metadata(tmp_path):
    doc = write_doc(tmp_path / "a.md", "Alpha", ["First paragraph about broilers."])
    first, second = load_file(doc), load_file(doc)
    assert [d.id for d in first] == [d.id for d in second]
    assert first[0].title == "Alpha"
    assert first[0].source == "test suite"
    heading_style = tmp_path / "b.txt"
    heading_style.write_text("# Beta title\nsource: a handbook\n\nSome text.\n", encoding="utf-8")
    (doc_b,) = load_file(heading_style)
    assert (doc_b.title, doc_b.source, doc_b.text) == ("Beta title", "a handbook", "Some text.")


async def test_ingest_is_idempotent_and_replaces_changed_files(tmp_path, index_path):
    docs_dir = tmp_path / "docs"
    (docs_dir / "sub").mkdir(parents=True)
    long_text = [f"Section {i}: " + ("Feeder space and drinker height matter. " * 14) for i in range(5)]
    write_doc(docs_dir / "long.md", "Long doc", long_text)
    write_doc(docs_dir / "sub" / "short.md", "Short doc", ["Zanzibarite is a made-up word for testing."])
    (docs_dir / "ignored.bin").write_bytes(b"\x00\x01")

    await asyncio.to_thread(call_command, "voice_ingest", str(docs_dir), "--backend", "local")
    first = chunk_count(index_path)
    assert first > 2
    await asyncio.to_thread(call_command, "voice_ingest", str(docs_dir), "--backend", "local")
    assert chunk_count(index_path) == first  # same ids: no duplicates

    # The long file shrinks to one paragraph: its old chunks disappear, the other file is untouched.
    write_doc(docs_dir / "long.md", "Long doc", ["Now only one quokkaville paragraph."])
    await asyncio.to_thread(call_command, "voice_ingest", str(docs_dir / "long.md"))
    assert chunk_count(index_path) == 2
    retriever = LocalRetriever(index_path)
    hits = await retriever.search("quokkaville")
    assert [h.title for h in hits] == ["Long doc"]
    assert await retriever.search("Feeder drinker height") == []
    assert [h.title for h in await retriever.search("zanzibarite")] == ["Short doc"]


async def test_upsert_replaces_by_path(local):
    await local.reset()
    doc = load_file(write_doc(Path(local.index_path.parent) / "x.md", "X", ["one", "two"]))
    assert await local.upsert(doc) == len(doc)
    assert await local.upsert(doc) == len(doc)
    assert (await local.health())["documents"] == len(doc)


def test_voice_ingest_command_output_and_reset(tmp_path, index_path, capsys):
    docs_dir = tmp_path / "kb"
    docs_dir.mkdir()
    for i in range(3):
        write_doc(docs_dir / f"d{i}.md", f"Doc {i}", [f"Body {i} about pullets."])
    call_command("voice_ingest", str(BUNDLED_KNOWLEDGE_DIR), "--backend", "local")
    bundled = chunk_count(index_path)
    call_command("voice_ingest", str(docs_dir), "--reset")
    out, err = capsys.readouterr()
    assert chunk_count(index_path) == 3 < bundled
    assert "3/3 files" in err
    assert "[" + "#" * 30 + "]" in err
    assert "Ingested 3 file(s) as 3 chunk(s) into local" in out


def test_voice_ingest_missing_path_fails(tmp_path, index_path):
    with pytest.raises(CommandError, match="Path not found"):
        call_command("voice_ingest", str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CommandError, match="No knowledge files"):
        call_command("voice_ingest", str(empty))


def test_voice_ingest_cli_exit_status(tmp_path, settings):
    import subprocess
    import sys

    manage = str(Path(settings.BASE_DIR) / "manage.py")
    result = subprocess.run(
        [sys.executable, manage, "voice_ingest", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "Path not found" in result.stderr
    help_text = subprocess.run(
        [sys.executable, manage, "voice_ingest", "--help"], capture_output=True, text=True, timeout=60
    )
    assert help_text.returncode == 0
    assert "--reset" in help_text.stdout and "--backend" in help_text.stdout


# --- factory -------------------------------------------------------------------------------------------


async def test_get_retriever_is_cached_per_loop(index_path):
    first = get_retriever()
    assert isinstance(first, LocalRetriever)
    assert get_retriever() is first

    def other_loop():
        async def inner():
            return get_retriever()

        return asyncio.run(inner())

    other = await asyncio.to_thread(other_loop)
    assert other is not first
    assert isinstance(other, LocalRetriever)
    assert get_retriever() is first  # the closed loop's entry is pruned, ours survives


async def test_get_retriever_off_returns_none(settings):
    settings.RAG_BACKEND = "off"
    reset_retrievers()
    assert get_retriever() is None
    reset_retrievers()


def test_get_retriever_requires_a_running_loop(index_path):
    with pytest.raises(RuntimeError):
        get_retriever()


def test_create_retriever_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown RAG backend"):
        create_retriever("elastic")


# --- weaviate ------------------------------------------------------------------------------------------


async def test_weaviate_unreachable_degrades_quickly(settings, caplog):
    settings.RAG_BACKEND = "weaviate"
    settings.WEAVIATE_URL = "http://127.0.0.1:1"
    settings.WEAVIATE_API_KEY = "secret-test-key-123456"
    reset_retrievers()
    retriever = get_retriever()
    assert isinstance(retriever, WeaviateRetriever)
    try:
        with caplog.at_level(logging.WARNING, logger="voice.rag"):
            started = time.monotonic()
            assert await retriever.search("brooding temperature", limit=3) == []
            assert await retriever.search("water intake", limit=3) == []
            assert time.monotonic() - started < 3.0
            health = await retriever.health()
        assert health["backend"] == "weaviate"
        assert health["reachable"] is False
        assert health["documents"] is None
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1  # once per outage, not per query
        assert "secret-test-key" not in caplog.text
    finally:
        await retriever.close()
        reset_retrievers()


async def test_weaviate_unconfigured_returns_nothing(caplog):
    retriever = WeaviateRetriever("", "", "InteliaKnowledge")
    with caplog.at_level(logging.WARNING, logger="voice.rag"):
        assert await retriever.search("anything") == []
        assert await retriever.search("anything else") == []
    assert (await retriever.health())["reachable"] is False
    assert sum("not configured" in r.getMessage() for r in caplog.records) == 1
    await retriever.close()


async def test_weaviate_upsert_unreachable_raises_for_ingestion():
    retriever = WeaviateRetriever("http://127.0.0.1:1", "", "InteliaKnowledge", query_timeout_s=1.0)
    doc = load_file(BUNDLED_KNOWLEDGE_DIR / "en-heat-stress.md")
    with pytest.raises(RuntimeError, match="not reachable"):
        await retriever.upsert(doc)
    await retriever.close()


class _FakeQuery:
    def __init__(self, outcomes):
        self.outcomes = outcomes
        self.calls = []

    async def hybrid(self, **kwargs):
        self.calls.append(("hybrid", kwargs))
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def bm25(self, **kwargs):
        self.calls.append(("bm25", kwargs))
        return self.outcomes.pop(0)


class _FakeClient:
    def __init__(self, query):
        self.query = query
        self.collections = self
        self.closed = False

    def use(self, name):
        assert name == "InteliaKnowledge"
        return self

    async def close(self):
        self.closed = True


def _weaviate_result(*items):
    from types import SimpleNamespace

    return SimpleNamespace(
        objects=[
            SimpleNamespace(properties=props, metadata=SimpleNamespace(score=score)) for props, score in items
        ]
    )


async def test_weaviate_maps_hits_and_logs_outage_once_then_recovery(caplog):
    hit = ({"title": "Heat stress", "text": "Pant...", "source": "guide"}, 0.8)
    query = _FakeQuery([_weaviate_result(hit), TimeoutError(), _weaviate_result(hit)])
    retriever = WeaviateRetriever("http://weaviate.internal:8080", "k", "InteliaKnowledge")
    retriever._client = _FakeClient(query)
    with caplog.at_level(logging.INFO, logger="voice.rag"):
        first = await retriever.search("heat stress", limit=2)
        assert first == [Passage(title="Heat stress", text="Pant...", source="guide", score=0.8)]
        assert query.calls[0] == (
            "hybrid",
            {"query": "heat stress", "limit": 2, "return_metadata": query.calls[0][1]["return_metadata"]},
        )
        client = retriever._client
        assert await retriever.search("heat stress") == []  # failure: dropped client, back-off
        assert client.closed and retriever._client is None
        assert await retriever.search("heat stress") == []  # within back-off: no connect attempt
        retriever._client = _FakeClient(query)
        assert len(await retriever.search("heat stress")) == 1
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unavailable" in m for m in messages) == 1
    assert sum("recovered" in m for m in messages) == 1
