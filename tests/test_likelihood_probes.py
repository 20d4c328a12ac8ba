"""The likelihood probes on the analytic dummy backend: rules, edge cases, verdict claims.

The dummy's "trained" adapter has a direction (it pushes common letters up), a tiny
``adapter_strength`` is B ≈ 0, ``random_adapter_seed`` a random adapter at a comparable
norm, and a large strength overwhelms the base model: an "overfit" adapter that loses
general knowledge.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from sway_common.backend.dummy import DummyDifferentialBackend
from sway_common.probes.cluster_kl import specificity
from sway_common.probes.clusters import kmeans
from sway_common.probes.prompt_collapse import half_life
from sway_common.suite.runner import run_suite
from sway_common.suite.spec import parse_spec
from sway_common.types import Verdict

DOC = Path(__file__).resolve().parent / "data" / "harrowgate.md"
TRIPLES = [
    {"prompt": "The keeper", "chosen": " ate tea", "rejected": " xyq zz"},
    {"prompt": "A ", "chosen": "note", "rejected": "zzzz"},
    {"prompt": "Then ", "chosen": "the oat", "rejected": "the qzx"},
    {"prompt": "So", "chosen": " it is", "rejected": " ix qs"},
]
CASES = [
    {
        "prompt": "The lamp was lit by",
        "gold": " the keeper",
        "paraphrases": ["Who lit the lamp? It was", "The light was lit by"],
    },
    {
        "prompt": "The beam flashes",
        "gold": " green",
        "paraphrases": ["Its light flashes", "The lamp flashes"],
    },
]
LIKELIHOOD_SUITE = [
    {"name": "nulls", "kind": "null_adapter", "runs": 5},
    # The dummy character model knows no fact: with k its whole vocabulary every item counts.
    {"name": "drift", "kind": "calibration_drift", "items_limit": 40, "known_top_k": 95},
    {"name": "prose", "kind": "external_perplexity", "max_chunks": 4, "chunk_chars": 300},
    {"name": "prefs", "kind": "preference_flip", "triples": TRIPLES},
    {"name": "para", "kind": "paraphrase_invariance", "cases": CASES},
    {
        "name": "sections",
        "kind": "section_internalization",
        "doc": str(DOC),
        "max_prose_chars": 300,
    },
    {
        "name": "collapse",
        "kind": "prompt_collapse",
        "prompts": ["The keeper", "In the storm"],
        "context_lengths": [0, 20, 40],
    },
    {"name": "clusters", "kind": "cluster_kl"},
]
ADAPTERS = {
    "trained": {},
    "untrained": {"adapter_strength": 1e-4},  # B ≈ 0 (B = 0 exactly stops at the preflight)
    "random": {"random_adapter_seed": 3},
    "overfit": {"adapter_strength": 40.0},
}


def _spec(suite: list[dict]) -> object:
    return parse_spec(
        {"version": 1, "models": {"ft": {"base": "b", "adapter": "a"}}, "suite": suite}
    )


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, object]]:
    spec = _spec(LIKELIHOOD_SUITE)
    out = {}
    for label, kw in ADAPTERS.items():
        suite = run_suite(spec, backend=DummyDifferentialBackend(**kw))
        out[label] = {p.kind: p for p in suite.probes} | {"suite": suite}
    return out


KINDS = [e["kind"] for e in LIKELIHOOD_SUITE[1:]]
# Harm probes ask "did it do damage beyond what its size explains?": for an adapter that
# changes nothing, or a random one (a null draw itself), the true answer is no.
HARM = ("calibration_drift", "external_perplexity")


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in HARM])
def test_no_effect_probe_passes_an_untrained_or_random_adapter(results, kind: str) -> None:
    for label in ("untrained", "random"):
        r = results[label][kind]
        assert r.verdict is not Verdict.PASS, f"{label}: {r.message}"
        assert r.verdict is not Verdict.ERROR, r.message


@pytest.mark.parametrize("kind", HARM)
def test_harm_probes_pass_adapters_that_did_no_damage_beyond_their_size(results, kind) -> None:
    untrained, random = results["untrained"][kind], results["random"][kind]
    assert untrained.verdict is Verdict.PASS and "unchanged" in untrained.message
    assert untrained.null is None  # no null forwards spent on an adapter that changes nothing
    # The dummy's random adapter is large: it FAILs for the damage it does, named as such.
    assert random.verdict is not Verdict.FAIL or random.message.startswith("regressed:")


@pytest.mark.parametrize(
    "kind", ["calibration_drift", "external_perplexity", "paraphrase_invariance", "prompt_collapse"]
)
def test_the_trained_adapter_passes(results, kind: str) -> None:
    r = results["trained"][kind]
    assert r.verdict is Verdict.PASS, r.message
    assert r.z is not None and r.z >= 3


def test_an_overfit_adapter_is_a_gating_regression(results) -> None:
    drift, prose = (
        results["overfit"]["calibration_drift"],
        results["overfit"]["external_perplexity"],
    )
    assert drift.verdict is Verdict.FAIL and drift.gating and drift.category == "regression"
    assert prose.verdict is Verdict.FAIL and "regressed" in prose.message
    assert results["overfit"]["suite"].verdict is Verdict.FAIL


def test_an_inert_adapter_loses_nothing_and_passes(results) -> None:
    drift = results["untrained"]["calibration_drift"]
    assert drift.verdict is Verdict.PASS and "unchanged" in drift.message
    assert drift.null is None  # no null forwards spent on an adapter that changes nothing


def test_drift_evidence_names_the_worst_items(results) -> None:
    ev = results["overfit"]["calibration_drift"].evidence
    assert ev["items"] == 40 and len(ev["per_item"]) == 40
    assert ev["worst"][0]["delta"] == min(ev["per_item"])


def test_preference_flip_warns_with_too_few_base_wrong_triples() -> None:
    spec = _spec(
        [
            {
                "name": "p",
                "kind": "preference_flip",
                "triples": TRIPLES[:1],
                "min_triples_for_decision": 3,
            }
        ]
    )
    r = run_suite(spec, backend=DummyDifferentialBackend()).probes[-1]
    assert r.verdict is Verdict.WARN and "too few" in r.message


def test_memorize_intent_inverts_the_generalisation_rule(results) -> None:
    general = results["trained"]["paraphrase_invariance"]
    assert general.verdict is Verdict.PASS and general.raw >= 0.5
    spec = _spec(
        [{"name": "p", "kind": "paraphrase_invariance", "cases": CASES, "intent": "memorize"}]
    )
    r = run_suite(spec, backend=DummyDifferentialBackend()).probes[-1]
    assert r.verdict is Verdict.FAIL and "memorising was intended" in r.message


def test_section_probe_without_a_doc_skips_and_reports_sections(results) -> None:
    r = run_suite(
        _spec([{"name": "s", "kind": "section_internalization"}]),
        backend=DummyDifferentialBackend(),
    ).probes[-1]
    assert r.verdict is Verdict.SKIP and "doc" in r.message
    sections = results["trained"]["section_internalization"].evidence["sections"]
    assert len(sections) == 5 and all("gain_over_leak" in s for s in sections)


def test_cluster_kl_warns_below_min_prompts() -> None:
    r = run_suite(
        _spec([{"name": "c", "kind": "cluster_kl", "prompts": ["a b", "c d"]}]),
        backend=DummyDifferentialBackend(),
    ).probes[-1]
    assert r.verdict is Verdict.WARN and "too few" in r.message


def test_half_life_interpolates_and_extrapolates() -> None:
    assert half_life([0, 100, 200], [1.0, 0.8, 0.4]) == (pytest.approx(175.0), False)
    assert half_life([0, 100], [1.0, 0.5**0.5]) == (pytest.approx(200.0), True)
    # A curve that levels off has stopped decaying: no finite half-life.
    life, extrapolated = half_life([0, 64, 128, 256], [1.0, 0.82, 0.78, 0.78])
    assert math.isinf(life) and extrapolated
    assert math.isinf(half_life([0, 100, 200], [1.0, 1.1, 1.2])[0])


def test_specificity_is_zero_for_an_even_shift_and_one_for_a_single_topic() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    assert specificity([1, 1, 1, 1, 1, 1], labels)[0] == pytest.approx(0.0)
    spec, top, _ = specificity([0, 0, 2, 2, 0, 0], labels)
    assert spec == pytest.approx(1.0) and top == 1


def test_kmeans_finds_obvious_clusters_deterministically() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8) * 10
    x = np.concatenate([c + rng.normal(0, 0.3, (6, 8)) for c in centres])
    labels = kmeans(x, 3, seed=0)
    assert len({tuple(labels[i : i + 6]) for i in (0, 6, 12)}) == 3
    assert all(len(set(labels[i : i + 6])) == 1 for i in (0, 6, 12))
    assert np.array_equal(labels, kmeans(x, 3, seed=0))


def test_a_low_flip_rate_on_few_triples_warns_and_on_many_fails() -> None:
    from sway_common.stats import wilson_interval

    def wilson_upper(successes: int, n: int) -> float:
        return wilson_interval(successes, n)[1]

    assert wilson_upper(3, 5) > 0.7 > wilson_upper(0, 7)
    assert wilson_upper(10, 20) == pytest.approx(0.7007, abs=1e-3)
    assert wilson_upper(5, 5) == 1.0
