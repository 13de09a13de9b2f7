"""Word error rate, as the speech tests and the bench measure recognition against the manifest."""

from __future__ import annotations

import re

from .domain_lm import spoken_words


def normalise(text: str) -> list[str]:
    """Lowercase spoken words, punctuation dropped, numbers in words (as the recogniser writes them)."""
    return spoken_words(re.sub(r"[?!.,;:]", " ", text))


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, by edit distance over words."""
    ref, hyp = normalise(reference), normalise(hypothesis)
    row = list(range(len(hyp) + 1))
    for i in range(1, len(ref) + 1):
        diagonal, row[0] = row[0], i
        for j in range(1, len(hyp) + 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (ref[i - 1] != hyp[j - 1]))
    return row[len(hyp)] / max(len(ref), 1)
