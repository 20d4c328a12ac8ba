"""KL and Jensen-Shannon divergence, on full arrays or on aligned top-k slices.

Everything is natural log (nats) and float64. JS is bounded by ln 2; a value above
that is a bug upstream, so it raises instead of being reported.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from sway_common.types import TokenDist

KL_EPS = 1e-12
"""Floor for ``q`` wherever ``p`` has mass, in :func:`kl`.

Without it a token the reference gives zero probability makes KL infinite. With it a
single token's surprise is capped near ``ln(1 / KL_EPS)`` ~ 27.6 nats: a gap that
large already says the adapter broke the model, and a finite number keeps reports,
JSON and statistics usable.
"""

LN2 = math.log(2.0)
_JS_SLACK = 1e-9


def _prepare(p: ArrayLike, q: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Validate two probability vectors and return them as float64, each summing to 1."""
    a = np.asarray(p, dtype=np.float64)
    b = np.asarray(q, dtype=np.float64)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError("divergence inputs must be 1-D arrays")
    if a.shape != b.shape:
        raise ValueError(f"divergence inputs differ in shape: {a.shape} vs {b.shape}")
    if a.size == 0:
        raise ValueError("divergence inputs are empty")
    out = []
    for name, v in (("p", a), ("q", b)):
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{name} has non-finite entries")
        if np.any(v < 0):
            raise ValueError(f"{name} has negative entries")
        total = float(v.sum())
        if total <= 0.0:
            raise ValueError(f"{name} has no mass")
        # float32 rows rarely sum to exactly 1; normalising keeps both sides comparable.
        out.append(v / total)
    return out[0], out[1]


def _kl_normalised(p: NDArray[np.float64], q: NDArray[np.float64]) -> float:
    support = p > 0
    if np.any(q[support] < KL_EPS):
        q = q.copy()
        q[support] = np.maximum(q[support], KL_EPS)
        q /= q.sum()
    ps = p[support]
    value = float(np.sum(ps * (np.log(ps) - np.log(q[support]))))
    # KL >= 0 exactly; a tiny negative is summation roundoff.
    return max(value, 0.0)


def kl(p: ArrayLike, q: ArrayLike) -> float:
    """KL(p || q) in nats.

    Both inputs are normalised to sum 1. Entries with ``p == 0`` contribute nothing.
    Where ``p > 0`` and ``q < KL_EPS``, ``q`` is raised to ``KL_EPS`` and renormalised,
    so the result is finite (see :data:`KL_EPS`).
    """
    a, b = _prepare(p, q)
    return _kl_normalised(a, b)


def _js_normalised(p: NDArray[np.float64], q: NDArray[np.float64]) -> float:
    m = 0.5 * (p + q)
    value = 0.0
    for v in (p, q):
        s = v > 0
        # m >= v/2 > 0 wherever v > 0, so no floor is needed here.
        value += 0.5 * float(np.sum(v[s] * (np.log(v[s]) - np.log(m[s]))))
    if value > LN2 + _JS_SLACK:
        raise RuntimeError(f"JS divergence {value!r} exceeds ln 2: inputs or arithmetic are broken")
    return min(max(value, 0.0), LN2)


def js(p: ArrayLike, q: ArrayLike) -> float:
    """Jensen-Shannon divergence in nats: symmetric, in ``[0, ln 2]``.

    Both inputs are normalised to sum 1 first.
    """
    a, b = _prepare(p, q)
    return _js_normalised(a, b)


def _check_dist(d: TokenDist, side: str) -> None:
    lp = np.asarray(d.logprobs, dtype=np.float64)
    if not np.all(np.isfinite(lp)):
        raise ValueError(f"{side} logprobs have non-finite entries")
    if np.any(lp > 1e-4):
        # A little above 0 is float32 rounding of a near-certain token; more is not a probability.
        raise ValueError(f"{side} logprobs above 0")
    ids = np.asarray(d.token_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= d.vocab_size):
        raise ValueError(f"{side} token ids outside [0, vocab_size)")
    if np.unique(ids).size != ids.size:
        raise ValueError(f"{side} token ids repeat")
    t = d.tail_logprob
    if t is not None and (not math.isfinite(t) or t > 0.0):
        raise ValueError(f"{side} tail_logprob {t!r} is not a finite log-mass <= 0")


