"""adapter_ablation's dose-response judgement: a power law, not a line."""

from __future__ import annotations

import pytest

from sway_common.probes.adapter_ablation import AdapterAblationConfig, judge_shape, power_fit

LAMS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]
CFG = AdapterAblationConfig(name="a", kind="adapter_ablation")


def curve(f) -> list[float]:
    return [f(lam) for lam in LAMS]


@pytest.mark.parametrize("exponent", [1.0, 1.6, 2.0, 2.4])
def test_power_law_growth_is_healthy(exponent: float) -> None:
    shape = judge_shape(LAMS, curve(lambda lam: 0.2 * lam**exponent), CFG)
    assert shape.problems == [] and shape.exponent == pytest.approx(exponent)
    assert shape.r2 == pytest.approx(1.0)


def test_quadratic_then_bending_is_healthy_where_a_line_fit_would_fail() -> None:
    # KL-like: quadratic near 0, bending toward saturation; R² against a line is low.
    shape = judge_shape(LAMS, curve(lambda lam: 0.6 * (1 - 1 / (1 + lam**2))), CFG)
    assert shape.problems == []


def test_a_curve_that_falls_is_flagged() -> None:
    shape = judge_shape(LAMS, [0.0, 0.1, 0.3, 0.2, 0.4, 0.45], CFG)
    assert any("falls" in p for p in shape.problems)


def test_early_saturation_and_no_overshoot_are_flagged() -> None:
    shape = judge_shape(LAMS, [0.0, 0.5, 0.52, 0.53, 0.53, 0.53], CFG)
    text = " ".join(shape.problems)
    assert "exponent" in text and "saturation" in text and "overshoot" in text


def test_nonzero_at_lambda_zero_means_broken_scaling() -> None:
    shape = judge_shape(LAMS, [0.01, 0.02, 0.05, 0.1, 0.2, 0.3], CFG)
    assert any("λ=0" in p for p in shape.problems)


def test_power_fit_needs_two_positive_points() -> None:
    assert power_fit(LAMS, [0.0] * 6) == (None, None)
