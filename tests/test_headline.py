"""The one-line summary a person acts on, for each kind of outcome."""

from __future__ import annotations

from sway_common.backend.dummy import DummyDifferentialBackend
from sway_common.report import headline
from sway_common.suite.runner import run_suite
from sway_common.suite.spec import quick_suite
from sway_common.types import NullStats, ProbeResult, SuiteResult, Verdict

PROMPTS = ["The keeper said", "In the storm", "A ledger entry:", "Tell me about the light"]


def _line(**backend_kw) -> str:
    return headline(
        run_suite(quick_suite(PROMPTS, runs=5), backend=DummyDifferentialBackend(**backend_kw))
    )


def test_trained_adapter_reads_as_sigmas_above_its_null() -> None:
    line = _line()
    assert line.startswith("adapter is ") and "σ above its null on 4 prompts" in line
    assert "× a random adapter of the same size" in line


def test_untrained_adapter_reads_as_a_no_op() -> None:
    line = _line(adapter_strength=0.0)
    assert (
        line.startswith("the adapter is a no-op: ΔW = scale·B·A is zero")
        and "no probe was run" in line
    )


def test_random_adapter_reads_as_indistinguishable() -> None:
    line = _line(random_adapter_seed=0)
    assert line.startswith("adapter is indistinguishable from a null adapter (z=")
    assert "on 4 prompts); but it lost general knowledge" in line


def test_nan_adapter_reads_as_not_evaluated() -> None:
    line = _line(nan_adapter=True)
    assert line.startswith("adapter could not be evaluated:") and "NaN" in line


def test_significant_but_negligible_says_so() -> None:
    dk = ProbeResult(
        name="dk",
        kind="delta_kl",
        verdict=Verdict.FAIL,
        raw=2.9e-4,
        z=6.6,
        effect_ratio=2.8,
        null=NullStats(mean=1e-4, std=2.4e-5, n=8),
        evidence={"per_prompt": [0.0] * 8},
    )
    line = headline(SuiteResult(probes=[dk], verdict=Verdict.FAIL, score=0.1))
    assert "6.6σ above its null on 8 prompts but its effect is negligible" in line


def test_z_past_what_k_draws_support_is_shown_as_a_bound() -> None:
    dk = ProbeResult(
        name="dk",
        kind="delta_kl",
        verdict=Verdict.PASS,
        raw=0.18,
        z=2840.0,
        effect_ratio=52.0,
        null=NullStats(mean=3e-3, std=1e-4, n=3),
        evidence={"per_prompt": [0.18] * 8},
    )
    line = headline(SuiteResult(probes=[dk], verdict=Verdict.PASS, score=1.0))
    assert line.startswith("adapter is > 50.0σ above its null on 8 prompts") and "2840" not in line


def test_an_interrupted_run_is_never_a_verdict_on_the_adapter() -> None:
    dk = ProbeResult(
        name="dk", kind="delta_kl", verdict=Verdict.SKIP, message="not run: interrupted"
    )
    result = SuiteResult(probes=[dk], verdict=Verdict.ERROR, score=None, meta={"interrupted": True})
    assert headline(result) == "interrupted after 0 of 1 probes: no verdict on the adapter"


def test_half_precision_names_its_rounding_and_the_fix() -> None:
    """A light adapter can read as a null in bfloat16 (docs/statistics.md): the line says
    the run was in half precision and what to try; in float32 it says nothing of it."""
    result = run_suite(
        quick_suite(PROMPTS, runs=5), backend=DummyDifferentialBackend(random_adapter_seed=0)
    )
    assert "--dtype" not in headline(result)
    result.meta["dtype"] = "bfloat16"
    line = headline(result)
    assert "indistinguishable" in line
    assert "run in bfloat16, whose rounding moves every adapter: try --dtype float32" in line
    result.meta["dtype"] = "float32"
    assert "--dtype" not in headline(result)
