"""KL / JS on full arrays and on aligned top-k slices with tail mass."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Literal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.typing import ArrayLike

from sway_common.backend.scoring import token_dist_from_logprobs
from sway_common.divergence import KL_EPS, LN2, _js_normalised, align, divergence, js, kl
from sway_common.types import TokenDist

KINDS: tuple[Literal["js", "kl"], ...] = ("js", "kl")

# Non-negative weights with at least some mass; kl/js normalise them.
weights = hnp.arrays(
    np.float64,
    st.integers(1, 40),
    elements=st.one_of(st.just(0.0), st.floats(1e-6, 1e3)),
).filter(lambda a: a.sum() > 0)


@st.composite
def weight_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(1, 40))
    elem = st.one_of(st.just(0.0), st.floats(1e-6, 1e3))
    p = draw(hnp.arrays(np.float64, n, elements=elem).filter(lambda a: a.sum() > 0))
    q = draw(hnp.arrays(np.float64, n, elements=elem).filter(lambda a: a.sum() > 0))
    return p, q


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def tail_mass(d: TokenDist) -> float:
    if d.tail_logprob is None or d.tail_logprob == 0.0:
        return 0.0
    return math.exp(d.tail_logprob)


def full_probs(row: np.ndarray) -> np.ndarray:
    return np.exp(np.asarray(row, dtype=np.float64))


def dist(ids: list[int], probs: list[float], vocab: int, tail: float | None) -> TokenDist:
    return TokenDist(
        np.asarray(ids, dtype=np.int64),
        np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32),
        vocab,
        tail,
    )


# ---- full arrays ----------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(weight_pairs())
def test_kl_is_non_negative_and_finite(pq: tuple[np.ndarray, np.ndarray]) -> None:
    p, q = pq
    value = kl(p, q)
    assert math.isfinite(value)
    assert value >= 0.0


@settings(max_examples=50, deadline=None)
@given(weight_pairs())
def test_js_is_symmetric_and_bounded(pq: tuple[np.ndarray, np.ndarray]) -> None:
    p, q = pq
    a, b = js(p, q), js(q, p)
    assert 0.0 <= a <= LN2
    assert a == pytest.approx(b, abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(weights)
def test_identical_inputs_give_zero(p: np.ndarray) -> None:
    assert kl(p, p) == pytest.approx(0.0, abs=1e-12)
    assert js(p, p) == pytest.approx(0.0, abs=1e-12)
    # Scaling does not matter: both sides are normalised.
    assert kl(p, 3.0 * p) == pytest.approx(0.0, abs=1e-12)


def test_known_values() -> None:
    assert kl([1.0, 0.0], [0.5, 0.5]) == pytest.approx(LN2)
    assert kl([0.5, 0.5], [0.25, 0.75]) == pytest.approx(
        0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    )
    assert js([1.0, 0.0], [0.0, 1.0]) == pytest.approx(LN2, abs=1e-15)
    assert js([1.0, 0.0, 0.0], [0.0, 0.5, 0.5]) == pytest.approx(LN2, abs=1e-15)
    # JS of (1,0) vs (1/2,1/2), with mixture (3/4, 1/4), written out.
    expected = 0.5 * math.log(1.0 / 0.75) + 0.5 * (
        0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    )
    assert js([1.0, 0.0], [0.5, 0.5]) == pytest.approx(expected)


def test_kl_with_zero_reference_mass_is_finite_and_capped() -> None:
    value = kl([0.5, 0.5], [1.0, 0.0])
    assert math.isfinite(value)
    # Half the mass meets the floor: about 0.5 * ln(0.5 / KL_EPS) plus a small remainder.
    assert value == pytest.approx(0.5 * math.log(0.5 / KL_EPS) + 0.5 * math.log(0.5), rel=1e-6)
    assert value < math.log(1.0 / KL_EPS) + 1.0


def test_kl_floor_is_continuous_in_q() -> None:
    # A q entry just below the floor gives the same answer as an exact zero.
    assert kl([0.5, 0.5], [1.0, KL_EPS / 10]) == pytest.approx(kl([0.5, 0.5], [1.0, 0.0]))


@pytest.mark.parametrize(
    ("p", "q"),
    [
        ([0.5, float("nan")], [0.5, 0.5]),
        ([0.5, 0.5], [float("inf"), 0.5]),
        ([1.5, -0.5], [0.5, 0.5]),
        ([0.5, 0.5], [0.5, 0.25, 0.25]),
        ([[0.5, 0.5]], [[0.5, 0.5]]),
        ([], []),
        ([0.0, 0.0], [0.5, 0.5]),
    ],
)
@pytest.mark.parametrize("fn", [kl, js])
def test_bad_arrays_raise(
    fn: Callable[[ArrayLike, ArrayLike], float], p: ArrayLike, q: ArrayLike
) -> None:
    with pytest.raises(ValueError):
        fn(p, q)


def test_js_above_ln2_is_an_error_not_a_value() -> None:
    # Unnormalised input to the inner routine mimics an upstream bug.
    with pytest.raises(RuntimeError, match="ln 2"):
        _js_normalised(np.array([2.0, 0.0]), np.array([0.0, 2.0]))


# ---- top-k slices --------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    st.integers(2, 60).flatmap(
        lambda v: st.tuples(
            hnp.arrays(np.float64, v, elements=st.floats(-8, 8)),
            hnp.arrays(np.float64, v, elements=st.floats(-8, 8)),
        )
    )
)
def test_full_vocab_slices_match_full_arrays(rows: tuple[np.ndarray, np.ndarray]) -> None:
    ra = log_softmax(rows[0]).astype(np.float32)
    rb = log_softmax(rows[1]).astype(np.float32)
    v = ra.size
    base, ft = token_dist_from_logprobs(ra, v), token_dist_from_logprobs(rb, v)
    pa, pb = full_probs(ra), full_probs(rb)
    assert divergence(base, ft, "js") == pytest.approx(js(pb, pa), rel=1e-9, abs=1e-13)
    # KL is KL(ft || base).
    assert divergence(base, ft, "kl") == pytest.approx(kl(pb, pa), rel=1e-9, abs=1e-13)


def test_kl_direction_is_ft_given_base() -> None:
    base = dist([0, 1], [0.9, 0.1], 2, None)
    ft = dist([1, 0], [0.6, 0.4], 2, None)
    p_base, p_ft = np.array([0.9, 0.1]), np.array([0.4, 0.6])
    assert divergence(base, ft, "kl") == pytest.approx(kl(p_ft, p_base), rel=1e-6)
    assert abs(kl(p_ft, p_base) - kl(p_base, p_ft)) > 0.05
    assert divergence(base, ft, "kl") != pytest.approx(kl(p_base, p_ft), rel=1e-3)


@settings(max_examples=50, deadline=None)
@given(
    st.integers(3, 40).flatmap(
        lambda v: st.tuples(
            st.just(v),
            st.integers(1, v - 1),
            st.integers(1, v - 1),
            st.randoms(use_true_random=False),
        )
    )
)
def test_exact_when_tails_are_uniform(args: tuple[int, int, int, random.Random]) -> None:
    # Outside each side's top-k every id has the same probability, so the uniform-tail
    # model is the truth and the aligned divergence must equal the full-vocab one.
    v, ka, kb, rnd = args
    rows = []
    for k in (ka, kb):
        logits = np.full(v, -3.0)
        chosen = rnd.sample(range(v), k)
        logits[chosen] = [rnd.uniform(-1.0, 4.0) for _ in chosen]
        rows.append(log_softmax(logits).astype(np.float32))
    base = token_dist_from_logprobs(rows[0], ka)
    ft = token_dist_from_logprobs(rows[1], kb)
    pa, pb = full_probs(rows[0]), full_probs(rows[1])
    assert divergence(base, ft, "js") == pytest.approx(js(pb, pa), rel=1e-5, abs=1e-7)
    assert divergence(base, ft, "kl") == pytest.approx(kl(pb, pa), rel=1e-5, abs=1e-7)


@st.composite
def lm_like_rows(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Zipf-shaped base row over 64 ids and a fine-tune that perturbs its logits."""
    v = 64
    seed = draw(st.integers(0, 2**32 - 1))
    s = draw(st.floats(1.2, 2.5))
    noise = draw(st.floats(0.0, 0.5))
    shift = draw(st.floats(0.0, 1.0))
    rng = np.random.default_rng(seed)
    a = -s * np.log(rng.permutation(v) + 1.0) + noise * rng.standard_normal(v)
    b = a + shift * rng.standard_normal(v)
    return log_softmax(a).astype(np.float32), log_softmax(b).astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(lm_like_rows())
