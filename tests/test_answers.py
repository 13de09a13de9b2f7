"""What the local engine answers: language detection, table rows as sentences, passage choice, voice.

The contexts are built the way the gateway builds them: real knowledge files, chunked by voice.rag's
ingestion and formatted by the prefetcher's `format_context` (tables flattened, passages cut with "…").
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.test_engine import _close_upstreams, ask, cfg, send, start, until  # noqa: F401 - autouse fixture
from voice.rag.base import Passage
from voice.rag.ingest import BUNDLED_KNOWLEDGE_DIR, chunk_text, parse_file
from voice.realtime.engine import tts
from voice.realtime.engine.answers import compose_answer, compose_reply
from voice.realtime.engine.language import detect_language, normalise_language
from voice.realtime.engine.passages import parse_context, render_row, spoken, terms_of, units_of
from voice.realtime.prefetch import format_context

FR_QUESTION = "Quelle est la température idéale pour des poussins d'un jour ?"
EN_QUESTION = "What is the ideal brooding temperature for day old chicks?"
FR_DOC = "Température de démarrage des poussins de chair selon l'âge"
needs_espeak = pytest.mark.skipif(
    tts.espeak_path() is None, reason="needs espeak-ng (Debian package; `make test` installs it when it can)"
)


def chunks(name: str) -> list[Passage]:
    """The chunks of one bundled knowledge file, as the retriever returns them."""
    parsed = parse_file((BUNDLED_KNOWLEDGE_DIR / name).read_text(encoding="utf-8"), fallback_title=name)
    return [Passage(parsed.title, text, parsed.source, 1.0) for text in chunk_text(parsed.body)]


def issue_context(language: str) -> str:
    """Issue 16's retrieval: the table's tail and the practice sentence first, the table second, and an
    unrelated third source whose first prose line is what the engine used to read out."""
    brooding = chunks("fr-temperature-demarrage.md" if language == "fr" else "en-brooding-temperature.md")
    egg = chunks("fr-qualite-oeuf.md" if language == "fr" else "en-egg-quality.md")
    return format_context([brooding[1], brooding[0], egg[-1]])


# --- language --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (FR_QUESTION, "fr"),
        (EN_QUESTION, "en"),
        ("Combien d'eau boit un poulet à 4 semaines ?", "fr"),
        ("How much water does a broiler drink?", "en"),
        ("Quand vacciner contre Marek ?", "fr"),
        ("Litière humide : que faire ?", "fr"),
        ("Marek vaccine timing?", "en"),  # no French evidence: the default
        ("", "en"),
    ],
)
def test_detect_language(text: str, expected: str) -> None:
    assert detect_language(text) == expected


def test_language_default_and_hints() -> None:
    assert detect_language("Gumboro ?", default="fr") == "fr"
    assert detect_language(None, default="fr") == "fr"
    assert normalise_language("fr-FR") == "fr" and normalise_language("en_US") == "en"
    assert normalise_language("de") == "en" and normalise_language(None, "fr") == "fr"


# --- table rows ------------------------------------------------------------------------------------------
def test_table_rows_render_as_sentences_with_their_column_names() -> None:
    assert render_row(["Jour 1", "32–34 °C"], [], "fr") == "Jour 1 : 32–34 °C."
    assert render_row(["Day 1", "32–34 °C"], [], "en") == "Day 1: 32–34 °C."
    row = render_row(
        ["Day-old to day 3 (first week)", "32–33 °C", "30–31 °C"],
        ["Age", "Spot brooding (under/edge of brooder)", "Whole-house brooding (air)"],
        "en",
    )
    assert row == "Day-old to day 3 (first week): 32–33 °C (spot brooding), 30–31 °C (whole-house brooding)."


def test_flattened_table_is_read_back_into_rows_and_a_cut_row_is_dropped() -> None:
    sources = parse_context(issue_context("fr"))
    assert [s.title for s in sources][:2] == [FR_DOC, FR_DOC]
    assert all(s.language == "fr" for s in sources)
    assert all("source:" not in s.text and "Relevant" not in s.text for s in sources)
    table = [u.text for u in units_of(sources[1]) if u.row]
    assert table[0] == (
        "Poussin d'un jour à 3 jours (première semaine) : 32–33 °C (démarrage localisé), "
        "30–31 °C (chauffage d'ambiance)."
    )
    assert "2e semaine : 29–30 °C (démarrage localisé), 28–29 °C (chauffage d'ambiance)." in table
    assert not any("Âge" in row or "---" in row for row in table)  # header and rule are not rows
    # The first source starts inside a row ("4e semaine | 23…" with its label cut off): that row goes.
    first = [u.text for u in units_of(sources[0]) if u.row]
    assert first and all(text[0].isdigit() and "semaine" in text for text in first)


def test_multiline_passage_headings_and_list_items() -> None:
    text = "Storage:\n- Collect eggs twice a day and keep them at 13–18 °C.\n| Age | T |\n|---|---|\n| Day 1 | 32 °C |"
    units = units_of(parse_context(f"[1] Eggs (source: eggs.md)\n{text}")[0])
    assert [u.text for u in units] == ["Collect eggs twice a day and keep them at 13–18 °C.", "Day 1: 32 °C (T)."]
    assert "storage" in units[0].section  # the heading helps matching but is not said


def test_matching_terms_fold_accents_plurals_ligatures_and_numbers() -> None:
    assert terms_of("Œufs à coquilles fines") == terms_of("oeuf a coquille fine")
    assert {"#3", "#3semaine"} <= terms_of("3e semaine") and "#3semaine" in terms_of("trois semaines")
    assert "#4week" in terms_of("at four weeks") and "#4week" in terms_of("Day 28 (4 weeks)")


def test_long_sentences_are_cut_at_a_clause() -> None:
    text = "Keep the litter dry, " + "turn it over where it cakes, " * 20 + "and ventilate."
    cut = spoken(text, 120)
    assert len(cut) <= 121 and cut.endswith("…") and ", …" not in cut and text.startswith(cut[:-1])
    assert spoken("Short. Sentences. Fit.", 12) == "Short."


# --- passage choice --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("language", "question"), [("fr", FR_QUESTION), ("en", EN_QUESTION)])
async def test_day_old_chick_temperature_from_the_right_document(language: str, question: str) -> None:
    reply = await compose_reply(question, issue_context(language), use_rag=False)
    assert reply.language == language and detect_language(reply.text) == language
    assert "32–33 °C" in reply.text
    assert "Here is what I found" not in reply.text
    assert not any(word in reply.text.lower() for word in ("œuf", "egg", "coquille", "shell"))
    assert len(reply.text) <= 320


async def test_table_row_answers_an_age_question() -> None:
    context = format_context(chunks("fr-temperature-demarrage.md")[:1], max_chars=2000)  # the whole table
    answer = await compose_answer("Quelle température pour des poussins de 3 semaines ?", context)
    assert answer == "3e semaine : 26–27 °C (démarrage localisé), 26 °C (chauffage d'ambiance)."
    context = format_context(chunks("en-water-intake-broilers.md")[:1])
    answer = await compose_answer("How much water does a broiler drink at four weeks?", context)
    assert "200–250 mL" in answer


async def test_top_ranked_document_wins_a_tie() -> None:
    context = (
        "Relevant Intelia knowledge (cite if useful):\n"
        "[1] Layers: In the laying house the temperature should be about 20 °C. (source: a.md)\n"
        "[2] Broilers: In the broiler house the temperature should be about 30 °C. (source: b.md)"
    )
    assert await compose_answer("What temperature in the house?", context) == (
        "In the laying house the temperature should be about 20 °C."
    )
    assert "30 °C" in await compose_answer("What temperature in the broiler house?", context)


async def test_without_a_question_the_context_is_not_read_out() -> None:
    """An audio turn the engine could not recognise: the gateway's context was retrieved for the
    placeholder transcript, so the engine says so (in the session's language hint) instead of reading it."""
    reply = await compose_reply(None, issue_context("fr"), use_rag=False, language="fr")
    assert reply.language == "fr" and "pas compris" in reply.text and "°C" not in reply.text


async def test_context_sharing_no_word_with_the_question_is_not_read_out() -> None:
    answer = await compose_answer("Et les canards de Barbarie ?", issue_context("fr"))
    assert answer.startswith("Vous avez demandé") and "°C" not in answer


async def test_fallbacks_speak_the_question_language() -> None:
    fr = await compose_reply("Et les canards de Barbarie ?", None, use_rag=False)
    assert fr.language == "fr" and fr.text.startswith("Vous avez demandé")
    en = await compose_reply(None, None, use_rag=False)
    assert en.language == "en" and "could not make out" in en.text
    hinted = await compose_reply(None, None, use_rag=False, language="fr-FR")
    assert hinted.language == "fr" and "pas compris" in hinted.text


async def test_answerer_reply_language_is_detected() -> None:
    async def answerer(question: str, context: str | None) -> str:
        return "Il faut environ 32 °C pour les poussins."

    reply = await compose_reply("hello?", None, answerer=answerer)
    assert reply.language == "fr"


# --- speech out ------------------------------------------------------------------------------------------
def test_espeak_voice_follows_the_language() -> None:
    assert tts.espeak_voice("fr") == "fr-fr" and tts.espeak_voice("fr-CA") == "fr-fr"
    assert tts.espeak_voice("en") == "en" and tts.espeak_voice("--help") == "en"  # never an option


@needs_espeak
async def test_espeak_speaks_french_and_english_differently() -> None:
    text = "Trente-deux degrés pour les poussins."
    fr = await tts.synthesize(text, backend="espeak", language="fr")
    en = await tts.synthesize(text, backend="espeak", language="en")
    assert fr.backend == en.backend == "espeak"
    assert fr.chunks != en.chunks and fr.duration_ms > 500


@needs_espeak
async def test_engine_speaks_a_french_answer_with_the_french_voice() -> None:
    """Through the engine: no language hint in the session (English by default), a French answer."""
    up = await start(cfg(tts="espeak"), create_response=False)
    await send(
        up,
        type="conversation.item.create",
        item={"id": "u1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": FR_QUESTION}]},
    )
    await send(
        up,
        type="conversation.item.create",
        previous_item_id="u1",
        item={"type": "message", "role": "system", "content": [{"type": "input_text", "text": issue_context("fr")}]},
    )
    await send(up, type="response.create")
    done, _ = await until(up, "response.done", timeout=30)
    answer = done["response"]["output"][0]["content"][0]["transcript"]
    assert "32–33 °C" in answer
    assert any(key[0] == answer and key[1:3] == ("espeak", "fr-fr") for key in tts._cache)


async def test_engine_text_turn_without_context_still_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    class Retriever:
        async def search(self, query: str, limit: int = 3) -> list[Any]:
            return chunks("en-brooding-temperature.md")[:limit]

    monkeypatch.setattr("voice.rag.get_retriever", lambda: Retriever())
    up = await start(cfg(use_rag=True), output_modalities=["text"])
    done, _ = await ask(up, EN_QUESTION)
    assert "32–33 °C" in done["response"]["output"][0]["content"][0]["text"]
