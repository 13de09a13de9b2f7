"""Knowledge as the engine reads it: sources, their sentences and table rows, and which one answers.

The gateway injects context as `CONTEXT_HEADER` then one line per source, `[n] Title: text (source: …)`,
with each passage's line breaks flattened (a Markdown table becomes `| a | b | | c | d |`) and long
passages cut with "…" (voice/realtime/prefetch.py `format_context`). Retrieved passages (voice.rag)
keep their lines. Both are read here into `Source`s, split into `Unit`s (a prose sentence, or a table
row rendered as a sentence with its column names), and units are ranked by how many of the
question's content words and numbers they hold (accent-folded, plural-stripped, stopwords dropped;
rarer words weigh more; words only in the unit's heading, table caption or document title count half),
weighted by the document's retrieval rank and language; of equal matches the shorter unit wins.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from voice.rag.text import fold, query_terms

from .language import FRENCH, detect_language

RANK_DECAY = 0.35  # document n (0-based, by first appearance) weighs 1 / (1 + RANK_DECAY * n)
OTHER_LANGUAGE = 0.6  # weight of a source not in the question's language
TRUNCATED = 0.6  # weight of a sentence cut by the context's length limit ("…")
TITLE_MATCH = 0.5  # a question word only in the unit's heading, table caption or title counts this much
LENGTH_SCALE = 600  # a unit of this many characters weighs half as much as an empty one
RUNNER_UP = 0.5  # a second unit is worth adding when it scores at least this share of the best

_SOURCE_START = re.compile(r"^\s*\[\d+\]\s*", re.MULTILINE)
_SOURCE_SUFFIX = re.compile(r"\s*\(source:\s.*\)\s*$", re.IGNORECASE)
_LABEL = re.compile(r"^\s*(title|score|source|text|passage|content)\s*:\s*", re.IGNORECASE)
# Instruction lines of an injection wrapper ("Relevant Intelia knowledge (cite if useful):"), not knowledge.
_WRAPPER = re.compile(
    r"^(?:use|answer|here (?:is|are)|the following|relevant|retrieved|context|knowledge)\b"
    r".*\b(?:context|knowledge|following|below|excerpts?|passages?|sources?|documents?)\b",
    re.IGNORECASE,
)
_SENTENCE = re.compile(r"(?<=[.!?…])\s+")
_HEADING_LINE = re.compile(r"^[^.!?]{2,100}\S:$")  # "Temperature by age (chick level):"
_GLUED_HEADING = re.compile(r"^[^.!?:]{2,80}[^\s.!?:]:\s+(?=[A-ZÀ-Þ0-9«•*-])")  # "Storage: Collect eggs…"
_MARKER = re.compile(r"^(?:[-*•]|\d+[.)])\s+")  # list item markers
_TRAILING_CAPTION = re.compile(r"([^.!?:|]{3,100}\S):\s*$")
_TABLE = re.compile(r"\|.*\|", re.DOTALL)
_CUT_ROW = re.compile(r"[^\s.!?:…]\s*$")  # text right before a table that is not a heading or sentence
_ROW_BREAK = re.compile(r"\|\s+\|")  # "| |" between rows (an empty cell reads the same: rare in the KB)
_RULE_CELL = re.compile(r"^:?-{2,}:?$")
_PARENTHESIS = re.compile(r"\s*\([^)]*\)")
_NUMBER = re.compile(r"\d+|[^\W\d_]+", re.UNICODE)  # words and digit runs ("3e" -> "3", "e")
_NUMBER_WORDS = dict(
    zip("two three four five six seven eight nine ten".split(), map(str, range(2, 11)), strict=True)
) | dict(zip("deux trois quatre cinq six sept huit neuf dix".split(), map(str, range(2, 11)), strict=True))
_LIGATURES = str.maketrans({"œ": "oe", "Œ": "Oe", "æ": "ae", "Æ": "Ae"})  # "œufs" ~ "oeufs" (NFKD keeps œ)
_ORDINAL_SUFFIXES = frozenset("e er re eme st nd rd th".split())  # "3e", "1er", "2nd": the number alone
_LETTER = re.compile(r"[^\W\d_]", re.UNICODE)


@dataclass(frozen=True)
class Source:
    """One retrieved passage: its title, text, rank in the retrieval (0 = best) and language."""

    title: str
    text: str
    rank: int
    language: str


@dataclass(frozen=True)
class Unit:
    """One answerable piece of a source: a sentence, or a table row rendered as a sentence."""

    text: str  # what would be said
    terms: frozenset[str]  # its own words and numbers
    source: Source
    section: frozenset[str] = frozenset()  # words of its heading or table caption (not said)
    truncated: bool = False
    row: bool = False


def make_source(title: str, text: str, rank: int) -> Source:
    """A source with its language detected from its own words."""
    return Source(title.strip(), text.strip(), rank, detect_language(f"{title} {text}"))


def sources_from_passages(passages: Iterable[object]) -> list[Source]:
    """Sources from voice.rag `Passage`s (best first)."""
    return [
        make_source(getattr(p, "title", "") or "", getattr(p, "text", "") or "", rank)
        for rank, p in enumerate(passages)
    ]


def parse_context(context: str) -> list[Source]:
    """Called on injected knowledge: its numbered sources in order; unnumbered knowledge comes last."""
    starts = [m.end() for m in _SOURCE_START.finditer(context)]
    bounds = [m.start() for m in _SOURCE_START.finditer(context)]
    preamble = context[: bounds[0]] if bounds else context
    blocks = [context[start:end] for start, end in zip(starts, [*bounds[1:], len(context)], strict=True)]
    sources = [_parse_block(block, rank) for rank, block in enumerate(blocks)]
    loose = [_LABEL.sub("", line).strip() for line in preamble.splitlines()]
    loose = [line for line in loose if line and not _WRAPPER.match(line)]
    if loose:
        sources.append(make_source("", "\n".join(loose), len(sources)))
    return [s for s in sources if s.text or s.title]


def _parse_block(block: str, rank: int) -> Source:
    """`Title: text (source: …)` on one line, or a `Title (source: …)` line followed by the text."""
    title, lines = "", []
    for raw in block.splitlines():
        label = _LABEL.match(raw)
        line = _SOURCE_SUFFIX.sub("", raw[label.end() :] if label else raw).strip()
        kind = label.group(1).lower() if label else ""
        if kind in ("score", "source") or not line:
            continue
        if kind == "title" or (not title and not lines and kind == ""):
            head, sep, rest = line.partition(": ")
            title = head if sep or kind == "title" else line
            if sep and kind != "title":
                lines.append(rest)
            continue
        lines.append(line)
    return make_source(title, "\n".join(lines), rank)


# --- units ------------------------------------------------------------------------------------------------


def units_of(source: Source) -> list[Unit]:
    """The sentences and table rows of one source, in reading order."""
    table = _TABLE.search(source.text)
    if table is None:
        return _sentences(source, source.text)
    before, after = source.text[: table.start()], source.text[table.end() :]
    caption = _TRAILING_CAPTION.search(before)
    rows = _rows(source, table.group(0), caption.group(1) if caption else "")
    if _CUT_ROW.search(before):
        rows = rows[1:]  # the passage starts inside a row ("°C | 26 °C | | Week 4 |…"): its cells are shifted
    return _sentences(source, before) + rows + _sentences(source, after)


def _sentences(source: Source, text: str) -> list[Unit]:
    """Prose sentences; each also matches on its section heading ("Maladie de Marek:"), which is not said."""
    units, heading = [], ""
    for piece in _SENTENCE.split(" ".join(line.strip() for line in text.splitlines())):
        piece = piece.strip()
        glued = _GLUED_HEADING.match(piece)
        if glued:
            heading, piece = glued.group(0).strip().rstrip(":"), piece[glued.end() :]
        elif _HEADING_LINE.match(piece):
            heading = piece.rstrip(":")
            continue
        sentence = _MARKER.sub("", piece)
        words = [w for w in sentence.split() if _LETTER.search(w)]
        if len(words) < 3 or _WRAPPER.match(sentence):
            continue
        units.append(Unit(sentence, terms_of(sentence), source, terms_of(heading), sentence.endswith("…")))
    return units


def _rows(source: Source, table: str, caption: str) -> list[Unit]:
    """The rows of a (possibly flattened, possibly cut) Markdown table, each rendered as a sentence."""
    rows = [[c.strip() for c in raw.strip().strip("|").split("|")] for raw in _ROW_BREAK.split(table.strip())]
    rule = next((i for i, cells in enumerate(rows) if all(_RULE_CELL.match(c) for c in cells)), None)
    header = rows[rule - 1] if rule else []  # the row above the |---| rule names the columns
    skip = {rule - 1, rule} if rule is not None else set()
    units = []
    for index, cells in enumerate(rows):
        if index in skip or sum(1 for c in cells if c) < 2:
            continue  # header, rule, or a row cut by the context limit: nothing to say
        text = render_row(cells, header, source.language)
        units.append(Unit(text, terms_of(text), source, terms_of(caption), row=True))
    return units


def render_row(cells: Sequence[str], header: Sequence[str], language: str) -> str:
    """A table row as a spoken sentence: "Jour 1 : 32–34 °C (démarrage)" / "Day 1: 32–34 °C (spot)"."""
    label, values = cells[0], cells[1:]
    names = list(header[1:]) if len(header) == len(cells) else []
    parts = []
    for index, value in enumerate(values):
        if not value:
            continue
        name = _column_name(names[index]) if names else ""
        parts.append(f"{value} ({name})" if name else value)
    colon = " : " if language == FRENCH else ": "
    return f"{label}{colon}{', '.join(parts)}." if label else f"{', '.join(parts)}."


def _column_name(name: str) -> str:
    """A column header as said after a value: parentheses dropped, lower-cased unless an acronym."""
    name = _PARENTHESIS.sub("", name).strip()
    if len(name) > 1 and not name[:2].isupper():
        name = name[0].lower() + name[1:]
    return name


# --- choosing ---------------------------------------------------------------------------------------------


def terms_of(text: str) -> frozenset[str]:
    """What a question or unit matches on: content words (folded, stemmed), numbers, and number+noun
    pairs, so "3 semaines" meets "3e semaine" and "four weeks" meets "Day 28 (4 weeks)"."""
    text = text.translate(_LIGATURES)
    tokens = [_NUMBER_WORDS.get(w, w) for w in _NUMBER.findall(fold(text)) if w not in _ORDINAL_SUFFIXES]
    numbers = {f"#{t}" for t in tokens if t.isdigit()}
    for left, right in itertools.pairwise(tokens):
        number, noun = (left, right) if left.isdigit() else (right, left)
        if number.isdigit() and not noun.isdigit() and query_terms(noun):
            numbers.add(f"#{number}{query_terms(noun)[0]}")
    return frozenset(query_terms(text)) | numbers


def _related(a: str, b: str) -> bool:
    """Same word up to a light suffix: "desinfecter" ~ "desinfection", "brooding" ~ "brooder"."""
    shared = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return shared >= 4 and shared >= min(len(a), len(b)) - 3


def _matches(term: str, terms: frozenset[str]) -> bool:
    """Exact match, or the same word with another suffix (never for numbers)."""
    if term in terms:
        return True
    return not term.startswith("#") and any(_related(term, t) for t in terms if not t.startswith("#"))


def best_units(sources: Sequence[Source], question: str, language: str | None) -> list[Unit]:
    """Units of `sources` best first for `question`: those scoring at least RUNNER_UP of the best; none
    when no unit shares a word with it (the context is then not about it). `language` (the question's)
    favours sources written in it."""
    units = [unit for source in sources for unit in units_of(source)]
    if not units:
        return []
    # Chunks of one document share its best rank: the top-ranked document is trusted most.
    titles = list(dict.fromkeys(source.title for source in sources))
    title_terms = {title: terms_of(title) for title in titles}
    around = [u.section | title_terms[u.source.title] for u in units]  # heading or caption, and title
    wanted = terms_of(question)
    df = {t: sum(1 for u, a in zip(units, around, strict=True) if _matches(t, u.terms | a)) for t in wanted}
    weight = {term: math.log(1 + len(units) / count) for term, count in df.items() if count}

    def score(unit: Unit, context: frozenset[str]) -> float:
        overlap = sum(
            w if _matches(term, unit.terms) else TITLE_MATCH * w if _matches(term, context) else 0.0
            for term, w in weight.items()
        )
        factor = 1 / (1 + RANK_DECAY * titles.index(unit.source.title))
        if language and unit.source.language != language:
            factor *= OTHER_LANGUAGE
        factor *= LENGTH_SCALE / (LENGTH_SCALE + len(unit.text))  # equal matches: the shorter says it
        return overlap * factor * (TRUNCATED if unit.truncated else 1.0)

    scored = sorted(
        ((score(u, a), i, u) for i, (u, a) in enumerate(zip(units, around, strict=True))),
        key=lambda t: (-t[0], t[1]),
    )
    top = scored[0][0]
    return [u for s, _, u in scored if s >= top * RUNNER_UP] if top > 0 else []


def spoken(text: str, limit: int) -> str:
    """`text` cut to about `limit` characters at a sentence, else a clause, else a word boundary."""
    if len(text) <= limit:
        return text
    out = ""
    for sentence in _SENTENCE.split(text):
        if len(out) + len(sentence) + 1 > limit:
            break
        out = f"{out} {sentence}".strip()
    if out:
        return out
    head = text[:limit]
    cut = max(head.rfind(", "), head.rfind("; "), head.rfind(" : "))
    cut = cut if cut > limit // 2 else head.rfind(" ")
    return head[: cut if cut > 0 else limit].rstrip(" ,;:") + "…"
