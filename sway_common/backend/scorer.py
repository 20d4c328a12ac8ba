"""Scoring in one view, and the handle a probe scores through.

``with backend.as_finetuned() as view`` yields a :class:`BackendView`: a
:class:`~sway_common.protocols.ScoringModel` bound to one :class:`ViewSpec`. Each of
its calls lands in :class:`Scorer`, which checks the view is still open, looks every
text up in the result cache (keyed by the view's key, the op, the text's hash and
top-k), and runs only the misses through the runtime's forward hooks, in
length-bucketed padded batches. Token boundaries (where a completion starts), tail
mass and window plans come from :mod:`~sway_common.backend.scoring`, written once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

from sway_common.backend.generation import generate_texts
from sway_common.backend.runtime import Runtime
from sway_common.backend.scoring import (
    ResultCache,
    completion_start,
    filled,
    length_buckets,
    rolling_windows,
    text_hash,
)
from sway_common.backend.switch import ViewSwitch
from sway_common.backend.views import Encoding, ViewSpec
from sway_common.types import RollingLogprob, TokenDist

# Texts whose token ids are kept: enough for any suite's prompts, bounded for a long watch.
ENCODINGS_KEPT = 4096
T = TypeVar("T")


class Scorer:
    """The cached, batched scoring and generation ops of the open view."""

    def __init__(self, runtime: Runtime, switch: ViewSwitch) -> None:
        self.runtime = runtime
        self.switch = switch
        self.cache = ResultCache()
        self._encodings: OrderedDict[str, Encoding] = OrderedDict()

    def encoded(self, text: str) -> Encoding:
        """``runtime.encode(text)``, once per backend: base, ft, λ and every null view score
        the same texts, and on a GPU tokenizing a batch again per view took longer than
        the small model's forward."""
        hit = self._encodings.get(text)
        if hit is None:
            hit = self._encodings[text] = self.runtime.encode(text)
            if len(self._encodings) > ENCODINGS_KEPT:
                self._encodings.popitem(last=False)
        else:
            self._encodings.move_to_end(text)
        return hit

    def encoded_ids(self, text: str) -> list[int]:
        """Token ids of a text that must have some (a prompt to predict from)."""
        ids = self.encoded(text)[0]
        if not ids:
            raise ValueError(f"text {text[:40]!r} encodes to no tokens; give a non-empty prompt")
        return ids

    def buckets(self, lengths: Sequence[int], rows: int | None = None) -> list[list[int]]:
        """Indices of ``lengths`` in padded batches of at most ``rows`` (the batch size)."""
        return length_buckets(lengths, rows or self.runtime.batch_size, self.runtime.step_tokens)

    def clear(self) -> None:
        self.cache.clear()
        self._encodings.clear()

    def _cached_rows(
        self,
        keys: Sequence[Hashable],
        texts: Sequence[str],
        compute: Callable[[list[list[int]]], Sequence[T]],
        max_tokens: int | None = None,
    ) -> list[T]:
        """Per text, its cached row under its key, else ``compute`` of its token ids (the
        first ``max_tokens``) in length-bucketed batches, cached."""
        out: list[T | None] = [self.cache.get(key) for key in keys]
        todo = [i for i, hit in enumerate(out) if hit is None]
        encoded = [self.encoded_ids(texts[i])[:max_tokens] for i in todo]
        for bucket in self.buckets([len(e) for e in encoded]):
            rows = compute([encoded[j] for j in bucket])
            for j, row in zip(bucket, rows, strict=True):
                out[todo[j]] = row
                self.cache.put(keys[todo[j]], row)
        return filled(out)

    # ----------------------------------------------------------------- ops
    def next_token_dists(
        self, view: ViewSpec, prompts: Sequence[str], top_k: int
    ) -> list[TokenDist]:
        self.switch.check_open(view)
        vkey = view.key(self.runtime.adapter_hash)
        keys = [(vkey, "next", text_hash(prompt), top_k) for prompt in prompts]
        return self._cached_rows(keys, prompts, lambda ids: self.runtime.last_dists(ids, top_k))

    def logprobs_of(
        self, view: ViewSpec, prompts: Sequence[str], completions: Sequence[str]
    ) -> list[float]:
        self.switch.check_open(view)
        vkey = view.key(self.runtime.adapter_hash)
        out: list[float | None] = []
        todo: list[tuple[int, list[int], int]] = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            hit = self.cache.get((vkey, "logprob_of", text_hash(prompt, completion), 0))
            out.append(hit)
            if hit is not None:
                continue
            ids, offsets = self.encoded(prompt + completion)
            # The first token has no context to be scored against.
            start = max(1, completion_start(offsets, len(prompt)))
            if start >= len(ids):
                out[i] = 0.0
                continue
            todo.append((i, ids, start))
        for bucket in self.buckets([len(t[1]) for t in todo]):
            rows = self.runtime.token_logprobs([todo[j][1] for j in bucket])
            for j, row in zip(bucket, rows, strict=True):
                i, _, start = todo[j]
                value = float(np.sum(row[start - 1 :], dtype=np.float64))
                out[i] = value
                self.cache.put(
                    (vkey, "logprob_of", text_hash(prompts[i], completions[i]), 0), value
                )
        return filled(out)

    def position_dists(
        self, view: ViewSpec, texts: Sequence[str], top_k: int
    ) -> list[list[TokenDist]]:
        """Per text, the top-k slice at every position that predicts one of its tokens
        (the first ``max_context`` tokens: a longer text is cut, not windowed)."""
        self.switch.check_open(view)
        vkey = view.key(self.runtime.adapter_hash)
        keys = [(vkey, "positions", text_hash(t), top_k) for t in texts]
        return self._cached_rows(
            keys,
            texts,
            lambda ids: self.runtime.position_dists(ids, top_k),
            max_tokens=self.runtime.max_context,
        )

    def rollings(self, view: ViewSpec, texts: Sequence[str]) -> list[RollingLogprob]:
        """Per-token log-probabilities of whole texts: all their windows share padded batches."""
        self.switch.check_open(view)
        vkey = view.key(self.runtime.adapter_hash)
        out = [self.cache.get((vkey, "rolling", text_hash(t), 0)) for t in texts]
        ids = {i: self.encoded(texts[i])[0] for i, hit in enumerate(out) if hit is None}
        context = self.runtime.max_context
        jobs = [(i, w) for i, row in ids.items() for w in rolling_windows(len(row), context)]
        pieces: dict[int, list[tuple[int, NDArray[np.float32]]]] = {i: [] for i in ids}
        for bucket in self.buckets([w.end - w.start for _, w in jobs]):
            rows = self.runtime.token_logprobs(
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
            self.cache.put((vkey, "rolling", text_hash(texts[i]), 0), out[i])
        return filled(out)

    def generate(
        self,
        view: ViewSpec,
        prompts: Sequence[str],
        max_new_tokens: int,
        temperature: float,
        seed: int,
        chat: bool,
    ) -> list[str]:
        """Continuations of ``prompts`` in ``view``, in length-bucketed batches."""
        self.switch.check_open(view)
        return generate_texts(self.runtime, prompts, max_new_tokens, temperature, seed, chat)

    def mean_hidden(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """One row per text, in the base view (which the caller has opened)."""
        context = self.runtime.max_context
        encoded = [self.encoded_ids(t)[-context:] for t in texts]
        rows: list[NDArray[np.float32]] = [np.zeros(0, np.float32)] * len(texts)
        for bucket in self.buckets([len(e) for e in encoded]):
            vectors = self.runtime.mean_hidden([encoded[j] for j in bucket])
            for j, vector in zip(bucket, vectors, strict=True):
                rows[j] = np.asarray(vector, dtype=np.float32)
        return np.stack(rows)


class BackendView:
    """What ``with backend.as_*()`` yields: a :class:`ScoringModel` bound to one view."""

    def __init__(self, scorer: Scorer, spec: ViewSpec) -> None:
        self.scorer = scorer
        self.spec = spec

    def next_token_dist(self, prompt: str, *, top_k: int = 256) -> TokenDist:
        return self.scorer.next_token_dists(self.spec, [prompt], top_k)[0]

    def next_token_dist_batch(self, prompts: Sequence[str], *, top_k: int = 256) -> list[TokenDist]:
        return self.scorer.next_token_dists(self.spec, list(prompts), top_k)

    def logprob_of(self, prompt: str, completion: str) -> float:
        return self.scorer.logprobs_of(self.spec, [prompt], [completion])[0]

    def logprob_of_batch(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return self.scorer.logprobs_of(self.spec, list(prompts), list(completions))

    def rolling_logprob(self, text: str) -> RollingLogprob:
        return self.scorer.rollings(self.spec, [text])[0]

    def rolling_logprob_batch(self, texts: Sequence[str]) -> list[RollingLogprob]:
        return self.scorer.rollings(self.spec, list(texts))

    def position_dist_batch(
        self, texts: Sequence[str], *, top_k: int = 256
    ) -> list[list[TokenDist]]:
        """Per text, the distribution at each position that predicts one of its tokens
        (``len(ids) - 1`` top-k slices: position ``t`` predicts token ``t + 1``)."""
        return self.scorer.position_dists(self.spec, list(texts), top_k)

    def generate(
        self, prompt: str, *, max_new_tokens: int, temperature: float = 0.0, seed: int = 0
    ) -> str:
        # One row of the batched path, so generate and generate_batch agree exactly.
        return self.scorer.generate(self.spec, [prompt], max_new_tokens, temperature, seed, False)[
            0
        ]

    def generate_batch(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        chat: bool = False,
    ) -> list[str]:
        return self.scorer.generate(self.spec, prompts, max_new_tokens, temperature, seed, chat)

    def close(self) -> None:
        """A view does not own the model; closing the backend releases it."""
