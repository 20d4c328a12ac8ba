"""Text the likelihood probes read: the built-in packs, user files, chunks and sections.

The built-in data under ``data/`` was written for sway-mlx: ``knowledge.jsonl`` holds
general-knowledge items (a prompt, its gold answer, a topic) and ``prose.txt`` held-out
passages of plain general prose, one paragraph each. Neither mentions the demo document,
so an adapter trained on it has no reason to move them except by side effect.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard, TypeVar

DATA_DIR = Path(__file__).resolve().parent / "data"
BUILTIN = "builtin"
NONE = "none"
T = TypeVar("T")


@dataclass(frozen=True)
class Item:
    """A prompt and the answer a model that knows the fact should continue it with."""

    prompt: str
    gold: str
    topic: str = ""


def read_text(path: str | Path) -> str:
    """A user's text file, with one clear message for a missing or non-UTF-8 file."""
    p = Path(path).expanduser()
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ValueError(f"{p}: cannot read the file: {e.strerror or e}") from None


def is_named_file(value: str | None) -> TypeGuard[str]:
    """True for a value that should name a local file (not the built-in pack or 'none')."""
    return bool(value) and value not in (BUILTIN, NONE)


def load_items(pack: str) -> list[Item]:
    """``builtin``, ``none`` (no items) or a local JSONL file of {"prompt", "gold"} objects."""
    if pack == NONE:
        return []
    path = DATA_DIR / "knowledge.jsonl" if pack == BUILTIN else Path(pack).expanduser()
    items = []
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            items.append(Item(str(row["prompt"]), str(row["gold"]), str(row.get("topic", ""))))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(
                f"{path}:{n}: expected a JSON object with 'prompt' and 'gold'"
            ) from None
    return items


def spread(values: Sequence[T], limit: int | None) -> list[T]:
    """At most ``limit`` values, evenly spaced over the sequence.

    Packs are grouped by topic, so the first N items would all be geography.
    """
    if limit is None or limit >= len(values):
        return list(values)
    if limit <= 0:
        return []
    step = len(values) / limit
    return [values[int(i * step)] for i in range(limit)]


def load_corpus(corpus: str) -> str:
    return read_text(DATA_DIR / "prose.txt" if corpus == BUILTIN else corpus)


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, each with its whitespace collapsed."""
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def _cut(text: str, size: int) -> list[str]:
    """Pieces of at most ``size`` characters, cut at whitespace where there is any."""
    pieces = []
    while len(text) > size:
        cut = text.rfind(" ", 0, size + 1)
        cut = cut if cut > 0 else size
        pieces.append(text[:cut].strip())
        text = text[cut:].strip()
    return [*pieces, text] if text else pieces


def chunks(text: str, chunk_chars: int) -> list[str]:
    """Paragraphs as chunks of at most ``chunk_chars``: long ones are cut, short ones joined.

    A chunk is closed once it holds a quarter of ``chunk_chars``, so a file of one-line
    paragraphs still gives chunks long enough for a stable per-token mean, while the
    built-in passages (about 1000 characters each) stay one passage per chunk.
    """
    out: list[str] = []
    current = ""
    for para in paragraphs(text):
        for piece in _cut(para, chunk_chars):
            if current and len(current) + 1 + len(piece) > chunk_chars:
                out.append(current)
                current = ""
            current = f"{current} {piece}".strip()
            if len(current) >= chunk_chars // 4:
                out.append(current)
                current = ""
    return [*out, current] if current else out


_ATX = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_SETEXT = re.compile(r"^\s{0,3}(=+|-+)\s*$")


def sections(text: str) -> list[tuple[str, str]]:
    """(title, body) pairs of a Markdown or plain-text document, split at its headings.

    ATX (``# Title``) and setext (a line underlined with ``===`` or ``---``) headings
    both count. Text before the first heading is a section titled "preamble". A document
    with fewer than two headed sections (none, or only a title) gives one section per
    paragraph, titled by its opening words.
    """
    lines = text.splitlines()
    found: list[tuple[str, list[str]]] = [("preamble", [])]
    i = 0
    while i < len(lines):
        line = lines[i]
        atx = _ATX.match(line)
        setext = i + 1 < len(lines) and line.strip() and _SETEXT.match(lines[i + 1])
        if atx:
            found.append((atx.group(1), []))
        elif setext:
            found.append((line.strip(), []))
            i += 1
        else:
            found[-1][1].append(line)
        i += 1
    titled = [(title, " ".join(" ".join(body).split())) for title, body in found]
    titled = [(t, b) for t, b in titled if b]
    if len(titled) < 2:  # no headings, or only a title: the paragraphs are the sections
        return [(_opening(p), p) for p in paragraphs(_without_headings(lines))]
    return titled


def _opening(paragraph: str, words: int = 6) -> str:
    return " ".join(paragraph.split()[:words])


def _without_headings(lines: list[str]) -> str:
    kept = [
        line
        for i, line in enumerate(lines)
        if not _ATX.match(line)
        and not _SETEXT.match(line)
        and not (i + 1 < len(lines) and line.strip() and _SETEXT.match(lines[i + 1]))
    ]
    return "\n".join(kept)