def test_topk_converges_to_full_vocab(rows: tuple[np.ndarray, np.ndarray]) -> None:
    ra, rb = rows
    v = ra.size
    pa, pb = full_probs(ra), full_probs(rb)
    exact = {"js": js(pb, pa), "kl": kl(pb, pa)}
    spread = float(np.max(np.abs(ra.astype(np.float64) - rb)))
    prev_tol = {"js": math.inf, "kl": math.inf}
    for k in (1, 2, 4, 8, 16, 32, 64):
        base = token_dist_from_logprobs(ra, k)
        ft = token_dist_from_logprobs(rb, k)
        tb, tf = tail_mass(base), tail_mass(ft)
        # sqrt(JS) is a metric and JS <= ln2 * total variation; replacing a tail by a
        # uniform one of the same mass moves a side by at most that mass in TV. So
        # |sqrt(JS_k) - sqrt(JS)| <= B, i.e. |JS_k - JS| <= 2 B sqrt(JS) + B^2.
        b = math.sqrt(LN2 * tb) + math.sqrt(LN2 * tf)
        tol = {
            "js": 2.0 * b * math.sqrt(exact["js"]) + b * b + 1e-6,
            # KL has no clean bound; scale the tail mass by the largest log-ratio.
            "kl": 3.0 * (tb + tf) * (1.0 + spread) + 1e-6,
        }
        for kind in KINDS:
            err = abs(divergence(base, ft, kind) - exact[kind])
            assert err <= tol[kind], (kind, k, err, tol[kind])
            # Tails only shrink as k grows, so the allowed error never grows.
            assert tol[kind] <= prev_tol[kind] + 1e-12
            if k == v // 2:
                assert err <= {"js": 0.02, "kl": 0.15}[kind]
            if k == v:
                assert err <= 1e-9 * exact[kind] + 1e-13
        prev_tol = tol


