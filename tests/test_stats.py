"""Null statistics, Student-t tails, empirical p, bootstrap and line fits."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sway_common.stats import (
    Z_DISPLAY_P,
    betainc,
    bootstrap_ci,
    empirical_p,
    format_z,
    linear_fit,
    null_stats,
    p_value,
    paired_ratio,
    t_cdf,
    t_isf,
    t_sf,
    z_bound,
    z_score,
)
from sway_common.types import NullStats

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
spread_samples = st.lists(finite, min_size=2, max_size=30).filter(
    lambda v: float(np.std(v, ddof=1)) > 1e-3 * (1.0 + abs(float(np.mean(v))))
)


def t_pdf(t: np.ndarray, df: float) -> np.ndarray:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return np.exp(log_c - (df + 1) / 2 * np.log1p(t * t / df))


def normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


# ---- null_stats / z -------------------------------------------------------------


@settings(deadline=None)
@given(spread_samples)
def test_null_stats_match_numpy(values: list[float]) -> None:
    s = null_stats(values)
    assert s.n == len(values)
    assert s.mean == pytest.approx(float(np.mean(values)), rel=1e-12, abs=1e-9)
    assert s.std == pytest.approx(float(np.std(values, ddof=1)), rel=1e-12)
    assert s.values == [float(v) for v in values]
    assert not s.degenerate


@pytest.mark.parametrize(
    "values", [[], [3.0], [0.1, 0.1, 0.1], [1e6] * 5, [2.5e-5] * 8, [0.0, 0.0], [7.0, 7.0 + 1e-13]]
)
def test_degenerate_nulls_give_no_z_and_no_p(values: list[float]) -> None:
    s = null_stats(values)
    assert s.degenerate
    assert z_score(1e9, s) is None
    assert p_value(1e9, s) is None


def test_empty_null_summary() -> None:
    s = null_stats([])
    assert (s.mean, s.std, s.n, s.values) == (0.0, 0.0, 0, [])


def test_small_relative_spread_is_degenerate_but_real_spread_is_not() -> None:
    assert null_stats([1000.0, 1000.0 + 1e-7]).degenerate
    assert not null_stats([1e-5, 2e-5, 3e-5]).degenerate


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_nulls_raise(bad: float) -> None:
    with pytest.raises(ValueError):
        null_stats([1.0, bad, 2.0])
    s = null_stats([1.0, 2.0, 3.0])
    with pytest.raises(ValueError):
        z_score(bad, s)
    with pytest.raises(ValueError):
        p_value(bad, s)
    with pytest.raises(ValueError):
        empirical_p(bad, [1.0, 2.0])
    with pytest.raises(ValueError):
        empirical_p(1.0, [1.0, bad])


def test_z_value_and_sign() -> None:
    s = null_stats([1.0, 2.0, 3.0, 4.0, 5.0])
    std = math.sqrt(2.5)
    assert z_score(3.0 + 2 * std, s) == pytest.approx(2.0)
    assert z_score(3.0 - std, s) == pytest.approx(-1.0)
    assert z_score(3.0, s) == 0.0


@settings(deadline=None)
@given(spread_samples, finite)
def test_z_sign_follows_x(values: list[float], x: float) -> None:
    s = null_stats(values)
    z = z_score(x, s)
    assert z is not None
    assert math.isfinite(z)
    assert np.sign(z) == np.sign(x - s.mean) or abs(x - s.mean) < 1e-9 * (1 + abs(s.mean))


# ---- Student t ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("t", "df", "upper"),
    [
        # Quantiles from standard t tables (8+ significant digits).
        (2.015048373, 5, 0.05),
        (5.840909309, 3, 0.005),
        (2.228138852, 10, 0.025),
        (2.527977003, 20, 0.01),
        (6.313751515, 1, 0.05),
    ],
)
def test_t_tail_at_known_quantiles(t: float, df: float, upper: float) -> None:
    assert t_sf(t, df) == pytest.approx(upper, rel=1e-6)
    assert t_cdf(t, df) == pytest.approx(1.0 - upper, rel=1e-8)
    assert t_sf(-t, df) == pytest.approx(1.0 - upper, rel=1e-8)


@settings(deadline=None)
@given(st.floats(-1e3, 1e3))
def test_t_df1_is_cauchy_and_df2_closed_form(t: float) -> None:
    assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, rel=1e-12, abs=1e-15)
    assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2.0 * math.sqrt(2.0 + t * t)), abs=1e-14)


@settings(max_examples=60, deadline=None)
@given(st.floats(0.5, 300.0), st.floats(-12.0, 12.0))
def test_t_cdf_matches_numerical_integration(df: float, t: float) -> None:
    grid = np.linspace(0.0, t, 20001)
    f = t_pdf(grid, df)
    h = (grid[-1] - grid[0]) / (grid.size - 1)
    simpson = h / 3.0 * (f[0] + f[-1] + 4.0 * f[1:-1:2].sum() + 2.0 * f[2:-1:2].sum())
    assert t_cdf(t, df) == pytest.approx(0.5 + simpson, abs=1e-9)


@pytest.mark.parametrize("df", [1e3, 1e5, 1e6])
@pytest.mark.parametrize("t", [-3.0, -1.0, 0.5, 1.96, 4.0])
def test_t_approaches_normal_for_large_df(df: float, t: float) -> None:
    assert t_cdf(t, df) == pytest.approx(normal_cdf(t), abs=5.0 / df)


def test_t_extreme_arguments() -> None:
    assert t_sf(0.0, 4) == pytest.approx(0.5)
    assert t_sf(1e200, 3) == 0.0
    assert t_sf(-1e200, 3) == 1.0
    # Far tails keep relative precision: df=2 sf is 0.5 * (1 - t / sqrt(2 + t^2)) ~ 1/(2 t^2).
    assert t_sf(1e10, 2) == pytest.approx(0.5e-20, rel=1e-9)
    with pytest.raises(ValueError):
        t_sf(1.0, 0)
    with pytest.raises(ValueError):
        t_sf(float("nan"), 3)


@settings(deadline=None)
@given(st.floats(0.1, 50), st.floats(0.1, 50), st.floats(0.0, 1.0))
def test_betainc_closed_forms_and_symmetry(a: float, b: float, x: float) -> None:
    assert betainc(a, 1.0, x) == pytest.approx(x**a, abs=1e-12)
    assert betainc(1.0, b, x) == pytest.approx(1.0 - (1.0 - x) ** b, abs=1e-12)
    # Pass the same (x, 1 - x) pair both ways: rounding 1 - x again would move a steep I_x.
    y = 1.0 - x
    forward = betainc(a, b, x, one_minus_x=y)
    assert forward == pytest.approx(1.0 - betainc(b, a, y, one_minus_x=x), abs=1e-12)
    assert 0.0 <= betainc(a, b, x) <= 1.0


def test_betainc_rejects_bad_arguments() -> None:
    for args in [(0.0, 1.0, 0.5), (1.0, -1.0, 0.5), (1.0, 1.0, 1.5), (1.0, 1.0, -0.1)]:
        with pytest.raises(ValueError):
            betainc(*args)


# ---- p-values -------------------------------------------------------------------


def test_p_value_uses_prediction_interval_t() -> None:
    values = [0.0, 1.0, 2.0, 3.0, 4.0]
    s = null_stats(values)
    # t_{0.95, 4} = 2.131846786; x placed so the prediction-interval t equals it.
    x = 2.0 + 2.131846786 * math.sqrt(2.5) * math.sqrt(1.0 + 1.0 / 5.0)
    assert p_value(x, s) == pytest.approx(0.05, rel=1e-6)
    assert p_value(2.0, s) == pytest.approx(0.5)
    # Wider than the plain z tail: small n must not look more significant than it is.
    z = z_score(x, s)
    assert z is not None
    assert p_value(x, s) > 1.0 - normal_cdf(z)


@settings(deadline=None)
@given(spread_samples, finite, finite)
def test_p_value_in_unit_interval_and_monotone(values: list[float], a: float, b: float) -> None:
    s = null_stats(values)
    lo, hi = min(a, b), max(a, b)
    p_lo, p_hi = p_value(lo, s), p_value(hi, s)
    assert p_lo is not None and p_hi is not None
    assert 0.0 <= p_hi <= p_lo <= 1.0


def test_huge_effect_gives_tiny_finite_p() -> None:
    s = null_stats([0.010, 0.012, 0.011, 0.009, 0.013, 0.010, 0.011, 0.012])
    p = p_value(5.0, s)
    assert p is not None
    assert 0.0 <= p < 1e-10
    assert p_value(-5.0, s) == pytest.approx(1.0)


def test_empirical_p_formula_and_ties() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert empirical_p(10.0, values) == pytest.approx(1 / 5)
    assert empirical_p(-10.0, values) == pytest.approx(1.0)
    assert empirical_p(3.0, values) == pytest.approx(3 / 5)  # ties count against x
    assert empirical_p(2.5, values) == pytest.approx(3 / 5)
    assert empirical_p(0.0, []) == 1.0


@settings(deadline=None)
@given(st.lists(finite, max_size=30), finite, finite)
def test_empirical_p_bounds_and_monotone(values: list[float], a: float, b: float) -> None:
    lo, hi = min(a, b), max(a, b)
    p_lo, p_hi = empirical_p(lo, values), empirical_p(hi, values)
    assert 1.0 / (len(values) + 1) <= p_hi <= p_lo <= 1.0


# ---- bootstrap ------------------------------------------------------------------


def test_bootstrap_is_seeded() -> None:
    values = list(np.random.default_rng(7).normal(1.0, 0.5, size=25))
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)


def test_bootstrap_interval_brackets_the_statistic() -> None:
    values = np.random.default_rng(11).normal(2.0, 1.0, size=40)
    lo, hi = bootstrap_ci(values)
    assert lo < float(np.mean(values)) < hi
    # About 1.96 standard errors each side for a mean.
    se = float(np.std(values, ddof=1)) / math.sqrt(values.size)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.2)
    wide = bootstrap_ci(values, alpha=0.01)
    narrow = bootstrap_ci(values, alpha=0.5)
    assert wide[0] <= lo <= narrow[0] <= narrow[1] <= hi <= wide[1]


def test_bootstrap_custom_stat_and_single_value() -> None:
    values = [1.0, 2.0, 3.0, 100.0, 4.0]
    lo, hi = bootstrap_ci(values, stat=np.median, n_boot=500)
    assert 1.0 <= lo <= hi <= 100.0
    assert bootstrap_ci([5.0]) == (5.0, 5.0)


@pytest.mark.parametrize(
    ("values", "kwargs"),
    [
        ([], {}),
        ([1.0, float("nan")], {}),
        ([1.0, 2.0], {"n_boot": 0}),
        ([1.0, 2.0], {"alpha": 0.0}),
        ([1.0, 2.0], {"alpha": 1.0}),
    ],
)
def test_bootstrap_rejects_bad_input(values: list[float], kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        bootstrap_ci(values, **kwargs)


# ---- linear fit -----------------------------------------------------------------


def test_linear_fit_perfect_line() -> None:
    x = [0.0, 0.25, 0.5, 1.0, 2.0]
    slope, intercept, r2 = linear_fit(x, [3.0 * v - 1.0 for v in x])
    assert slope == pytest.approx(3.0)
    assert intercept == pytest.approx(-1.0)
    assert r2 == pytest.approx(1.0)


@pytest.mark.parametrize("level", [0.0, 0.1, -4.0, 1e6])
def test_linear_fit_constant_y_has_zero_r2(level: float) -> None:
    slope, intercept, r2 = linear_fit([0.0, 1.0, 2.0, 3.0], [level] * 4)
    assert slope == 0.0
    assert intercept == pytest.approx(level)
    assert r2 == 0.0


@settings(deadline=None)
@given(
    st.lists(st.tuples(st.floats(-100, 100), st.floats(-100, 100)), min_size=3, max_size=30)
    .filter(lambda pts: np.ptp([p[0] for p in pts]) > 1e-3)
    .filter(lambda pts: np.ptp([p[1] for p in pts]) > 1e-3)
)
def test_linear_fit_matches_polyfit(points: list[tuple[float, float]]) -> None:
    x = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points])
    slope, intercept, r2 = linear_fit(x, y)
    ref_slope, ref_intercept = np.polyfit(x, y, 1)
    assert slope == pytest.approx(ref_slope, rel=1e-6, abs=1e-6)
    assert intercept == pytest.approx(ref_intercept, rel=1e-6, abs=1e-5)
    assert 0.0 <= r2 <= 1.0
    assert r2 == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2, abs=1e-6)


@pytest.mark.parametrize(
    ("x", "y"),
    [
        ([1.0, 2.0], [1.0]),
        ([1.0], [1.0]),
        ([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]),
        ([1.0, float("inf")], [1.0, 2.0]),
        ([1.0, 2.0], [float("nan"), 2.0]),
    ],
)
def test_linear_fit_rejects_bad_input(x: list[float], y: list[float]) -> None:
    with pytest.raises(ValueError):
        linear_fit(x, y)


# ------------------------------------------------------------------ honest z, paired ratio
def test_t_isf_inverts_the_t_tail() -> None:
    for df in (1, 2, 7, 30):
        for p in (0.2, 0.05, 1e-4):
            assert t_sf(t_isf(p, df), df) == pytest.approx(p, rel=1e-6)


def test_z_bound_is_where_the_small_sample_p_reaches_its_floor() -> None:
    for n in (3, 8, 16):
        bound = z_bound(n)
        assert p_value(bound, NullStats(mean=0.0, std=1.0, n=n)) == pytest.approx(
            Z_DISPLAY_P, rel=1e-4
        )
    # More draws make the same z more significant, so the bound comes down toward normal.
    assert z_bound(3) > z_bound(8) > z_bound(16) > 3.7


def test_format_z_never_prints_four_digit_sigmas() -> None:
    assert format_z(2840.0, 3) == "> 50.0σ"
    assert format_z(12.0, 8) == "> 7.5σ" and format_z(-12.0, 8) == "< -7.5σ"
    assert format_z(4.2, 8) == "+4.2σ" and format_z(None, 8) == "—"


def test_paired_ratio_is_the_per_prompt_geometric_ratio_with_a_prompt_bootstrap() -> None:
    nulls = [[1.0, 2.0, 4.0, 8.0], [1.0, 2.0, 4.0, 8.0]]
    ratio, lo, hi = paired_ratio([10.0, 20.0, 40.0, 80.0], nulls)
    assert ratio == pytest.approx(10.0) and lo == pytest.approx(10.0) and hi == pytest.approx(10.0)
    # Big on one prompt only: the mean ratio is > 1 but the interval reaches below 1x.
    ratio, lo, hi = paired_ratio([100.0, 1.0, 0.5, 0.5], [[1.0] * 4] * 3, seed=1)
    assert ratio > 1.0 and lo < 1.0 < hi
    with pytest.raises(ValueError):
        paired_ratio([1.0, 2.0], [[1.0, 2.0, 3.0]])
