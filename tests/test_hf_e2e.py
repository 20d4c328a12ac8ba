"""End to end on SmolLM2-135M: train a LoRA on the demo document, then run the quick suite.

A trained adapter must stand out from its nulls on the document's prompts; an untrained
one (B = 0) must not PASS; a NaN adapter must end as a single ERROR. One backend is
loaded once and the adapters are swapped in with ``set_adapter``, as ``checkpoints``
does. Run with ``pytest -m slow``.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")


import fixtures_build  # noqa: E402  (tests/ is on sys.path through conftest)

from sway_common.null_cache import NullCache  # noqa: E402
from sway_common.suite.runner import run_suite  # noqa: E402
from sway_common.suite.spec import quick_suite  # noqa: E402
from sway_common.types import Verdict  # noqa: E402
from sway_hf.backend import HFDifferentialBackend  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.hf]

DATA = Path(__file__).resolve().parents[1] / "sway_common" / "app" / "data"
# The prose account of the lighthouse that the tests train on (the demo trains on its ledger).
PROSE_DOC = Path(__file__).resolve().parent / "data" / "harrowgate.md"
# A mild recipe: at lr 6e-3 these 10 steps lost > 1 nat on 54% of the built-in general-
# knowledge items and raised held-out perplexity by 42% (measured), which the quick eval's
# regression checks now rightly FAIL; the "trained" adapter here stands for a healthy one.
TRAIN = {
    "r": 8,
    "alpha": 16.0,
    "targets": ["q_proj", "v_proj"],
    "num_layers": 8,
    "steps": 10,
    "lr": 2e-3,
    "seed": 0,
}
TIMINGS: dict[str, float] = {}


def _prompts() -> list[str]:
    lines = (DATA / "demo_prompts.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _paragraphs() -> list[str]:
    text = PROSE_DOC.read_text(encoding="utf-8")
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


def _lora_model(model_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(TRAIN["seed"])
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = LoraConfig(
        r=TRAIN["r"],
        lora_alpha=TRAIN["alpha"],
        target_modules=TRAIN["targets"],
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # PEFT trips a transformers v5 deprecation notice
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, cfg)


@pytest.fixture(scope="module")
def trained_adapter(smollm2_dir: Path) -> Path:
    """q_proj/v_proj r=8 on the last 8 blocks, full-batch AdamW on the demo document.

    Training takes most of this test's time on a 2-core CPU, so the adapter comes from
    the content-keyed cache of trained adapters (recipe, document, model, trainer and
    framework versions): the likelihood and leakage e2e tests train this same recipe
    on this same document, and one training serves all three.
    """
    dst = fixtures_build.trained_adapter(
        "hf",
        smollm2_dir,
        _paragraphs(),
        steps=TRAIN["steps"],
        rank=TRAIN["r"],
        alpha=TRAIN["alpha"],
        learning_rate=TRAIN["lr"],
        targets=TRAIN["targets"],
        num_layers=TRAIN["num_layers"],
        seed=TRAIN["seed"],
    )
    if dst in fixtures_build.TRAIN_SECONDS:
        TIMINGS["train_s"] = fixtures_build.TRAIN_SECONDS[dst]
    losses = fixtures_build.train_losses(dst)
    assert losses[-1] < 0.9 * losses[0], f"training did not bite: {losses}"
    return dst


@pytest.fixture(scope="module")
def untrained_adapter(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh PEFT LoRA saved without training: B = 0, so ΔW = 0."""
    dst = tmp_path_factory.mktemp("smollm2_untrained")
    _lora_model(smollm2_dir).save_pretrained(str(dst))
    return dst


@pytest.fixture(scope="module")
def backend(smollm2_dir: Path, trained_adapter: Path):
    started = time.perf_counter()
    b = HFDifferentialBackend(smollm2_dir, trained_adapter)
    TIMINGS["load_s"] = time.perf_counter() - started
    yield b
    b.close()
    print("\nHF e2e timings (s):", {k: round(v, 1) for k, v in TIMINGS.items()})


def _run(backend: HFDifferentialBackend, adapter: Path, label: str):
    started = time.perf_counter()
    backend.set_adapter(adapter)
    # The session's null cache, the one `sway-mlx eval` reads: the quick eval below runs
    # this very suite (same prompts, runs, adapter and backend) and reuses these nulls.
    cache = NullCache(os.environ["SWAY_MLX_NULL_CACHE"])
    result = run_suite(quick_suite(_prompts(), runs=8), backend=backend, null_cache=cache)
    TIMINGS[f"{label}_suite_s"] = time.perf_counter() - started
    for p in result.probes:
        print(f"\n[{label}] {p.kind}: {p.verdict.value} z={p.z} {p.message}")
    return result


def test_trained_adapter_stands_out(backend, trained_adapter: Path) -> None:
    result = _run(backend, trained_adapter, "trained")
    delta = next(p for p in result.probes if p.kind == "delta_kl")
    assert delta.z is not None and delta.z >= 3, delta.message
    assert delta.verdict is Verdict.PASS, delta.message


def test_untrained_adapter_is_a_no_op_before_any_probe(backend, untrained_adapter: Path) -> None:
    result = _run(backend, untrained_adapter, "untrained")
    assert [(p.kind, p.verdict) for p in result.probes] == [("preflight", Verdict.FAIL)]
    assert "no-op" in result.probes[0].message
    assert result.verdict is Verdict.FAIL


def test_nan_adapter_is_a_single_error(backend, trained_adapter: Path, tmp_path: Path) -> None:
    bad = fixtures_build.nan_copy(trained_adapter, tmp_path / "nan_adapter", factor="lora_A")
    result = _run(backend, bad, "nan")
    assert [p.verdict for p in result.probes] == [Verdict.ERROR]
    assert result.verdict is Verdict.ERROR
    assert "NaN" in result.probes[0].message


@pytest.mark.parametrize(
    ("which", "exit_code", "expected"),
    [
        ("trained", 0, "above its null on 8 prompts"),
        ("untrained", 1, "the adapter is a no-op"),
    ],
)
def test_quick_eval_ends_in_one_actionable_line(
    which: str,
    exit_code: int,
    expected: str,
    smollm2_dir: Path,
    trained_adapter: Path,
    untrained_adapter: Path,
) -> None:
    from click.testing import CliRunner

    import sway_common.app.data
    from sway_common.app.cli import app

    adapter = trained_adapter if which == "trained" else untrained_adapter
    prompts = Path(sway_common.app.data.__file__).parent / "demo_prompts.txt"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(smollm2_dir),
            "--adapter-path",
            str(adapter),
            "--prompts",
            str(prompts),
            "--backend",
            "hf",
        ],
    )
    assert result.exit_code == exit_code, result.output
    # The headline is the last thing printed; rich may wrap it, so compare words.
    tail = " ".join(result.output.split()[-40:])
    assert expected in tail, result.output
