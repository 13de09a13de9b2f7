"""What the local engine says: from injected context, a configured answerer, voice.rag, or a fallback."""

from __future__ import annotations

import asyncio
import logging
import re

from .config import Answerer

log = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 320
RAG_TIMEOUT_S = 3.0
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_MARKER = re.compile(r"^\s*(?:\[\d+\]|\d+[.)]|[-*•]|#+)\s*")
_HAS_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")
_LABEL = re.compile(r"^(?:title|source|text|passage|content|score)\s*:\s*", re.IGNORECASE)
# Instruction lines of the injection wrapper ("Use the following knowledge to answer..."), not knowledge.
_WRAPPER = re.compile(
    r"^(?:use|answer|here (?:is|are)|the following|relevant|retrieved|context|knowledge)\b"
    r".*\b(?:context|knowledge|following|below|excerpts?|passages?|sources?|documents?)\b",
    re.IGNORECASE,
)


def first_sentences(text: str, limit: int = MAX_ANSWER_CHARS) -> str:
    """One or two leading sentences of `text`, at most about `limit` characters."""
    text = " ".join(text.split())
    out = ""
    for sentence in _SENTENCE.split(text):
        if out and len(out) + len(sentence) > limit:
            break
        out = f"{out} {sentence}".strip()
        if len(out) >= limit // 2:
            break
    return out[:limit].rstrip() if len(out) > limit else out


def prose(text: str) -> str:
    """The sentences of a context block or passage: table rows, titles, labels and wrapper lines dropped."""
    kept = []
    for raw in text.splitlines():
        line = _LABEL.sub("", _MARKER.sub("", raw)).strip()
        # Titles and headers carry no sentence end; table rows (also cut mid-row) carry pipes.
        if raw.count("|") >= 2 or not _HAS_SENTENCE_END.search(line) or _WRAPPER.match(line):
            continue
        kept.append(line)
    return " ".join(kept)


def answer_from_context(context: str) -> str:
    """Called when the conversation carries injected knowledge for the current turn."""
    passage = first_sentences(prose(context) or context)
    return f"Here is what I found: {passage}" if passage else fallback_answer(None)


def fallback_answer(question: str | None) -> str:
    """A short honest answer when the engine has nothing to go on."""
    if not question:
        return "I'm the local test engine: I could not recognise that, so I have no specific answer."
    return f"You asked: {first_sentences(question, 160)} I don't have specific information about that yet."


async def rag_answer(question: str) -> str | None:
    """Ask voice.rag (when that package is present) for the best passage; None when unavailable."""
    try:
        from voice.rag import get_retriever  # type: ignore[attr-defined]
    except ImportError:
        return None
    try:
        retriever = get_retriever()
        passages = (
            await asyncio.wait_for(retriever.search(question, limit=3), RAG_TIMEOUT_S) if retriever else []
        )
    except Exception as exc:  # noqa: BLE001 - any retriever failure degrades to the fallback answer
        log.debug("local engine: rag lookup failed: %s", exc)
        return None
    for passage in passages:
        text = first_sentences(prose(getattr(passage, "text", "") or ""))
        if text:
            return f"Here is what I found: {text}"
    return None


async def compose_answer(
    question: str | None, context: str | None, *, answerer: Answerer | None = None, use_rag: bool = True
) -> str:
    """Called by a response before synthesis; returns the assistant's answer text."""
    if answerer is not None:
        try:
            answer = await answerer(question or "", context)
            if answer:
                return answer
        except Exception as exc:  # noqa: BLE001 - a broken answerer must not kill the session
            log.warning("local engine: answerer failed: %s", exc)
    if context:
        return answer_from_context(context)
    if question and use_rag:
        answer = await rag_answer(question)
        if answer:
            return answer
    return fallback_answer(question)