@settings(max_examples=50, deadline=None)
@given(lm_like_rows(), st.integers(1, 64))
def test_topk_identical_and_symmetric(rows: tuple[np.ndarray, np.ndarray], k: int) -> None:
    ra, rb = rows
    a, b = token_dist_from_logprobs(ra, k), token_dist_from_logprobs(rb, k)
    assert divergence(a, a, "js") == pytest.approx(0.0, abs=1e-12)
    assert divergence(a, a, "kl") == pytest.approx(0.0, abs=1e-12)
    assert divergence(a, b, "js") == pytest.approx(divergence(b, a, "js"), abs=1e-12)
    assert 0.0 <= divergence(a, b, "js") <= LN2
    assert divergence(a, b, "kl") >= 0.0


# ---- tail states ---------------------------------------------------------------


@pytest.mark.parametrize("tail", [None, 0.0])
def test_disjoint_slices_without_tail(tail: float | None) -> None:
    base = dist([0, 1], [0.7, 0.3], 10, tail)
    ft = dist([5, 6], [0.5, 0.5], 10, tail)
    assert divergence(base, ft, "js") == pytest.approx(LN2, abs=1e-12)
    assert divergence(base, ft, "js") <= LN2
    value = divergence(base, ft, "kl")
    assert math.isfinite(value)
    assert value < math.log(1.0 / KL_EPS) + 1.0


