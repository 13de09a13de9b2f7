"""The domain language model: a trigram ARPA model and a pronunciation dictionary built from the
English knowledge base plus generic spoken-question forms (never from test recordings).

Built by `manage.py voice_ingest` (and on first use when missing) with `build(files, out_dir)`; read by
the PocketSphinx recogniser. Discounting is interpolated absolute discounting written in backoff form,
which is exact: an unseen word's probability is the context's backoff weight times the lower order's.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from .numbers import say_number

LM_NAME = "en-domain.lm"
DICT_NAME = "en-domain.dict"
SOURCES_NAME = "en-domain.sources.json"
ORDER = 3

# Generic question forms a farmer asks; {t} is a topic of the knowledge base (from its titles and
# headings), {s} a subject (animals the knowledge base talks about), {a} an age or period.
QUESTION_FORMS = (
    "what is the ideal {t} for {s}",
    "what is the ideal {t} for {s} {a}",
    "what is the recommended {t} for {s} {a}",
    "what is the right {t} for {s}",
    "what is the best {t}",
    "what {t} do {s} need {a}",
    "what should the {t} be {a}",
    "how much {t} do {s} need",
    "how much {t} should {s} have per day {a}",
    "how much {t} should a {s} drink per day {a}",
    "how much {t} should a {s} eat per day {a}",
    "how many {s} per square meter",
    "how do i manage {t}",
    "how do i control {t} in {s}",
    "how can i reduce {t}",
    "when should i start {t}",
    "tell me about {t}",
    "what causes {t} in {s}",
    "why is {t} important for {s}",
    "what are the signs of {t} in {s}",
)
SUBJECTS = ("chicks", "day old chicks", "broilers", "broiler", "broiler chicks", "layers", "hens", "laying hens",
            "pullets", "birds", "bird", "the flock", "my birds", "my chickens", "chickens")  # fmt: skip
PERIODS = ("", "during the first week", "in the first week", "per day", "at placement", "at day one",
           *(f"at {say_number(str(n))} weeks of age" for n in range(1, 9)),
           *(f"in week {say_number(str(n))}" for n in range(1, 7)))  # fmt: skip
STOP = frozenset("a an and the of to for in on by at or with from per vs".split())

_FRONT = re.compile(r"\A---\s*\n(.*?)\n---\s*\n", re.DOTALL)
_LANG = re.compile(r"^lang\s*:\s*(\w+)", re.IGNORECASE | re.MULTILINE)
_TITLE = re.compile(r"^title\s*:\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
_SENTENCE = re.compile(r"[.!?;:()\n|]+|\s[–—-]\s")
_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|\d+(?:[.,]\d+)?(?:st|nd|rd|th)?|%|°c|°f")
_SYMBOLS = {"%": "percent", "°c": "degrees", "°f": "degrees fahrenheit"}


def is_english(text: str, path: Path) -> bool:
    """Whether a knowledge file is English: its front matter says so, else its name starts with en-."""
    front = _FRONT.match(text)
    lang = _LANG.search(front.group(1)) if front else None
    return lang.group(1).lower() == "en" if lang else path.name.lower().startswith("en")


def spoken_words(text: str) -> list[str]:
    """Lowercase words as a speaker says them: numbers and units in words, ranges read "to"."""
    text = text.lower().replace("’", "'")
    text = re.sub(r"(?<=\d)\s*[–—-]\s*(?=\d)", " to ", text)
    text = re.sub(r"(?<=[a-z])-(?=[a-z])", " ", text)  # day-old -> day old
    out: list[str] = []
    for token in _TOKEN.findall(text):
        out.extend((_SYMBOLS.get(token) or say_number(token)).split())
    return out


def knowledge_sentences(text: str) -> tuple[list[list[str]], list[str]]:
    """Return (sentences as word lists, topic phrases) of one knowledge file's text."""
    front = _FRONT.match(text)
    body = text[front.end() :] if front else text
    titles = [m.group(1) for m in _TITLE.finditer(front.group(1))] if front else []
    titles += _HEADING.findall(body)
    sentences = [words for part in _SENTENCE.split(body) if (words := spoken_words(part))]
    sentences += [spoken_words(t) for t in titles]
    topics: list[str] = []
    for title in titles:
        words = spoken_words(title)
        for size in (1, 2, 3):  # content-word runs of the title: "brooding temperature", "water intake"
            for i in range(len(words) - size + 1):
                run = words[i : i + size]
                if run[0] not in STOP and run[-1] not in STOP and not any(w.isdigit() for w in run):
                    topics.append(" ".join(run))
    return sentences, topics


