"""Spoken English for the numbers of the knowledge base ("32–33 °C" -> "thirty two to thirty three degrees")."""

from __future__ import annotations

import re

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()  # fmt: skip
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ORDINAL_SUFFIX = re.compile(r"^(\d+)(st|nd|rd|th)$")


def say_integer(n: int) -> str:
    """Return `n` (0..999999) in words; larger numbers digit by digit."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + say_integer(rest))
    if n < 1_000_000:
        rest = n % 1000
        return say_integer(n // 1000) + " thousand" + ("" if rest == 0 else " " + say_integer(rest))
    return " ".join(_ONES[int(d)] for d in str(n))


def say_number(token: str) -> str:
    """Return a numeric token ("32", "0.5", "1,000", "3rd") in words; other tokens unchanged."""
    ordinal = _ORDINAL_SUFFIX.match(token)
    if ordinal:  # "3rd" -> "three": near enough for a language model, and in the dictionary
        return say_integer(int(ordinal.group(1)))
    clean = token.replace(",", "")
    if re.fullmatch(r"\d+", clean):
        return say_integer(int(clean))
    if re.fullmatch(r"\d+\.\d+", clean):
        whole, frac = clean.split(".")
        return say_integer(int(whole)) + " point " + " ".join(_ONES[int(d)] for d in frac)
    return token
