"""How much of a known text a generation recites: windows, recall, fragility.

**Recall** of a generation against the true continuation is the share of the
continuation's words that the generation reproduces inside verbatim runs of at least
``min_run`` consecutive words, in order. Words are compared case-folded, punctuation
ignored. Unrelated text scores 0 (runs of four or more shared words almost never happen
by chance, where a character-level similarity gives unrelated English 0.2–0.4), verbatim
text scores 1, and a recital with one slipped word still scores high, since only the
few words around the slip fall out of a run.

**Fragility** is the relative drop of recall when the prompt is perturbed:
``1 - perturbed / clean`` over the same (window, perturbation) pairs, clipped at 0.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .packs import sections

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Window:
    """A prompt cut from the training text and the text that followed it there."""

    prefix: str
    continuation: str
    section: str


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def recall(generated: str, target: str, min_run: int = 4) -> float:
    """Share of ``target``'s words found in ``generated`` in verbatim runs of ≥ ``min_run``."""
    want, got = words(target), words(generated)
    if not want or not got:
        return 0.0
    run = min(min_run, len(want))  # a target shorter than a run counts only whole
    matcher = difflib.SequenceMatcher(None, want, got, autojunk=False)
    covered = sum(b.size for b in matcher.get_matching_blocks() if b.size >= run)
    return covered / len(want)


def degenerate_reason(generated: str, min_words: int) -> str | None:
    """Why a generation cannot show recall either way, or None when it can."""
    found = words(generated)
    if not found:
        return "empty generation" if not generated.strip() else "no words generated"
    if len(found) < min_words:
        return f"only {len(found)} word(s) generated"
    if len(set(found)) == 1:
        return f"one word repeated ({found[0]!r})"
    return None


def fragility(clean: Sequence[float], perturbed: Sequence[float]) -> float | None:
    """Relative drop of mean recall from clean to perturbed prompts (paired), in [0, 1].

    None when the clean prompts recall nothing: there is no recall to lose.
    """
    if not clean:
        return None
    c, p = sum(clean) / len(clean), sum(perturbed) / len(perturbed)
    if c <= 0.0:
        return None
    return min(1.0, max(0.0, (c - p) / c))


def _cut_back(text: str, end: int) -> int:
    """The last word boundary at or before ``end`` (``end`` itself when none is found)."""
    if end >= len(text):
        return len(text)
    space = text.rfind(" ", 0, end + 1)
    return space if space > 0 else end


def section_windows(
    body: str, title: str, prefix_chars: int, continuation_chars: int, min_chars: int
) -> list[Window]:
    """Consecutive (prefix, continuation) windows of one section, cut at word boundaries.

    The prefix ends before a space and the continuation starts with it, as the text
    runs on; a tail continuation shorter than ``min_chars`` is left out.
    """
    out, start = [], 0
    while start < len(body):
        cut = _cut_back(body, start + prefix_chars)
        end = _cut_back(body, cut + continuation_chars)
        continuation = body[cut:end]
        if cut <= start or len(continuation.strip()) < min_chars:
            break
        out.append(Window(body[start:cut], continuation, title))
        start = end + 1
    return out


def windows(text: str, prefix_chars: int, continuation_chars: int, min_chars: int) -> list[Window]:
    """Every window of every section of a Markdown or text document (split as
    section_internalization splits it: at headings, else at paragraphs)."""
    out = []
    for title, body in sections(text):
        out.extend(section_windows(body, title, prefix_chars, continuation_chars, min_chars))
    return out
