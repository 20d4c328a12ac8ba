"""The runner end to end on the analytic dummy backend: verdicts, calibration, failure handling."""

from __future__ import annotations

import pytest

from sway_common.backend.dummy import DummyDifferentialBackend
from sway_common.probes import REGISTRY
from sway_common.probes.delta_kl import DeltaKLConfig
from sway_common.suite.runner import composite, overall_verdict, run_suite
from sway_common.suite.spec import Defaults, SuiteSpec, quick_suite
from sway_common.types import ProbeResult, Verdict

PROMPTS = ["The keeper said", "Tell me about the light", "In the storm", "A ledger entry:"]


def _by_kind(result):
    return {p.kind: p for p in result.probes}


def test_trained_adapter_passes_with_a_real_null_comparison() -> None:
    result = run_suite(quick_suite(PROMPTS, runs=6), backend=DummyDifferentialBackend())
    probes = _by_kind(result)
    assert [p.kind for p in result.probes][0] == "null_adapter"
    dk = probes["delta_kl"]
    assert dk.verdict is Verdict.PASS, dk.message
    assert dk.z is not None and dk.z >= 3 and dk.effect_ratio > 1
    assert dk.null is not None and dk.null.n == 6 and not dk.null.degenerate
    assert probes["adapter_ablation"].verdict is Verdict.PASS, probes["adapter_ablation"].message
    assert result.verdict is Verdict.PASS and result.score >= result.threshold


def test_untrained_adapter_is_one_preflight_fail_before_any_probe() -> None:
    result = run_suite(
        quick_suite(PROMPTS, runs=6), backend=DummyDifferentialBackend(adapter_strength=0.0)
    )
    assert [(p.kind, p.verdict) for p in result.probes] == [("preflight", Verdict.FAIL)]
    assert "no-op" in result.probes[0].message and "ΔW" in result.probes[0].message
    assert result.verdict is Verdict.FAIL


def test_near_zero_adapter_fails_and_its_curve_is_not_called_healthy() -> None:
    result = run_suite(
        quick_suite(PROMPTS, runs=6), backend=DummyDifferentialBackend(adapter_strength=1e-3)
    )
    probes = _by_kind(result)
    assert probes["delta_kl"].verdict is Verdict.FAIL
    assert probes["adapter_ablation"].verdict is not Verdict.PASS
    assert result.verdict is Verdict.FAIL


def test_nan_adapter_is_a_single_error_never_a_pass() -> None:
    result = run_suite(quick_suite(PROMPTS), backend=DummyDifferentialBackend(nan_adapter=True))
    assert [p.verdict for p in result.probes] == [Verdict.ERROR]
    assert result.verdict is Verdict.ERROR


def test_random_adapters_rarely_pass() -> None:
    """A random adapter presented as the fine-tune is noise: it must not PASS (beyond chance)."""
    passes = 0
    for seed in range(12):
        backend = DummyDifferentialBackend(random_adapter_seed=seed, adapter_strength=1.0)
        result = run_suite(quick_suite(PROMPTS, runs=6), backend=backend)
        passes += _by_kind(result)["delta_kl"].verdict is Verdict.PASS
    assert passes <= 1


def test_null_calibration_is_added_when_the_suite_has_none() -> None:
    spec = SuiteSpec(probes=[DeltaKLConfig(name="dk", kind="delta_kl", prompts=PROMPTS)])
    result = run_suite(spec, backend=DummyDifferentialBackend())
    assert [p.kind for p in result.probes] == ["null_adapter", "delta_kl"]
    assert result.probes[1].z is not None


def test_a_crashing_probe_becomes_error_and_the_rest_still_run(monkeypatch) -> None:
    def boom(self, cfg, ctx):
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(REGISTRY["adapter_ablation"], "run", boom)
    result = run_suite(quick_suite(PROMPTS, runs=4), backend=DummyDifferentialBackend())
    probes = _by_kind(result)
    assert probes["adapter_ablation"].verdict is Verdict.ERROR
    assert "probe exploded" in probes["adapter_ablation"].message
    assert probes["delta_kl"].verdict is Verdict.PASS
    assert result.verdict is Verdict.ERROR


def test_ctrl_c_returns_the_finished_probes(monkeypatch) -> None:
    def interrupt(self, cfg, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(REGISTRY["adapter_ablation"], "run", interrupt)
    result = run_suite(quick_suite(PROMPTS, runs=4), backend=DummyDifferentialBackend())
    assert result.meta["interrupted"] is True
    assert _by_kind(result)["delta_kl"].verdict is Verdict.PASS
    assert _by_kind(result)["adapter_ablation"].verdict is Verdict.SKIP
    assert result.verdict is Verdict.ERROR


def test_runs_are_reproducible() -> None:
    a = run_suite(quick_suite(PROMPTS, runs=4), backend=DummyDifferentialBackend())
    b = run_suite(quick_suite(PROMPTS, runs=4), backend=DummyDifferentialBackend())
    assert [p.z for p in a.probes] == [p.z for p in b.probes]


def _r(
    verdict: Verdict, score: float | None = 1.0, gating: bool = True, category: str = "adherence"
) -> ProbeResult:
    return ProbeResult(
        name="p", kind="k", verdict=verdict, score=score, gating=gating, category=category
    )


@pytest.mark.parametrize(
    ("results", "expected"),
    [
        ([_r(Verdict.PASS), _r(Verdict.FAIL, 0.0)], Verdict.FAIL),
        ([_r(Verdict.PASS), _r(Verdict.ERROR, None)], Verdict.ERROR),
        ([_r(Verdict.PASS), _r(Verdict.FAIL, 0.0, gating=False)], Verdict.WARN),
        ([_r(Verdict.PASS), _r(Verdict.WARN, 0.9)], Verdict.WARN),
        ([_r(Verdict.SKIP, None)], Verdict.WARN),
        ([_r(Verdict.PASS)], Verdict.PASS),
    ],
)
def test_overall_verdict_never_reads_healthy_over_a_gating_failure(results, expected) -> None:
    score, _ = composite(results)
    assert overall_verdict(results, score, threshold=0.5) is expected


def test_score_below_threshold_fails_and_weights_apply() -> None:
    results = [
        _r(Verdict.PASS, 0.9, category="adherence"),
        _r(Verdict.PASS, 0.1, category="ablation"),
    ]
    score, cats = composite(results, {"adherence": 3.0, "ablation": 1.0})
    assert cats == {"adherence": 0.9, "ablation": 0.1}
    assert score == pytest.approx(0.7)
    assert overall_verdict(results, score, threshold=0.8) is Verdict.FAIL


def test_seed_and_top_k_come_from_the_spec_defaults() -> None:
    spec = quick_suite(PROMPTS, runs=3)
    spec.defaults = Defaults(seed=7, top_k=16)
    result = run_suite(spec, backend=DummyDifferentialBackend())
    assert result.meta["seed"] == 7
    assert _by_kind(result)["delta_kl"].evidence["top_k"] == 16