def question_sentences(topics: Iterable[str], limit_per_form: int = 400) -> list[list[str]]:
    """Generic question forms filled with the knowledge base's topics (deterministic, bounded)."""
    topics = sorted(set(topics))
    out: list[list[str]] = []
    for form in QUESTION_FORMS:
        slots = [topics if "{t}" in form else [""], SUBJECTS if "{s}" in form else [""],
                 PERIODS if "{a}" in form else [""]]  # fmt: skip
        combos = list(itertools.product(*slots))
        step = max(1, len(combos) // limit_per_form)
        for t, s, a in combos[::step]:
            out.append(form.format(t=t, s=s, a=a).split())
    return out


def load_dictionary(path: Path) -> dict[str, list[str]]:
    """Read a CMU-style dictionary: word -> pronunciation lines (alternates keep their "(2)" suffix)."""
    entries: dict[str, list[str]] = defaultdict(list)
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            word, _, phones = line.strip().partition(" ")
            if phones:
                entries[word.split("(")[0]].append(f"{word} {phones.strip()}")
    return entries


def split_known(sentence: list[str], known: dict[str, list[str]]) -> list[list[str]]:
    """Split a sentence at words without a pronunciation (they cannot be recognised anyway)."""
    runs, current = [], []
    for word in sentence:
        if word in known:
            current.append(word)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def arpa(sentences: list[list[str]], order: int = ORDER) -> str:
    """Return an ARPA n-gram model of `sentences` (interpolated absolute discounting, backoff form)."""
    counts: list[Counter] = [Counter() for _ in range(order + 1)]
    for sentence in sentences:
        padded = ["<s>", *sentence, "</s>"]
        for n in range(1, order + 1):
            for i in range(len(padded) - n + 1):
                gram = tuple(padded[i : i + n])
                if n == 1 or gram[0] != "</s>":
                    counts[n][gram] += 1
    vocab = sorted(w for (w,) in counts[1] if w != "<s>")
    context_total: list[Counter] = [Counter() for _ in range(order + 1)]
    context_types: list[Counter] = [Counter() for _ in range(order + 1)]
    discount = [0.0] * (order + 1)
    for n in range(1, order + 1):
        for gram, c in counts[n].items():
            context_total[n][gram[:-1]] += c
            context_types[n][gram[:-1]] += 1
        n1 = sum(1 for c in counts[n].values() if c == 1)
        n2 = sum(1 for c in counts[n].values() if c == 2)
        discount[n] = min(0.9, max(0.1, n1 / (n1 + 2 * n2))) if n1 else 0.5
    prob: list[dict[tuple, float]] = [{} for _ in range(order + 1)]
    bow: list[dict[tuple, float]] = [{} for _ in range(order + 1)]
    total = sum(c for (w,), c in counts[1].items() if w != "<s>")
    gamma0 = discount[1] * len(vocab) / total
    for w in vocab:
        prob[1][(w,)] = max(counts[1][(w,)] - discount[1], 0) / total + gamma0 / len(vocab)
    for n in range(2, order + 1):
        for ctx, ctotal in context_total[n].items():
            bow[n - 1][ctx] = discount[n] * context_types[n][ctx] / ctotal
        for gram, c in counts[n].items():
            ctx = gram[:-1]
            lower = _backed_off(prob, bow, gram[1:])
            prob[n][gram] = (c - discount[n]) / context_total[n][ctx] + bow[n - 1][ctx] * lower
    lines = ["\\data\\"] + [f"ngram {n}={len(prob[n]) + (1 if n == 1 else 0)}" for n in range(1, order + 1)]
    for n in range(1, order + 1):
        lines += ["", f"\\{n}-grams:"]
        if n == 1:
            lines.append(f"-99.0000\t<s>\t{_log(bow[1].get(('<s>',), 1.0)):.4f}")
        for gram in sorted(prob[n]):
            line = f"{_log(prob[n][gram]):.4f}\t{' '.join(gram)}"
            if n < order:
                line += f"\t{_log(bow[n].get(gram, 1.0)):.4f}"
            lines.append(line)
    lines += ["", "\\end\\", ""]
    return "\n".join(lines)


def _backed_off(prob: list[dict], bow: list[dict], gram: tuple) -> float:
    """P(gram[-1] | gram[:-1]) under the lower orders already computed."""
    if len(gram) == 1:
        return prob[1][gram]
    if gram in prob[len(gram)]:
        return prob[len(gram)][gram]
    return bow[len(gram) - 1].get(gram[:-1], 1.0) * _backed_off(prob, bow, gram[1:])


def _log(p: float) -> float:
    return math.log10(p) if p > 0 else -99.0


def build(files: Iterable[Path], out_dir: Path, dictionary: Path) -> dict:
    """Write the LM, its dictionary and the list of source files to `out_dir`; returns a summary.

    Called by `voice_ingest` after ingestion (and by the recogniser when no model exists yet)."""
    known = load_dictionary(dictionary)
    sentences: list[list[str]] = []
    topics: list[str] = []
    sources: list[str] = []
    for path in sorted(set(files)):
        text = path.read_text(encoding="utf-8")
        if not is_english(text, path):
            continue
        sources.append(str(path))
        found, found_topics = knowledge_sentences(text)
        sentences += found
        topics += found_topics
    sentences += question_sentences(topics)
    runs = [run for sentence in sentences for run in split_known(sentence, known)]
    if not runs:
        raise ValueError("no English knowledge text to build a language model from")
    words = sorted({w for run in runs for w in run})
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / DICT_NAME, "".join(f"{line}\n" for w in words for line in known[w]))
    write_atomic(out_dir / LM_NAME, arpa(runs))
    write_atomic(out_dir / SOURCES_NAME, json.dumps(sources, indent=1))
    return {"files": len(sources), "sentences": len(runs), "words": len(words)}


def previous_sources(out_dir: Path) -> list[Path]:
    """The knowledge files the current model was built from (still existing), for incremental ingests."""
    try:
        return [p for p in map(Path, json.loads((out_dir / SOURCES_NAME).read_text())) if p.is_file()]
    except (OSError, ValueError, TypeError):
        return []


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` in one rename, so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the model from a worker running as another user
    os.replace(tmp, path)
