"""Query normalisation for keyword search: accents, apostrophes, FR/EN stopwords, light stemming."""

from __future__ import annotations

import re
import unicodedata

# Compact French + English stopwords, plus question fillers typical of spoken questions ("combien",
# "should", "faut"): they carry no topic and would otherwise match every document. Accent-free,
# because terms are compared after accent folding.
STOPWORDS = frozenset(
    """
    a ai aie ainsi alors au aucun aussi autre aux avec avez avoir avons bon ca car ce ceci cela celle
    celles celui ces cet cette chaque chez ci combien comme comment dans de des doit doivent donc dont du
    elle elles en encore est et etaient etait ete etre eu faire fais fait faut il ils je la le les leur
    leurs lui ma mais me meme mes moi mon ne ni nos notre nous on ont ou par pas peu peut peuvent plus
    pour pourquoi puis quand que quel quelle quelles quels qui quoi sa sans se ses si sien son sont sous
    sur ta te tes toi ton tous tout toute toutes tres tu un une unes uns vos votre vous vu y
    about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers him his how i if in into is it its itself just me more most much my no nor
    not now of off on once only or other our ours out over own per same she should so some such than
    that the their theirs them then there these they this those through to too under until up very was
    we were what when where which while who whom why will with would you your yours
    tell please know need want give get like good best right kind much many way
    dis dites donne donnez savoir sais sait voudrais veux bien quoi
    """.split()
)

_APOSTROPHES = re.compile(r"['’`´ʼ]")
_NON_WORD = re.compile(r"[^\w]+", re.UNICODE)


def fold(text: str) -> str:
    """Return `text` lowercased with diacritics removed ("Température" -> "temperature")."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def words(text: str) -> list[str]:
    """Return the folded words of `text`; apostrophes split elisions ("d'un" -> "d", "un")."""
    text = _APOSTROPHES.sub(" ", fold(text))
    return [w for w in _NON_WORD.sub(" ", text).split() if w and w != "_"]


def _stem(word: str) -> str:
    """Strip a plural s/x so singular and plural forms share a prefix ("poussins" -> "poussin")."""
    if len(word) > 4 and word[-1] in "sx" and not word.endswith("ss"):
        return word[:-1]
    return word


def query_terms(text: str) -> list[str]:
    """Return the distinct content terms of a question (stopwords and 1-letter elisions removed)."""
    seen: dict[str, None] = {}
    for word in words(text):
        if len(word) < 2 or word in STOPWORDS:
            continue
        seen.setdefault(_stem(word), None)
    return list(seen)


def fts_query(text: str) -> str:
    """Return an FTS5 MATCH expression OR-ing the terms; words >= 4 chars match as prefixes."""
    parts = []
    for term in query_terms(text):
        # Quoted so FTS5 keywords (AND, NEAR...) and digits are literal; "term"* is a prefix query.
        parts.append(f'"{term}"*' if len(term) >= 4 else f'"{term}"')
    return " OR ".join(parts)
