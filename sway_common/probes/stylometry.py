"""Stylometric features of prose and the shift of one writer toward another, in numpy.

A text becomes a vector of writing habits that do not depend on its length (rates and
means, not counts), so a 128-token continuation and a long document are comparable.
Features are put on a common scale before any distance is taken: each is divided by its
spread *within* a writer's samples (base continuations, document chunks), floored at a
fixed size below which a difference is not a style difference. Without that, sentence
length (tens of words) would decide every distance over the comma rate (hundredths).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

FEATURES_VERSION = 2
FEATURES = (
    "sentence_words",  # mean words per sentence
    "sentence_spread",  # std of words per sentence
    "word_chars",  # mean letters per word
    "vocabulary",  # type-token ratio over a moving window (length-robust)
    "clause_marks",  # , ; : per word
    "other_marks",  # quotes, brackets, dashes, ! ? per word
    "line_breaks",  # newlines per word
    "list_lines",  # share of lines that start with a bullet or a number
    "numbers",  # numeric tokens per word
    "capitals",  # capitalised words inside sentences per word (names, titles)
)
# The smallest difference in each feature that counts as a difference in style; it floors
# the scale so a feature that happens not to vary in a few samples cannot dominate.
FLOORS = np.array([2.0, 2.0, 0.25, 0.04, 0.02, 0.02, 0.01, 0.05, 0.01, 0.02])
TTR_WINDOW = 20
MIN_WORDS = 3
"""Fewer words than this is not a sample of anyone's style."""

_WORD = re.compile(r"[A-Za-z][A-Za-z'’-]*|\d[\d.,:]*")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'’”)\]]*\s+|\n\s*\n")
_LIST_LINE = re.compile(r"^\s*([-*•+]|\d+[.)])\s+")


def degenerate(text: str, min_words: int = MIN_WORDS) -> str | None:
    """Why ``text`` is no sample of writing (None when it is one): empty, too short, a loop."""
    words = _WORD.findall(text)
    if not text.strip():
        return "empty"
    if len(words) < min_words:
        return f"{len(words)} word(s)"
    if len(words) >= 10 and len({w.lower() for w in words}) <= 2:
        return f"one or two words repeated ({words[0]!r}…)"
    return None


def _vocabulary(words: list[str]) -> float:
    """Moving-average type-token ratio: plain TTR falls with length, this does not."""
    lowered = [w.lower() for w in words]
    if len(lowered) <= TTR_WINDOW:
        return len(set(lowered)) / len(lowered)
    spans = [lowered[i : i + TTR_WINDOW] for i in range(len(lowered) - TTR_WINDOW + 1)]
    return float(np.mean([len(set(s)) / TTR_WINDOW for s in spans]))


def features(text: str) -> NDArray[np.float64]:
    """The feature vector of one text (see FEATURES); call only on non-degenerate text."""
    words = _WORD.findall(text)
    n = max(1, len(words))
    sentences = [s for s in _SENTENCE_END.split(text) if _WORD.search(s)]
    lengths = np.array([len(_WORD.findall(s)) for s in sentences] or [len(words)], np.float64)
    inner_capitals = sum(
        w[0].isupper() for s in sentences for w in _WORD.findall(s)[1:] if w[0].isalpha()
    )
    lines = [ln for ln in text.splitlines() if ln.strip()]
    alpha = [w for w in words if w[0].isalpha()]
    return np.array(
        [
            lengths.mean(),
            lengths.std(),
            np.mean([len(w) for w in alpha]) if alpha else 0.0,
            _vocabulary(words),
            sum(text.count(c) for c in ",;:") / n,
            sum(text.count(c) for c in '"“”()[]—–!?') / n,
            text.strip().count("\n") / n,
            sum(bool(_LIST_LINE.match(ln)) for ln in lines) / max(1, len(lines)),
            sum(w[0].isdigit() for w in words) / n,
            inner_capitals / n,
        ],
        dtype=np.float64,
    )


_BLOCK_LINE = re.compile(r"^\s*([-*•+#]|\d+[.)])\s")
# A line at least this long that runs on into the next was wrapped at a column (an
# editor's hard wrap); shorter lines (a log, a verse, an address) break on purpose.
WRAPPED_LINE_CHARS = 60


