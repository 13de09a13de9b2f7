"""French or English? A stopword-and-accent vote, good enough to pick the answer's language and voice."""

from __future__ import annotations

import re

FRENCH = "fr"
ENGLISH = "en"
LANGUAGES = (FRENCH, ENGLISH)

# Function words frequent in one language and absent (or rare) in the other; words both share
# ("a", "en", "on", "me", "as") are left out so they never vote.
_FRENCH_WORDS = frozenset(
    """
    le la les des du de un une est et pour quelle quel quels quelles comment combien que qui quoi dans
    avec sur au aux pas ne sont il ils elle elles je vous nous ce cette ces mon ma mes leur leurs ou où
    à faut peut doit très plus selon chez été être avoir après avant jour jours poussin poussins quand
    contre entre vers sans sous aussi mais donc car chaque tous toutes faire
    """.split()
)
_ENGLISH_WORDS = frozenset(
    """
    the is are what which how for of to and with do does should my your it its at this that these
    those there their from by be been have has can could would will when where why who day old
    chick chicks much many per week weeks
    """.split()
)
_ACCENTED = re.compile(r"[éèêëàâîïôûùüçœÉÈÊÀÂÎÔÛÙÇŒ]")
_ELISION = re.compile(r"\b(?:[dlnjcsm]|qu)['’]\w", re.IGNORECASE)
_SPACED_PUNCTUATION = re.compile(r"\s[?!;:](?:\s|$)")  # French typography: "un jour ?"
_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)?", re.UNICODE)


def language_votes(text: str) -> tuple[int, int]:
    """(French, English) evidence in `text`: marker words, accented letters, elisions, spaced "?"."""
    french = len(_ACCENTED.findall(text)) + len(_ELISION.findall(text)) + len(_SPACED_PUNCTUATION.findall(text))
    english = 0
    for word in _WORD.findall(text.lower()):
        word = re.split(r"['’]", word)[-1]  # "d'un" votes as "un"
        french += word in _FRENCH_WORDS
        english += word in _ENGLISH_WORDS
    return french, english


def detect_language(text: str | None, default: str = ENGLISH) -> str:
    """Called per question, passage and answer: "fr" or "en", `default` when the text does not say."""
    if not text:
        return default
    french, english = language_votes(text)
    if french == english:
        return default
    return FRENCH if french > english else ENGLISH


def normalise_language(code: str | None, default: str = ENGLISH) -> str:
    """Map a hint such as "fr-FR" or "en_US" to "fr"/"en"; anything else gives `default`."""
    base = (code or "").strip().lower()[:2]
    return base if base in LANGUAGES else default
