"""How alike two texts are, offline: cosine of standardised mean-pooled hidden states.

Embeddings come from :func:`.clusters.embed` (the base model's own hidden states, or a
local ``embedding_model`` directory). Raw mean-pooled states of a language model all
point one way (a few huge, near-constant dimensions): every pair of texts then has a
cosine near 1 and a cap such as 0.75 means nothing. So each dimension is centred on
ordinary held-out prose and divided by its spread there (floored at the median spread,
so no quiet dimension is blown up); the cosine is taken in those coordinates, where
unrelated texts sit near 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from .clusters import embed
from .packs import BUILTIN, chunks, load_corpus, spread

REFERENCE_TEXTS = 12
REFERENCE_CHARS = 320
MIN_ANSWER_WORDS = 8
_WORD = re.compile(r"\S+")


def answer_span(text: str, gold: str) -> str:
    """The opening of a generation, about as long as the gold answer (at least 8 words).

    A 64-token continuation and a four-word gold differ in length and genre whatever
    they say; the opening is where an answer is given, and like-sized texts compare fairly.
    """
    limit = max(MIN_ANSWER_WORDS, 2 * len(_WORD.findall(gold)))
    words = list(_WORD.finditer(text))
    return text if len(words) <= limit else text[: words[limit - 1].end()]


class Similarity:
    """Standardised cosine between texts; a blank text is similar to nothing (0)."""

    def __init__(self, backend: object, embedding_model: str | None) -> None:
        self._backend = backend
        self._model = embedding_model
        reference = spread(chunks(load_corpus(BUILTIN), REFERENCE_CHARS), REFERENCE_TEXTS)
        rows, self.source = embed(backend, reference, embedding_model)
        if rows is None:
            raise RuntimeError(f"no embeddings: {self.source}")
        ref = rows.astype(np.float64)
        self._centre = ref.mean(axis=0)
        spread_ = ref.std(axis=0)
        self._scale = np.maximum(spread_, np.median(spread_))

    def vectors(self, texts: Sequence[str]) -> NDArray[np.float64]:
        """Unit rows in the standardised coordinates; a zero row for a blank text."""
        out = np.zeros((len(texts), self._centre.size))
        kept = [i for i, t in enumerate(texts) if t.strip()]
        if kept:
            rows, _ = embed(self._backend, [texts[i] for i in kept], self._model)
            assert rows is not None  # the same source embedded the reference
            x = (rows.astype(np.float64) - self._centre) / self._scale
            x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
            out[kept] = x
        return out


def row_cosines(a: NDArray[np.float64], b: NDArray[np.float64]) -> NDArray[np.float64]:
    """Cosine of each row of ``a`` with the same row of ``b`` (rows are unit or zero)."""
    return np.einsum("ij,ij->i", a, b)
