"""Loading and chunking of knowledge files (.md/.txt) into `Document` chunks, shared by every backend."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from .base import Document, Retriever

SUFFIXES = (".md", ".markdown", ".txt")
BUNDLED_KNOWLEDGE_DIR = Path(__file__).resolve().parent.parent / "knowledge"

# Chunks sized for a voice prompt: large enough to hold a table or a rule with its context, small
# enough that three of them stay well under the model's instruction budget.
TARGET_CHARS = 650
MAX_CHARS = 800
OVERLAP_CHARS = 120

_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*\n", re.DOTALL)
_META_LINE = re.compile(r"^(title|source|lang|tags)\s*:\s*(.+?)\s*$", re.IGNORECASE)
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")


@dataclass(frozen=True)
class ParsedFile:
    """A knowledge file split into its metadata and Markdown body."""

    title: str
    source: str
    body: str


def iter_files(path: Path) -> list[Path]:
    """Return the knowledge files at `path` (one file, or a directory searched recursively), sorted."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


def source_key(path: Path) -> str:
    """Return the stable identity of a file: project-relative when possible, so ids survive moves."""
    resolved = path.resolve()
    try:
        return resolved.relative_to(Path(settings.BASE_DIR).resolve()).as_posix()
    except ValueError:
        return resolved.as_posix()


def chunk_id(key: str, index: int) -> str:
    """Return the stable id of chunk `index` of the file identified by `key`."""
    return hashlib.sha256(f"{key}#{index}".encode()).hexdigest()[:32]


def parse_file(text: str, fallback_title: str) -> ParsedFile:
    """Split YAML-ish front matter (or a leading `# Title` plus `source:` line) from the body."""
    meta: dict[str, str] = {}
    match = _FRONT_MATTER.match(text)
    if match:
        for line in match.group(1).splitlines():
            meta_match = _META_LINE.match(line.strip())
            if meta_match:
                meta[meta_match.group(1).lower()] = meta_match.group(2).strip().strip("\"'")
        text = text[match.end() :]
    body_lines: list[str] = []
    for line in text.splitlines():
        heading = _HEADING.match(line)
        if "title" not in meta and heading and heading.group(1) == "#":
            meta["title"] = heading.group(2)
            continue
        meta_match = _META_LINE.match(line.strip())
        # Metadata lines only count before the body starts (a "Source:" sentence later is content).
        if meta_match and not any(b.strip() for b in body_lines):
            meta.setdefault(meta_match.group(1).lower(), meta_match.group(2).strip())
            continue
        body_lines.append(line)
    title = meta.get("title") or fallback_title
    return ParsedFile(title=title, source=meta.get("source", ""), body="\n".join(body_lines).strip())


def _blocks(body: str) -> list[str]:
    """Return paragraphs/headings/tables as blocks; heading markers become plain "Heading:" lines."""
    blocks: list[str] = []
    for raw in re.split(r"\n\s*\n", body):
        lines = [ln.rstrip() for ln in raw.strip().splitlines() if ln.strip()]
        if not lines:
            continue
        out = []
        for line in lines:
            heading = _HEADING.match(line)
            out.append(f"{heading.group(2)}:" if heading else line)
        blocks.append("\n".join(out))
    return blocks


def _split_long(block: str, limit: int) -> list[str]:
    """Split an oversized block at sentence (then word) boundaries into pieces of <= limit chars."""
    pieces: list[str] = []
    current = ""
    for sentence in _SENTENCE_END.split(block):
        while len(sentence) > limit:  # a single monster sentence: cut at the last space
            cut = sentence.rfind(" ", 0, limit)
            cut = cut if cut > 0 else limit
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if current and len(current) + 1 + len(sentence) > limit:
            pieces.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}".strip()
    if current:
        pieces.append(current)
    return pieces


def _overlap_tail(text: str) -> str:
    """Return the last sentence(s) of `text` (<= OVERLAP_CHARS), so a fact cut at a boundary survives."""
    tail = text[-OVERLAP_CHARS:]
    sentence = _SENTENCE_END.search(tail)
    if sentence:
        return tail[sentence.end() :].strip()
    space = tail.find(" ")
    return tail[space + 1 :].strip() if space >= 0 else ""


def chunk_text(body: str) -> list[str]:
    """Pack paragraphs into ~TARGET_CHARS chunks (never above MAX_CHARS) with a small overlap."""
    chunks: list[str] = []
    current = ""
    for block in _blocks(body):
        pieces = _split_long(block, MAX_CHARS - OVERLAP_CHARS) if len(block) > MAX_CHARS else [block]
        for piece in pieces:
            starts_section = piece.endswith(":") and "\n" not in piece
            full = len(current) + 2 + len(piece) > MAX_CHARS
            # Close the chunk when it would overflow, or at a heading once it is reasonably filled.
            if current and (full or (starts_section and len(current) >= TARGET_CHARS // 2)):
                chunks.append(current)
                tail = "" if starts_section else _overlap_tail(current)
                current = f"{tail}\n\n{piece}".strip() if tail else piece
            else:
                current = f"{current}\n\n{piece}".strip() if current else piece
    if current:
        chunks.append(current)
    return chunks


def load_file(path: Path) -> list[Document]:
    """Read one knowledge file and return its chunks with stable ids."""
    parsed = parse_file(path.read_text(encoding="utf-8"), fallback_title=path.stem.replace("-", " "))
    key = source_key(path)
    source = parsed.source or key
    return [
        Document(id=chunk_id(key, i), path=key, chunk=i, title=parsed.title, text=text, source=source)
        for i, text in enumerate(chunk_text(parsed.body))
    ]


async def ingest_files(
    retriever: Retriever,
    files: list[Path],
    progress: Callable[[int, int, Path], None] | None = None,
) -> int:
    """Upsert every file's chunks, one file at a time (so progress is visible); returns chunks written."""
    written = 0
    for index, path in enumerate(files, start=1):
        written += await retriever.upsert(load_file(path))
        if progress is not None:
            progress(index, len(files), path)
    return written
