"""The BCa bootstrap: a closer-to-nominal interval than the percentile one on few, skewed values."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from sway_common.stats import BootstrapMethod, bootstrap_ci, norm_cdf, norm_ppf, paired_ratio


@pytest.mark.parametrize(
    ("p", "x"), [(0.5, 0.0), (0.975, 1.959964), (0.025, -1.959964), (0.999, 3.090232)]
)
def test_the_normal_quantile_inverts_the_cdf(p: float, x: float) -> None:
    assert norm_ppf(p) == pytest.approx(x, abs=1e-6)
    assert norm_cdf(norm_ppf(p)) == pytest.approx(p, rel=1e-9)
    with pytest.raises(ValueError):
        norm_ppf(1.0)


def _lower_misses(method: BootstrapMethod, *, n: int, runs: int) -> int:
    """How often the lower bound lands above the true mean, for a left-skewed sample
    (minus an exponential: a few prompts far below the rest)."""
    rng = np.random.default_rng(20)
    misses = 0
    for r in range(runs):
        values = -rng.exponential(1.0, n)
        lo, _ = bootstrap_ci(values, n_boot=1000, seed=r, method=method)
        misses += lo > -1.0
    return misses


def test_bca_misses_the_truth_less_often_than_the_percentile_interval_when_skewed() -> None:
    runs = 400
    percentile = _lower_misses("percentile", n=8, runs=runs)
    bca = _lower_misses("bca", n=8, runs=runs)
    # Nominal is 2.5% (10 of 400); the percentile bound misses far more often.
    assert percentile / runs > 0.15
    assert bca < percentile - 0.02 * runs, (bca, percentile)


def test_bca_agrees_with_the_percentile_interval_on_symmetric_values() -> None:
    values = np.random.default_rng(3).normal(0.0, 1.0, size=60)
    bca = bootstrap_ci(values, seed=1)
    pct = bootstrap_ci(values, seed=1, method="percentile")
    se = float(np.std(values, ddof=1)) / math.sqrt(values.size)
    assert bca == pytest.approx(pct, abs=0.15 * se)


def test_bca_falls_back_where_the_correction_is_undefined() -> None:
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    lo, hi = bootstrap_ci([1.0, 5.0], n_boot=400)
    assert 1.0 <= lo <= hi <= 5.0
    bad: Any = "basic"
    with pytest.raises(ValueError, match="method"):
        bootstrap_ci([1.0, 2.0], method=bad)


def test_the_paired_ratio_interval_is_the_bca_one() -> None:
    adapter = [4.0, 3.0, 5.0, 0.5, 4.5, 3.5, 6.0, 0.4]
    nulls = [[1.0] * 8, [1.0] * 8]
    ratio, lo, hi = paired_ratio(adapter, nulls, seed=2)
    logs = np.log(adapter)
    b_lo, b_hi = bootstrap_ci(logs, seed=2)
    assert (lo, hi) == pytest.approx((math.exp(b_lo), math.exp(b_hi)))
    assert ratio == pytest.approx(math.exp(logs.mean()))
    p_lo, _ = bootstrap_ci(logs, seed=2, method="percentile")
    assert b_lo < p_lo  # two prompts far below the rest: BCa reaches lower
