"""What the local engine says: from injected context, a configured answerer, voice.rag, or a fallback.

Answers are short and spoken, in the language of the question (French or English). From knowledge
(injected context or a voice.rag lookup) the engine picks the sentence, or the table row read as a
sentence ("Jour 1 : 32–34 °C"), that best matches the question; see `passages` for how.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from .config import Answerer
from .language import ENGLISH, FRENCH, detect_language, normalise_language
from .passages import Source, Unit, best_units, parse_context, sources_from_passages, spoken

log = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 320
SHORT_ANSWER_CHARS = 120  # below this, a second matching sentence of the same source is added
RAG_TIMEOUT_S = 3.0

_NO_QUESTION = {
    ENGLISH: "I could not make out the question. Could you say it again, or type it?",
    FRENCH: "Je n'ai pas compris la question. Pouvez-vous la répéter, ou l'écrire ?",
}
_NO_KNOWLEDGE = {
    ENGLISH: "You asked: {question} I don't have specific information about that yet.",
    FRENCH: "Vous avez demandé : {question} Je n'ai pas encore d'information précise à ce sujet.",
}


@dataclass(frozen=True)
class Reply:
    """The assistant's answer text and the language it is in (which picks the synthesis voice)."""

    text: str
    language: str


def first_sentences(text: str, limit: int = MAX_ANSWER_CHARS) -> str:
    """Whole leading sentences of `text` up to about `limit` characters (cut at a clause if needed)."""
    return spoken(" ".join(text.split()), limit)


def fallback_answer(question: str | None, language: str = ENGLISH) -> str:
    """A short honest answer, in `language`, when the engine has nothing to go on."""
    language = normalise_language(language)
    if not question:
        return _NO_QUESTION[language]
    return _NO_KNOWLEDGE[language].format(question=first_sentences(question, 160))


def answer_from_sources(sources: list[Source], question: str, language: str) -> Reply | None:
    """The best-matching sentence or table row of `sources` for `question`; None when they hold none."""
    chosen = best_units(sources, question, language)
    return Reply(_join(chosen), chosen[0].source.language) if chosen else None


def _join(units: list[Unit]) -> str:
    """The best unit, plus the runner-up prose sentence of its source when the best alone is very short."""
    best = units[0]
    text = best.text
    for extra in units[1:]:
        if len(text) >= SHORT_ANSWER_CHARS or best.row or extra.row or extra.source is not best.source:
            break
        if len(text) + 1 + len(extra.text) <= MAX_ANSWER_CHARS:
            text = f"{text} {extra.text}"
    return spoken(text, MAX_ANSWER_CHARS)


def answer_from_context(context: str, question: str | None = None, language: str = ENGLISH) -> Reply:
    """Called when the conversation carries injected knowledge for the current turn.

    Without a question (an audio turn the engine could not recognise) the context is not read out:
    the gateway retrieved it for the placeholder transcript, so it is about nothing the user said.
    """
    reply = answer_from_sources(parse_context(context), question, language) if question else None
    return reply or Reply(fallback_answer(question, language), language)


async def rag_answer(question: str, language: str = ENGLISH) -> Reply | None:
    """Ask voice.rag (when that package is present) for passages and answer from them; None if none."""
    try:
        from voice.rag import get_retriever  # type: ignore[attr-defined]
    except ImportError:
        return None
    try:
        retriever = get_retriever()
        passages = await asyncio.wait_for(retriever.search(question, limit=3), RAG_TIMEOUT_S) if retriever else []
    except Exception as exc:  # noqa: BLE001 - any retriever failure degrades to the fallback answer
        log.debug("local engine: rag lookup failed: %s", exc)
        return None
    return answer_from_sources(sources_from_passages(passages), question, language)


async def compose_reply(
    question: str | None,
    context: str | None,
    *,
    answerer: Answerer | None = None,
    use_rag: bool = True,
    language: str | None = None,
) -> Reply:
    """Called by a response before synthesis: the answer and its language.

    `language` is a hint (the session's transcription language) used when the question's own words
    do not say, e.g. an audio turn without a transcript.
    """
    language = detect_language(question, normalise_language(language))
    if answerer is not None:
        try:
            answer = await answerer(question or "", context)
            if answer:
                return Reply(answer, detect_language(answer, language))
        except Exception as exc:  # noqa: BLE001 - a broken answerer must not kill the session
            log.warning("local engine: answerer failed: %s", exc)
    if context:
        return answer_from_context(context, question, language)
    if question and use_rag:
        reply = await rag_answer(question, language)
        if reply:
            return reply
    return Reply(fallback_answer(question, language), language)


async def compose_answer(
    question: str | None, context: str | None, *, answerer: Answerer | None = None, use_rag: bool = True
) -> str:
    """Called where only the answer text is needed; see `compose_reply`."""
    reply = await compose_reply(question, context, answerer=answerer, use_rag=use_rag)
    return reply.text