def test_none_and_zero_sentinel_agree() -> None:
    a0 = dist([0, 1], [0.6, 0.4], 8, None)
    b0 = dist([1, 2], [0.5, 0.5], 8, None)
    a1 = dist([0, 1], [0.6, 0.4], 8, 0.0)
    b1 = dist([1, 2], [0.5, 0.5], 8, 0.0)
    for kind in KINDS:
        assert divergence(a0, b0, kind) == divergence(a1, b1, kind)


def test_negative_tail_is_spread_over_missing_ids() -> None:
    # base holds ids 0,1 (mass 0.8) with tail 0.2 over the 8 other ids: 0.025 each.
    # ft holds ids 1,2 (mass 0.9) with tail 0.1 over 8 ids: 0.0125 each.
    v = 10
    base = dist([0, 1], [0.5, 0.3], v, math.log(0.2))
    ft = dist([1, 2], [0.6, 0.3], v, math.log(0.1))
    b, f = align(base, ft)
    # Union is [0, 1, 2]; the rest bin holds the 7 ids outside it.
    np.testing.assert_allclose(b, [0.5, 0.3, 0.025, 7 * 0.025], rtol=1e-6)
    np.testing.assert_allclose(f, [0.0125, 0.6, 0.3, 7 * 0.0125], rtol=1e-6)
    full_b = np.array([0.5, 0.3] + [0.025] * 8)
    full_f = np.array([0.0125, 0.6, 0.3] + [0.0125] * 7)
    assert divergence(base, ft, "js") == pytest.approx(js(full_f, full_b), rel=1e-6)
    assert divergence(base, ft, "kl") == pytest.approx(kl(full_f, full_b), rel=1e-6)


def test_disjoint_slices_with_tail_stay_below_ln2() -> None:
    base = dist([0], [0.9], 4, math.log(0.1))
    ft = dist([3], [0.9], 4, math.log(0.1))
    value = divergence(base, ft, "js")
    assert 0.0 < value < LN2
    assert math.isfinite(divergence(base, ft, "kl"))


def test_slices_that_do_not_sum_to_one_are_renormalised() -> None:
    # float32 slices plus tail can miss 1 by a little; both sides are rescaled.
    a = dist([0, 1], [0.7001, 0.2], 3, math.log(0.1))
    assert divergence(a, a, "js") == pytest.approx(0.0, abs=1e-12)
    b = dist([0, 1], [0.7, 0.2], 3, math.log(0.1))
    assert divergence(a, b, "js") < 1e-7


@pytest.mark.parametrize(
    ("base", "ft"),
    [
        (dist([0], [0.5], 4, None), dist([0], [0.5], 5, None)),
        (
            TokenDist(np.array([0]), np.array([np.nan], dtype=np.float32), 4, None),
            dist([0], [0.5], 4, None),
        ),
        (
            dist([0], [0.5], 4, None),
            TokenDist(np.array([1]), np.array([-np.inf], dtype=np.float32), 4, None),
        ),
        (dist([0], [0.5], 4, float("nan")), dist([0], [0.5], 4, None)),
        (dist([0], [0.5], 4, 0.5), dist([0], [0.5], 4, None)),
        (dist([0], [0.5], 4, None), dist([7], [0.5], 4, None)),
        (dist([0, 0], [0.5, 0.2], 4, None), dist([0], [0.5], 4, None)),
        (
            TokenDist(np.array([0]), np.array([0.5], dtype=np.float32), 4, None),
            dist([0], [0.5], 4, None),
        ),
    ],
    ids=[
        "vocab",
        "nan-logprob",
        "inf-logprob",
        "nan-tail",
        "positive-tail",
        "id-range",
        "dup-id",
        "positive-logprob",
    ],
)
def test_bad_slices_raise(base: TokenDist, ft: TokenDist) -> None:
    with pytest.raises(ValueError):
        divergence(base, ft)


def test_unknown_kind_raises() -> None:
    a = dist([0], [1.0], 2, None)
    with pytest.raises(ValueError, match="kind"):
        divergence(a, a, "tv")  # type: ignore[arg-type]