def _tail_mass(d: TokenDist) -> float:
    # None and the 0.0 sentinel both mean "nothing to spread" (see TokenDist).
    if d.tail_logprob is None or d.tail_logprob == 0.0:
        return 0.0
    return math.exp(d.tail_logprob)


def _aligned(d: TokenDist, union: NDArray[np.int64], rest: int) -> NDArray[np.float64]:
    """``d`` over the union ids, plus a trailing rest bin when ``rest > 0``."""
    missing = d.vocab_size - d.k
    share = _tail_mass(d) / missing if missing > 0 else 0.0
    out = np.full(union.size + (1 if rest > 0 else 0), share, dtype=np.float64)
    if rest > 0:
        out[-1] = share * rest
    pos = np.searchsorted(union, np.asarray(d.token_ids, dtype=np.int64))
    out[pos] = np.exp(np.asarray(d.logprobs, dtype=np.float64))
    return out


def align(base: TokenDist, ft: TokenDist) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Put two top-k slices on one support: union ids (sorted), then one rest bin.

    Each side spreads its tail mass evenly over the ids its slice lacks. Ids of the
    union that a side lacks get one share each; every id outside the union goes to a
    single rest bin holding the remaining shares. Merging bins whose mass is uniform
    inside them leaves KL and JS unchanged, so this is exact for that tail model, and
    exact outright when both slices cover the vocabulary. The returned arrays are not
    yet normalised.
    """
    if base.vocab_size != ft.vocab_size:
        raise ValueError(f"vocab sizes differ: {base.vocab_size} vs {ft.vocab_size}")
    _check_dist(base, "base")
    _check_dist(ft, "ft")
    union = np.union1d(
        np.asarray(base.token_ids, dtype=np.int64), np.asarray(ft.token_ids, dtype=np.int64)
    )
    rest = base.vocab_size - union.size
    return _aligned(base, union, rest), _aligned(ft, union, rest)


def align_many(*dists: TokenDist) -> list[NDArray[np.float64]]:
    """:func:`align` for any number of slices: the union of their ids, then one rest bin.

    Each returned array is normalised. Merging bins whose mass is uniform inside them
    leaves JS, KL and the Hellinger distance unchanged, so vectors on this support (such
    as square-root probabilities) measure what the whole vocabulary would.
    """
    if not dists:
        raise ValueError("align_many needs at least one distribution")
    vocab = dists[0].vocab_size
    for i, d in enumerate(dists):
        if d.vocab_size != vocab:
            raise ValueError(f"vocab sizes differ: {vocab} vs {d.vocab_size}")
        _check_dist(d, f"distribution {i}")
    union = np.unique(np.concatenate([np.asarray(d.token_ids, dtype=np.int64) for d in dists]))
    rest = vocab - union.size
    out = [_aligned(d, union, rest) for d in dists]
    return [a / a.sum() for a in out]


def bounded_effect(js: float) -> float:
    """A Jensen-Shannon divergence on a scale where its bound cannot decide a ratio.

    JS (nats) is at most ln 2, so at saturation a trained adapter cannot reach twice what
    random adapters of its norm already give (0.64 against 0.40 nats is 1.6×).
    ``u = −ln(1 − JS/ln 2)`` equals JS/ln 2 for small effects (ratios there are unchanged)
    and grows without bound towards ln 2 (0.64 against 0.40 is 2.98×).
    """
    share = min(max(js, 0.0) / LN2, 1.0 - 1e-12)
    return -math.log1p(-share)


DivergenceKind = Literal["js", "kl"]


def divergence(base: TokenDist, ft: TokenDist, kind: DivergenceKind = "js") -> float:
    """Divergence between base and fine-tuned next-token distributions, in nats.

    ``"kl"`` is KL(ft || base): the expected extra surprise of the base model at
    tokens the fine-tune produces. ``"js"`` is symmetric and bounded by ln 2.
    Slices are aligned with :func:`align` and each side renormalised to sum 1.
    """
    b, f = align(base, ft)
    if kind == "js":
        return js(f, b)
    if kind == "kl":
        return kl(f, b)
    raise ValueError(f"unknown divergence kind {kind!r}; expected 'js' or 'kl'")
