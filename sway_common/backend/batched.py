"""Scoring in one view: real padded batches, bucketed by length, behind the result cache.

Every op a probe calls on a view lands here with the view's spec, checks the view is
still open, looks each text up in the result cache (keyed by the view's key, the op,
the text's hash and top-k), and runs only the misses through the backend's hooks in
length-bucketed batches. Token boundaries (where a completion starts), tail mass and
window plans come from :mod:`~sway_common.backend.scoring`, so they are written once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from sway_common.backend.dispatch import ViewDispatch
from sway_common.backend.scoring import (
    completion_start,
    length_buckets,
    rolling_windows,
    text_hash,
)
from sway_common.backend.views import Encoding, ViewSpec
from sway_common.types import RollingLogprob, TokenDist

# Texts whose token ids are kept: enough for any suite's prompts, bounded for a long watch.
ENCODINGS_KEPT = 4096


class BatchedScoring(ViewDispatch):
    """The cached, batched scoring ops of one view at a time."""

    def _encoded(self, text: str) -> Encoding:
        """``_encode(text)``, tokenized once per backend: base, ft, λ and every null view
        score the same texts, and on a GPU tokenizing a batch again per view took longer
        than the small model's forward."""
        hit = self._encodings.get(text)
        if hit is None:
            hit = self._encodings[text] = self._encode(text)
            if len(self._encodings) > ENCODINGS_KEPT:
                self._encodings.popitem(last=False)
        else:
            self._encodings.move_to_end(text)
        return hit

    def token_count(self, text: str) -> int:
        """How many tokens ``text`` is, counted as every scoring call counts them."""
        return len(self._encoded(text)[0])

    @property
    def prompt_limit(self) -> int | None:
        """The most tokens a prompt may have: the context window (None: no limit)."""
        return self.max_context

    def _encode_nonempty(self, text: str) -> Encoding:
        ids, offsets = self._encoded(text)
        if not ids:
            raise ValueError(f"text {text[:40]!r} encodes to no tokens; give a non-empty prompt")
        return ids, offsets

    def next_token_dists(
        self, view: ViewSpec, prompts: Sequence[str], top_k: int
    ) -> list[TokenDist]:
        self._check_active(view)
        vkey = view.key(self.adapter_hash)
        out: list[TokenDist | None] = []
        todo: list[int] = []
        for i, prompt in enumerate(prompts):
            hit = self._cache.get((vkey, "next", text_hash(prompt), top_k))
            out.append(hit)
            if hit is None:
                todo.append(i)
        encoded = [self._encode_nonempty(prompts[i])[0] for i in todo]
        for bucket in length_buckets([len(e) for e in encoded], self.batch_size, self.step_tokens):
            dists = self._last_dists([encoded[j] for j in bucket], top_k)
            for j, dist in zip(bucket, dists, strict=True):
                i = todo[j]
                out[i] = dist
                self._cache.put((vkey, "next", text_hash(prompts[i]), top_k), dist)
        return out  # type: ignore[return-value]

    def logprobs_of(
        self, view: ViewSpec, prompts: Sequence[str], completions: Sequence[str]
    ) -> list[float]:
        self._check_active(view)
        vkey = view.key(self.adapter_hash)
        out: list[float | None] = []
        todo: list[tuple[int, list[int], int]] = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            hit = self._cache.get((vkey, "logprob_of", text_hash(prompt, completion), 0))
            out.append(hit)
            if hit is not None:
                continue
            ids, offsets = self._encoded(prompt + completion)
            # The first token has no context to be scored against.
            start = max(1, completion_start(offsets, len(prompt)))
            if start >= len(ids):
                out[i] = 0.0
                continue
            todo.append((i, ids, start))
        for bucket in length_buckets([len(t[1]) for t in todo], self.batch_size, self.step_tokens):
            rows = self._token_logprobs([todo[j][1] for j in bucket])
            for j, row in zip(bucket, rows, strict=True):
                i, _, start = todo[j]
                value = float(np.sum(row[start - 1 :], dtype=np.float64))
                out[i] = value
                self._cache.put(
                    (vkey, "logprob_of", text_hash(prompts[i], completions[i]), 0), value
                )
        return out  # type: ignore[return-value]

    def rolling(self, view: ViewSpec, text: str) -> RollingLogprob:
        return self.rollings(view, [text])[0]

    def rollings(self, view: ViewSpec, texts: Sequence[str]) -> list[RollingLogprob]:
        """:meth:`rolling` for many texts at once: all their windows share padded batches."""
        self._check_active(view)
        vkey = view.key(self.adapter_hash)
        out = [self._cache.get((vkey, "rolling", text_hash(t), 0)) for t in texts]
        ids = {i: self._encoded(texts[i])[0] for i, hit in enumerate(out) if hit is None}
        jobs = [
            (i, w) for i, row in ids.items() for w in rolling_windows(len(row), self.max_context)
        ]
        pieces: dict[int, list[tuple[int, NDArray[np.float32]]]] = {i: [] for i in ids}
        for bucket in length_buckets(
            [w.end - w.start for _, w in jobs], self.batch_size, self.step_tokens
        ):
            rows = self._token_logprobs(
                [ids[jobs[j][0]][jobs[j][1].start : jobs[j][1].end] for j in bucket]
            )
            for j, row in zip(bucket, rows, strict=True):
                i, w = jobs[j]
                pieces[i].append((w.start, row[w.score_from - w.start - 1 : w.end - w.start - 1]))
        for i, row_ids in ids.items():
            parts = [piece for _, piece in sorted(pieces[i], key=lambda t: t[0])]
            logprobs = (
                np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
            )
            out[i] = RollingLogprob(np.asarray(row_ids, dtype=np.int64), logprobs)
            self._cache.put((vkey, "rolling", text_hash(texts[i]), 0), out[i])
        return out  # type: ignore[return-value]

    def mean_hidden_states(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """One row per text: the base model's last hidden states averaged over its tokens.

        Always in the base view, so a topic map of prompts cannot move with the adapter
        under test. A text longer than the context keeps its last ``max_context`` tokens.
        """
        encoded = [self._encode_nonempty(t)[0][-self.max_context :] for t in texts]
        rows: list[NDArray[np.float32]] = [np.zeros(0, np.float32)] * len(texts)
        with self.as_base():
            for bucket in length_buckets(
                [len(e) for e in encoded], self.batch_size, self.step_tokens
            ):
                vectors = self._mean_hidden([encoded[j] for j in bucket])
                for j, vector in zip(bucket, vectors, strict=True):
                    rows[j] = np.asarray(vector, dtype=np.float32)
        return np.stack(rows)
