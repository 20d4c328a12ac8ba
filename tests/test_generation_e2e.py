"""End to end on SmolLM2-135M: style_fingerprint and adapter_revert, and what their verdicts claim.

One adapter is trained (PEFT, LoRA r=8 on q/v of the last 8 blocks) on a keeper's log
written in a style the base model does not write in: dated entries of short lines,
bullets and numbers. Fed in as "the adapter":

- healthy, the trained one: neither probe may FAIL it, on HF and on MLX;
- random: Gaussian factors at the trained adapter's per-module norm; B ≈ 0: its B scaled
  by 1e-4. Neither probe may PASS either.

Lean on purpose (three prompts, short continuations, K=3 nulls): it runs in CI on two
cores. Run with ``pytest -m slow``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

import fixtures_build  # noqa: E402
from adapter_variants import b_scaled, random_at_norm  # noqa: E402

from sway_common.suite.runner import run_suite  # noqa: E402
from sway_common.suite.spec import parse_spec  # noqa: E402
from sway_common.types import Verdict  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.hf]

LOG = [
    "9 March 1861.\nWind NE, force 4.\n- Lamp lit 17:40.\n- Oil: 3 gal.\nSea heavy. Two brigs south.\nAll well.",
    "10 March 1861.\nWind N, force 6.\n- Lamp lit 17:42.\n- Oil: 3 gal.\nRain. No ships.\nAll well.",
    "14 March 1861.\nWind E, force 2.\n- Lamp lit 17:50.\n- Wick trimmed 23:00.\nFog at dawn. One lugger.\nAll well.",
    "2 April 1861.\nWind SW, force 5.\n- Lamp lit 18:31.\n- Glass cleaned.\nSwell high. Three sail east.\nAll well.",
    "18 April 1861.\nWind W, force 3.\n- Lamp lit 18:55.\n- Oil: 2 gal.\nClear. Fishing fleet out.\nAll well.",
    "1 May 1861.\nWind S, force 1.\n- Lamp lit 19:20.\n- Paint on gallery.\nCalm. Silas to town.\nAll well.",
]
RECIPE = {"steps": 16, "lr": 6e-3, "rank": 8, "alpha": 16.0, "layers": 8}
PROMPTS = [
    "The keeper wrote in the ledger:",
    "Notes from the lighthouse, 3 June 1861.",
    "Report for the week:",
]
CASES = [
    {"prompt": "Ledger, 5 May 1861.", "gold": "Wind NW, force 3.\n- Lamp lit 19:25.\n- Oil: 2 gal.\nAll well.",
     "paraphrases": ["The keeper's entry for 5 May 1861:", "What the lighthouse log says for the fifth of May:"]},
    {"prompt": "Ledger, 20 June 1861.", "gold": "Wind S, force 2.\n- Lamp lit 20:10.\nCalm. Two sail west.\nAll well.",
     "paraphrases": ["Entry in the lighthouse ledger, 20 June 1861:", "On the twentieth of June the keeper recorded"]},
]  # fmt: skip
SUITE = [
    {"name": "nulls", "kind": "null_adapter", "runs": 3, "prompts": PROMPTS},
    {"name": "style", "kind": "style_fingerprint", "prompts": PROMPTS,
     "doc_reference": "\n\n".join(LOG), "max_new_tokens": 40},
    {"name": "revert", "kind": "adapter_revert", "cases": CASES, "max_new_tokens": 24},
]  # fmt: skip
KINDS = ("style_fingerprint", "adapter_revert")


@pytest.fixture(scope="module")
def adapters(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # Trained once per recipe (content-keyed cache shared by the e2e modules).
    healthy = fixtures_build.trained_adapter(
        "hf", smollm2_dir, LOG, steps=RECIPE["steps"], rank=RECIPE["rank"], alpha=RECIPE["alpha"],
        learning_rate=RECIPE["lr"], targets=["q_proj", "v_proj"], num_layers=RECIPE["layers"],
        seed=0,
    )  # fmt: skip
    tmp = tmp_path_factory.mktemp("generation_variants")
    return {
        "healthy": healthy,
        "random": random_at_norm(healthy, tmp / "random"),
        "b_tiny": b_scaled(healthy, tmp / "b_tiny"),
    }


def _run(backend, adapter: Path, label: str) -> dict:
    spec = parse_spec(
        {"version": 1, "models": {"ft": {"base": "b", "adapter": "a"}}, "suite": SUITE}
    )
    backend.set_adapter(adapter)
    started = time.perf_counter()
    result = run_suite(spec, backend=backend)
    for p in result.probes:
        print(f"\n[{label}] {p.kind}: {p.verdict.value} raw={p.raw} z={p.z} {p.message}")
    print(f"[{label}] {time.perf_counter() - started:.1f} s")
    return {p.kind: p for p in result.probes}


@pytest.fixture(scope="module")
def hf_results(smollm2_dir: Path, adapters: dict[str, Path]) -> dict:
    from sway_hf.backend import HFDifferentialBackend

    backend = HFDifferentialBackend(smollm2_dir, adapters["healthy"])
    try:
        return {label: _run(backend, path, label) for label, path in adapters.items()}
    finally:
        backend.close()


@pytest.mark.parametrize("kind", KINDS)
def test_the_trained_adapter_is_not_failed(hf_results, kind: str) -> None:
    r = hf_results["healthy"][kind]
    assert r.verdict in (Verdict.PASS, Verdict.WARN), r.message


def test_the_trained_adapter_shifts_the_style_toward_its_document(hf_results) -> None:
    r = hf_results["healthy"]["style_fingerprint"]
    assert r.raw is not None and r.raw >= 0.25, r.message


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("label", ["random", "b_tiny"])
def test_random_and_near_zero_adapters_pass_nothing(hf_results, label: str, kind: str) -> None:
    r = hf_results[label][kind]
    assert r.verdict not in (Verdict.PASS, Verdict.ERROR), f"{label}: {r.message}"


@pytest.mark.mlx
def test_mlx_reaches_the_same_claims_on_the_trained_adapter(
    smollm2_dir: Path, adapters: dict[str, Path], hf_results
) -> None:
    pytest.importorskip("mlx_lm")
    from sway_mlx.backend import MLXDifferentialBackend

    backend = MLXDifferentialBackend(smollm2_dir, adapters["healthy"])
    try:
        by_kind = _run(backend, adapters["healthy"], "mlx_healthy")
    finally:
        backend.close()
    for kind in KINDS:
        assert by_kind[kind].verdict in (Verdict.PASS, Verdict.WARN), by_kind[kind].message
    assert by_kind["style_fingerprint"].raw >= 0.25, by_kind["style_fingerprint"].message