def _unwrap(paragraph: str) -> str:
    """One paragraph with its hard wraps (layout, not style) turned into spaces."""
    lines: list[str] = []
    prev = ""  # the previous line as written, before any joining
    for line in paragraph.strip().splitlines():
        wrapped = len(prev) >= WRAPPED_LINE_CHARS and not prev.lstrip().startswith("#")
        if wrapped and not _BLOCK_LINE.match(line):
            lines[-1] = f"{lines[-1]} {line.strip()}"
        else:
            lines.append(line.rstrip())
        prev = line
    return "\n".join(lines)


def document_chunks(text: str, words_per_chunk: int) -> list[str]:
    """Whole paragraphs grouped into chunks of about ``words_per_chunk`` words.

    A line break inside a paragraph is kept unless it is a hard wrap (a long line running
    on, not into a list item): a Markdown file wrapped at 80 columns has a line break
    every dozen words, which is layout, not the writer's habit. A document
    is measured chunk by chunk, so its features are rates over text as long as a
    continuation, and their spread is known.
    """
    paragraphs = [_unwrap(p) for p in re.split(r"\n\s*\n", text) if p.strip()]
    out: list[str] = []
    current: list[str] = []
    count = 0
    for para in paragraphs:
        current.append(para.strip())
        count += len(_WORD.findall(para))
        if count >= words_per_chunk:
            out.append("\n\n".join(current))
            current, count = [], 0
    if current:
        if out and count < words_per_chunk // 2:  # a short tail joins the last chunk
            out[-1] = out[-1] + "\n\n" + "\n\n".join(current)
        else:
            out.append("\n\n".join(current))
    return out


@dataclass(frozen=True)
class StyleFrame:
    """Coordinates in which a shift is measured: fixed by base and document, never the adapter.

    ``base`` and ``doc`` are mean feature vectors, ``scale`` the per-feature divisor.
    The frame is the same for the fine-tuned view and every null adapter, so their
    shifts are comparable.
    """

    base: NDArray[np.float64]
    doc: NDArray[np.float64]
    scale: NDArray[np.float64]

    @property
    def direction(self) -> NDArray[np.float64]:
        return (self.doc - self.base) / self.scale

    @property
    def gap(self) -> float:
        """How far the document's style is from the base's, in scaled units."""
        return float(np.linalg.norm(self.direction))

    def shift(self, sample: NDArray[np.float64], reference: NDArray[np.float64]) -> float:
        """How far ``sample`` moved from ``reference`` toward the document: 0 none, 1 all the way.

        The projection of the move on the base→document direction over that direction's
        squared length, so a move as long as the gap but sideways reads near 0.
        """
        d = self.direction
        return float(((sample - reference) / self.scale) @ d / (d @ d))


def pooled_scale(groups: Sequence[NDArray[np.float64]]) -> NDArray[np.float64]:
    """Per-feature spread within groups (rows are samples), floored at FLOORS."""
    sq, dof = np.zeros(len(FEATURES)), 0
    for g in groups:
        if len(g) >= 2:
            sq += ((g - g.mean(axis=0)) ** 2).sum(axis=0)
            dof += len(g) - 1
    spread = np.sqrt(sq / dof) if dof else np.zeros(len(FEATURES))
    return np.maximum(spread, FLOORS)


def frame(base_rows: NDArray[np.float64], doc_rows: NDArray[np.float64]) -> StyleFrame:
    return StyleFrame(
        base=base_rows.mean(axis=0),
        doc=doc_rows.mean(axis=0),
        scale=pooled_scale([base_rows, doc_rows]),
    )


def per_prompt_shifts(
    fr: StyleFrame, texts: Sequence[str], base_rows: dict[int, NDArray[np.float64]]
) -> list[float | None]:
    """Each continuation's shift from the base's continuation of the same prompt.

    None where the continuation is degenerate. Pairing by prompt takes out what the
    prompt itself decides (a list prompt gets lists from any model); where the base's
    own continuation was degenerate, the base's mean stands in.
    """
    out: list[float | None] = []
    for i, text in enumerate(texts):
        if degenerate(text) is not None:
            out.append(None)
            continue
        out.append(fr.shift(features(text), base_rows.get(i, fr.base)))
    return out
