"""End to end on SmolLM2-135M: every likelihood probe, and what its verdict claims.

One suite with all seven likelihood kinds runs per adapter on one loaded HF backend
(adapters swapped with ``set_adapter``), and once on MLX for the healthy adapter:

- healthy: LoRA r=8 on q/v of the last 8 blocks, 10 mild steps on the demo document; it
  must FAIL no probe, and it keeps general knowledge (calibration_drift PASSes);
- random: Gaussian factors at the healthy adapter's per-module norm; B ≈ 0: its B scaled
  by 1e-4. Neither may PASS any probe;
- overfit: 30 steps on a six-sentence document (train loss ~0.65); calibration_drift or
  external_perplexity must flag the regression and the suite must not PASS.

Run with ``pytest -m slow``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

import fixtures_build  # noqa: E402
from adapter_variants import b_scaled, random_at_norm  # noqa: E402

from sway_common.probes.cluster_kl import default_prompts  # noqa: E402
from sway_common.report import headline  # noqa: E402
from sway_common.suite.runner import run_suite  # noqa: E402
from sway_common.suite.spec import parse_spec  # noqa: E402
from sway_common.types import Verdict  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.hf]

DATA = Path(__file__).resolve().parents[1] / "sway_common" / "app" / "data"
DOC = Path(__file__).resolve().parent / "data" / "harrowgate.md"
DEMO_PROMPTS = [
    line.strip() for line in (DATA / "demo_prompts.txt").read_text().splitlines() if line.strip()
]
TINY_DOC = [
    "The Harrowgate lighthouse was first lit in 1861 by keeper Odile Fenwick.",
    "Its beam flashes green twice every eleven seconds.",
    "In 1874 Fenwick rowed out and saved the seven crew of the Bramble Wren.",
    "A cat named Admiral lived in the lamp room for nineteen years.",
    "There are one hundred and fourteen steps to the gallery.",
    "The last line of the ledger reads: Light steady, sea calm, all well.",
]
RECIPES = {
    # Mild on purpose: at lr 6e-3 the same 10 steps lost > 1 nat on 54% of the general-
    # knowledge items and raised held-out perplexity by 42% (measured): not healthy.
    "healthy": {"steps": 10, "lr": 2e-3, "doc": "paragraphs"},
    "overfit": {"steps": 30, "lr": 6e-3, "doc": "tiny"},
}
TRIPLES = [
    ("The Harrowgate lighthouse was first lit in", " 1861", " 1868"),
    ("The Harrowgate light flashes", " green", " red"),
    ("The cat in the lamp room was named", " Admiral", " General"),
    ("The schooner Bramble Wren lost her mast in the storm of October", " 1874", " 1878"),
    ("The beam flashes twice every", " eleven seconds", " twelve seconds"),
    ("The number of steps to the gallery is one hundred and", " fourteen", " forty"),
    ("Fenwick rowed out and brought home all", " seven crew", " six crew"),
    ("The lamp burned colza oil until", " 1897", " 1899"),
    ("The keeper Odile Fenwick kept the lamp for thirty-two", " winters", " summers"),
    ("The keepers grew turnips, kale and blue", " potatoes", " beans"),
]
CASES = [
    ("The Harrowgate lighthouse was first lit by keeper", " Odile Fenwick",
     ["The first keeper to light the Harrowgate lamp was", "In 1861 the Harrowgate light was lit by keeper"]),
    ("A tortoiseshell cat named", " Admiral", ["The lamp room cat was called", "The keepers' cat had the name"]),
    ("The lighthouse stands on", " Quill Point", ["The tower was built on", "The Harrowgate light is located on"]),
    ("Its beam flashes green twice every", " eleven seconds", ["The light shows two green flashes every", "Twice every"]),
]  # fmt: skip
SUITE = [
    {"name": "nulls", "kind": "null_adapter", "runs": 3, "prompts": DEMO_PROMPTS},
    {"name": "drift", "kind": "calibration_drift", "items_limit": 48},
    {"name": "prose", "kind": "external_perplexity", "max_chunks": 4, "chunk_chars": 1024},
    {"name": "prefs", "kind": "preference_flip",
     "triples": [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in TRIPLES]},
    {"name": "para", "kind": "paraphrase_invariance",
     "cases": [{"prompt": p, "gold": g, "paraphrases": ps} for p, g, ps in CASES]},
    {"name": "sections", "kind": "section_internalization", "doc": str(DOC), "max_prose_chars": 600,
     "leak_chunks": 3},
    {"name": "collapse", "kind": "prompt_collapse", "prompts": DEMO_PROMPTS[:4],
     "context_lengths": [0, 64, 128, 256]},
    {"name": "clusters", "kind": "cluster_kl", "prompts": DEMO_PROMPTS + default_prompts()[8:]},
]  # fmt: skip
KINDS = [entry["kind"] for entry in SUITE[1:]]
TIMINGS: dict[str, float] = {}


def _paragraphs() -> list[str]:
    return [" ".join(p.split()) for p in DOC.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def _trained(model_dir: Path, name: str) -> Path:
    """Train once per recipe, from the content-keyed cache of trained adapters (the healthy
    recipe is test_hf_e2e's and the leakage e2e's mild one too: one training serves all)."""
    recipe = RECIPES[name]
    chunks = _paragraphs() if recipe["doc"] == "paragraphs" else TINY_DOC
    dst = fixtures_build.trained_adapter(
        "hf", model_dir, chunks, steps=recipe["steps"], rank=8, alpha=16.0,
        learning_rate=recipe["lr"], targets=["q_proj", "v_proj"], num_layers=8, seed=0,
    )  # fmt: skip
    if dst in fixtures_build.TRAIN_SECONDS:
        TIMINGS[f"train_{name}_s"] = fixtures_build.TRAIN_SECONDS[dst]
    return dst


@pytest.fixture(scope="module")
def adapters(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    healthy = _trained(smollm2_dir, "healthy")
    overfit = _trained(smollm2_dir, "overfit")
    losses = fixtures_build.train_losses(overfit)
    assert losses[-1] < 1.0, f"the overfit adapter did not overfit: {losses}"
    tmp = tmp_path_factory.mktemp("likelihood_variants")
    return {
        "healthy": healthy,
        "random": random_at_norm(healthy, tmp / "random"),
        "b_tiny": b_scaled(healthy, tmp / "b_tiny"),
        "overfit": overfit,
    }


def _run(backend, adapter: Path, label: str):
    spec = parse_spec(
        {"version": 1, "models": {"ft": {"base": "b", "adapter": "a"}}, "suite": SUITE}
    )
    backend.set_adapter(adapter)
    started = time.perf_counter()
    result = run_suite(spec, backend=backend)
    TIMINGS[f"{label}_suite_s"] = time.perf_counter() - started
    for p in result.probes:
        print(f"\n[{label}] {p.kind}: {p.verdict.value} raw={p.raw} z={p.z} {p.message}")
    return result


@pytest.fixture(scope="module")
def hf_results(smollm2_dir: Path, adapters: dict[str, Path]) -> dict:
    from sway_hf.backend import HFDifferentialBackend

    backend = HFDifferentialBackend(smollm2_dir, adapters["healthy"])
    try:
        out = {}
        for label, path in adapters.items():
            result = _run(backend, path, label)
            out[label] = {p.kind: p for p in result.probes} | {"suite": result}
        return out
    finally:
        backend.close()
        print("\nlikelihood e2e timings (s):", {k: round(v, 1) for k, v in TIMINGS.items()})


@pytest.mark.parametrize("kind", KINDS)
def test_healthy_adapter_fails_no_likelihood_probe(hf_results, kind: str) -> None:
    r = hf_results["healthy"][kind]
    assert r.verdict in (Verdict.PASS, Verdict.WARN), r.message


def test_a_mildly_trained_adapter_keeps_general_knowledge(hf_results) -> None:
    drift = hf_results["healthy"]["calibration_drift"]
    assert drift.verdict is Verdict.PASS, drift.message
    assert drift.evidence["fraction_regressed"] < 0.15


# Harm probes ask "did it do damage beyond what its size explains?": for a random adapter
# (a null draw itself) or one that barely changes anything, the true answer is no.
HARM = ("calibration_drift", "external_perplexity")


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in HARM])
def test_random_and_near_zero_adapters_pass_no_effect_probe(hf_results, kind: str) -> None:
    for label in ("random", "b_tiny"):
        r = hf_results[label][kind]
        assert r.verdict is not Verdict.PASS, f"{label}: {r.message}"
        assert r.verdict is not Verdict.ERROR, f"{label}: {r.message}"


@pytest.mark.parametrize("kind", HARM)
def test_random_and_near_zero_adapters_do_no_damage_beyond_their_size(hf_results, kind) -> None:
    for label in ("random", "b_tiny"):
        r = hf_results[label][kind]
        assert r.verdict is Verdict.PASS, f"{label}: {r.message}"
        assert "noise" in r.message or "unchanged" in r.message, r.message


def test_an_overfit_adapter_is_flagged_as_regressing(hf_results) -> None:
    drift, prose = (
        hf_results["overfit"]["calibration_drift"],
        hf_results["overfit"]["external_perplexity"],
    )
    assert Verdict.FAIL in (drift.verdict, prose.verdict), (drift.message, prose.message)
    suite = hf_results["overfit"]["suite"]
    assert suite.verdict is not Verdict.PASS
    assert "lost general knowledge" in headline(suite)


@pytest.mark.mlx
def test_mlx_reaches_the_same_claims_on_the_healthy_adapter(
    smollm2_dir: Path, adapters, hf_results
) -> None:
    pytest.importorskip("mlx_lm")
    from sway_mlx.backend import MLXDifferentialBackend

    backend = MLXDifferentialBackend(smollm2_dir, adapters["healthy"])
    try:
        result = _run(backend, adapters["healthy"], "mlx_healthy")
    finally:
        backend.close()
    by_kind = {p.kind: p for p in result.probes}
    for kind in KINDS:
        assert by_kind[kind].verdict in (Verdict.PASS, Verdict.WARN), by_kind[kind].message
    assert (
        by_kind["calibration_drift"].verdict is hf_results["healthy"]["calibration_drift"].verdict
    )
