"""Backend-neutral pieces of scoring: top-k slices, token boundaries, batch plans, caching.

Both real backends and the dummy call these, so the numerics that decide a verdict
are written once.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from sway_common.types import TokenDist

# Below this the leftover mass is not worth reporting: it is under float32 resolution
# of the slice's own probabilities.
TAIL_FLOOR = 1e-30

T = TypeVar("T")


def text_hash(*parts: str) -> str:
    """Stable content hash (``hash()`` is salted per process, so never use it for keys)."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def token_dist_from_logprobs(row: NDArray[np.floating], top_k: int) -> TokenDist:
    """Top-k slice of one full-vocabulary log-softmax row, with its tail mass.

    ``row`` must be finite log-probabilities over the whole vocabulary.
    """
    row = np.asarray(row, dtype=np.float32)
    vocab = int(row.shape[-1])
    k = max(1, min(int(top_k), vocab))
    if k == vocab:
        ids = np.argsort(-row, kind="stable")
        return TokenDist(ids.astype(np.int64), row[ids], vocab, None)
    part = np.argpartition(-row, k - 1)[:k]
    ids = part[np.argsort(-row[part], kind="stable")]
    rest = np.ones(vocab, dtype=bool)
    rest[ids] = False
    tail_values = row[rest].astype(np.float64)
    top = float(tail_values.max())
    mass = float(np.exp(top) * np.sum(np.exp(tail_values - top))) if np.isfinite(top) else 0.0
    return TokenDist(ids.astype(np.int64), row[ids], vocab, _tail_state(mass))


def token_dists_from_top(
    ids: NDArray[np.integer],
    logprobs: NDArray[np.floating],
    tail_logmass: NDArray[np.floating],
    vocab: int,
) -> list[TokenDist]:
    """Token dists from a top-k taken where the logits are (on the GPU): ``ids`` and
    ``logprobs`` are ``(rows, k)``, most probable first; ``tail_logmass`` is the log of
    each row's mass outside its slice (-inf when none). Same states as
    :func:`token_dist_from_logprobs`, without the full rows ever leaving the device."""
    out = []
    for row_ids, row_lp, tail in zip(ids, logprobs, tail_logmass, strict=True):
        state = None if len(row_ids) == vocab else _tail_state(math.exp(float(tail)))
        out.append(TokenDist(row_ids.astype(np.int64), row_lp.astype(np.float32), vocab, state))
    return out


def _tail_state(mass: float) -> float | None:
    """``TokenDist.tail_logprob`` for a leftover ``mass``: 0.0 (exactly none), None (too
    small to report) or its log."""
    if mass == 0.0:
        return 0.0
    if mass < TAIL_FLOOR:
        return None
    return float(math.log(mass))


def completion_start(offsets: Sequence[tuple[int, int]], prompt_chars: int) -> int:
    """Index of the first token that belongs to the completion.

    ``offsets`` are the character spans of ``prompt + completion``'s tokens. A token
    belongs to the completion when it ends past the prompt's last character, so a
    token the tokenizer merged across the boundary is scored with the completion
    rather than dropped. Special tokens (span ``(0, 0)``) belong to the prompt.
    """
    for i, (start, end) in enumerate(offsets):
        if end > prompt_chars and end > start:
            return i
    return len(offsets)


def length_buckets(
    lengths: Sequence[int], batch_size: int, step_tokens: float | None = None
) -> list[list[int]]:
    """Group indices into batches of similar length (sorted, then cut).

    Sorting keeps padding small; the original order is restored by the caller through
    the returned indices. Without ``step_tokens`` the sorted indices are cut into full
    batches. With it, what one more forward costs in padded tokens, the cuts minimise
    ``forwards · step_tokens + padded tokens``: on a CPU, where a forward reads every
    weight once whatever its size, a prompt three times as long as the others gets a
    forward of its own instead of padding all of them.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    size = max(1, int(batch_size))
    if step_tokens is None:
        return [order[i : i + size] for i in range(0, len(order), size)]
    # best[end]: least cost of batching the `end` shortest; a batch's cost is the step
    # plus its rows times its longest (the last, as they are sorted).
    best = [0.0] + [math.inf] * len(order)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        longest = lengths[order[end - 1]]
        for start in range(max(0, end - size), end):
            cost = best[start] + step_tokens + (end - start) * longest
            if cost < best[end]:
                best[end], cut[end] = cost, start
    buckets, end = [], len(order)
    while end > 0:
        buckets.append(order[cut[end] : end])
        end = cut[end]
    return buckets[::-1]


@dataclass(frozen=True, slots=True)
class Window:
    """One forward over ``ids[start:end]`` whose last ``end - score_from`` targets are kept."""

    start: int
    end: int
    score_from: int


def rolling_windows(n_tokens: int, max_len: int, stride: int | None = None) -> list[Window]:
    """Plan strided windows so every token after the first is scored exactly once.

    Each window holds at most ``max_len`` tokens; after the first, a window keeps
    ``max_len - stride`` tokens of context and scores only the tokens no earlier
    window scored.
    """
    if n_tokens < 2:
        return []
    max_len = max(2, int(max_len))
    stride = max(1, min(int(stride or max_len // 2), max_len - 1))
    windows = [Window(0, min(n_tokens, max_len), 1)]
    while windows[-1].end < n_tokens:
        end = min(n_tokens, windows[-1].end + stride)
        windows.append(Window(max(0, end - max_len), end, windows[-1].end))
    return windows


class ResultCache:
    """Bounded LRU of scoring results keyed by (view key, op, text hash, top_k)."""

    def __init__(self, max_entries: int = 50_000) -> None:
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._max = max_entries
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        value = self._data.get(key)
        if value is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: Hashable, value: Any) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


def filled(values: list[T | None]) -> list[T]:
    """``values`` with every slot filled: a hole left by a scoring loop is a bug, not input."""
    out = [v for v in values if v is not None]
    if len(out) != len(values):
        raise RuntimeError("a scoring result went missing")
    return out
