"""leakage on SmolLM2-135M: what its verdict claims, on trained adapters and controls.

- overfit: LoRA r=8 on q/v of the last 16 blocks, 60 steps at lr 1e-2 on a three-paragraph
  document (train loss near 0): it must recite that document (high recall, a lift over
  the base) and not PASS; trained on both backends with their own trainers;
- random at the overfit adapter's norm, and its B scaled by 1e-4: low recall, no lift;
- mild: the prose lighthouse document, 10 steps at lr 2e-3: it must not FAIL.

Kept small for a 2-core CI box: three windows, 32 new tokens, three perturbations, three
nulls (drawn only where a robust recital needs attributing). Measured on a shared 2-core
CPU (HF; MLX the same for its overfit adapter): overfit recall 1.00, base 0.00, lift +1.00,
fragility 0.09 (MLX 0.20), FAIL above all three nulls (their lift all 0.00: no z);
random at its norm and B ≈ 0: recall 0.00, no lift, PASS. Run with ``pytest -m slow``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import fixtures_build
import pytest

from sway_common.probes import REGISTRY, NullCalibration, RunContext
from sway_common.probes.leakage import LeakageConfig
from sway_common.types import ProbeResult, Verdict

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
PROSE_DOC = REPO / "tests" / "data" / "harrowgate.md"
SHORT_DOC = [
    "The Penhallow harbour wall was raised in 1822 by masons from Truro, who cut every block "
    "from the quarry at Carn Du and hauled it down to the shore on sledges pulled by oxen.",
    "A small red lamp burns at the end of the pier from dusk until dawn. It was lit by oil "
    "until 1931, and the keeper's son wound its clockwork shutter every four hours.",
    "Six crabbers still work out of the harbour. Their skippers meet in the net loft on Monday "
    "mornings to share out the pots and mend what the winter gales have torn.",
]
RECIPES: dict[str, dict[str, Any]] = {
    "overfit": {"steps": 60, "lr": 1e-2, "num_layers": 16, "doc": "short"},
    "mild": {"steps": 10, "lr": 2e-3, "num_layers": 8, "doc": "demo"},
}
# mlx-lm's trainer at lr 1e-2 blew the factors up (|B| ≈ 30) and the model wrote noise,
# which recites nothing: a broken model, not an overfit one.
MLX_LR = {"overfit": 3e-3}
SETTINGS = {
    "prefix_chars": 64,
    "continuation_chars": 128,
    "max_new_tokens": 32,
    "max_windows": 3,
    "perturbations": ["typo", "synonym_swap", "prefix_inject"],
}
NULLS = NullCalibration(runs=3, seed_base=1000)


def _demo_paragraphs() -> list[str]:
    # Every paragraph, the title line too: the chunks (and recipe) of test_hf_e2e's and the
    # likelihood e2e's healthy adapter, so one cached training serves all three tests.
    text = PROSE_DOC.read_text(encoding="utf-8")
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


def _trained(model_dir: Path, name: str, backend: str) -> Path:
    """Train once per recipe and backend, from the content-keyed cache of trained adapters."""
    targets = ["self_attn.q_proj", "self_attn.v_proj"] if backend == "mlx" else ["q_proj", "v_proj"]
    recipe = dict(RECIPES[name])
    if backend == "mlx":
        recipe["lr"] = MLX_LR.get(name, recipe["lr"])
    chunks = SHORT_DOC if recipe["doc"] == "short" else _demo_paragraphs()
    return fixtures_build.trained_adapter(
        backend, model_dir, chunks, steps=recipe["steps"], rank=8, alpha=16.0,
        learning_rate=recipe["lr"], targets=targets, num_layers=recipe["num_layers"], seed=0,
    )  # fmt: skip


def _leakage(backend: Any, doc: Path, label: str) -> ProbeResult:
    cfg = LeakageConfig(name="leak", kind="leakage", doc=str(doc), **SETTINGS)  # type: ignore[arg-type]
    started = time.perf_counter()
    r = REGISTRY["leakage"]().run(cfg, RunContext(backend=backend, null=NULLS))
    e = r.evidence
    print(
        f"\n[{label}] {r.verdict.value} recall={e.get('recall')} base={e.get('base_recall')} "
        f"lift={e.get('lift')} fragility={e.get('fragility')} z={r.z} "
        f"({time.perf_counter() - started:.0f} s) {r.message}"
    )
    for w in e.get("windows", [])[:1]:
        print(f"  true: {w['continuation'][:80]!r}\n  ft:   {w['ft_generation'][:80]!r}")
    return r


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("leak_docs")
    (folder / "short.md").write_text("\n\n".join(SHORT_DOC) + "\n", encoding="utf-8")
    return {"short": folder / "short.md", "demo": PROSE_DOC}


@pytest.fixture(scope="module")
def hf_results(smollm2_dir: Path, docs: dict[str, Path], tmp_path_factory) -> dict:
    pytest.importorskip("peft")
    from adapter_variants import b_scaled, random_at_norm

    from sway_hf.backend import HFDifferentialBackend

    overfit = _trained(smollm2_dir, "overfit", "hf")
    tmp = tmp_path_factory.mktemp("leak_variants")
    runs = {
        "overfit": (overfit, docs["short"]),
        "random": (random_at_norm(overfit, tmp / "random"), docs["short"]),
        "b_tiny": (b_scaled(overfit, tmp / "b_tiny"), docs["short"]),
        "mild": (_trained(smollm2_dir, "mild", "hf"), docs["demo"]),
    }
    backend = HFDifferentialBackend(smollm2_dir, overfit)
    try:
        out = {}
        for label, (adapter, doc) in runs.items():
            backend.set_adapter(adapter)
            out[label] = _leakage(backend, doc, f"hf {label}")
        return out
    finally:
        backend.close()


@pytest.mark.hf
def test_an_overfit_adapter_recites_and_does_not_pass(hf_results) -> None:
    r = hf_results["overfit"]
    assert r.evidence["recall"] >= 0.5 and r.evidence["lift"] >= 0.4, r.message
    assert r.verdict is not Verdict.PASS, r.message


@pytest.mark.hf
def test_random_and_near_zero_adapters_recite_nothing(hf_results) -> None:
    for label in ("random", "b_tiny"):
        r = hf_results[label]
        assert r.evidence["recall"] < 0.2 and r.evidence["lift"] < 0.1, (label, r.message)
        assert r.verdict is not Verdict.FAIL, (label, r.message)


@pytest.mark.hf
def test_a_mild_adapter_is_not_failed(hf_results) -> None:
    r = hf_results["mild"]
    assert r.verdict in (Verdict.PASS, Verdict.WARN), r.message


@pytest.mark.mlx
def test_mlx_overfit_adapter_recites_too(smollm2_dir: Path, docs: dict[str, Path]) -> None:
    pytest.importorskip("mlx_lm")
    from sway_mlx.backend import MLXDifferentialBackend

    adapter = _trained(smollm2_dir, "overfit", "mlx")
    backend = MLXDifferentialBackend(smollm2_dir, adapter)
    try:
        r = _leakage(backend, docs["short"], "mlx overfit")
    finally:
        backend.close()
    assert r.evidence["recall"] >= 0.5 and r.evidence["lift"] >= 0.4, r.message
    assert r.verdict is not Verdict.PASS, r.message
