"""Verdicts on a panel of real SmolLM2-135M adapters (MLX backend, the native mlx-lm trainer).

A healthy adapter trained by `mlx_lm lora` itself (all linear layers of the last 8 blocks,
checkpoints every 10 iterations) and a DoRA adapter from the same trainer must not FAIL
delta_kl or adapter_ablation; a random adapter at its norm and the same adapter with B ~ 0
must PASS neither; a NaN in a DoRA magnitude ends as a single ERROR; the checkpoint
trajectory of a growing adapter must not report a regression.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

import fixtures_build  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from sway_common.adapters import read_adapter, write_mlx_adapter  # noqa: E402
from sway_common.adapters.controls import random_like, shrink_b  # noqa: E402
from sway_common.app.checkpoints import CheckpointSetup, evaluate_checkpoints  # noqa: E402
from sway_common.app.demo import demo_prompts  # noqa: E402
from sway_common.models import normalize_config  # noqa: E402
from sway_common.probes.adapter_ablation import AdapterAblationConfig  # noqa: E402
from sway_common.probes.delta_kl import DeltaKLConfig  # noqa: E402
from sway_common.probes.null_adapter import NullAdapterConfig  # noqa: E402
from sway_common.suite.runner import run_suite  # noqa: E402
from sway_common.suite.spec import Defaults, SuiteSpec  # noqa: E402
from sway_common.suite.trajectory import summarize  # noqa: E402
from sway_common.types import Verdict  # noqa: E402
from sway_mlx.backend import MLXDifferentialBackend  # noqa: E402

ALL_LINEAR = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def _prompts() -> list[str]:
    return demo_prompts()


def _suite() -> SuiteSpec:
    prompts = _prompts()
    return SuiteSpec(
        probes=[
            NullAdapterConfig(name="nulls", kind="null_adapter", runs=4),
            DeltaKLConfig(name="delta_kl", kind="delta_kl", prompts=prompts),
            AdapterAblationConfig(name="ablation", kind="adapter_ablation", prompts=prompts[:4]),
        ],
        defaults=Defaults(seed=0),
    )


@pytest.fixture(scope="module")
def native_run(smollm2_dir: Path) -> Path:
    """30 iterations of `mlx_lm lora`, all linear layers of the last 8 blocks, saved every 10
    (trained once per recipe, from the content-keyed cache of trained adapters)."""
    return fixtures_build.trained_adapter(
        "mlx",
        normalize_config(smollm2_dir),
        fixtures_build.document_chunks(160),
        steps=30,
        rank=8,
        alpha=16.0,
        learning_rate=2e-4,
        targets=ALL_LINEAR,
        num_layers=8,
        max_tokens=128,
        batch_size=4,
        save_every=10,
    )


@pytest.fixture(scope="module")
def dora_run(smollm2_dir: Path) -> Path:
    """16 iterations of `mlx_lm lora --fine-tune-type dora` on q/v of the last 8 blocks.

    The recipe of the MLX end-to-end test (scale 20, lr 6e-4), which bites in 16 steps;
    trained once per recipe (content-keyed cache of trained adapters).
    """
    return fixtures_build.trained_adapter(
        "mlx",
        normalize_config(smollm2_dir),
        fixtures_build.document_chunks(160),
        steps=16,
        rank=8,
        alpha=160.0,
        learning_rate=6e-4,
        num_layers=8,
        max_tokens=128,
        batch_size=4,
        dora=True,
    )


def _nan_magnitude_copy(src: Path, dst: Path) -> Path:
    """``src`` (an mlx-lm DoRA adapter) with one NaN in its first magnitude vector."""
    shutil.copytree(src, dst)
    path = dst / "adapters.safetensors"
    tensors = load_file(str(path))
    key = sorted(k for k in tensors if k.endswith(".m"))[0]
    tensors[key] = tensors[key].copy()
    tensors[key].flat[0] = np.nan
    save_file(tensors, str(path))
    return dst


@pytest.fixture(scope="module")
def verdicts(
    smollm2_dir: Path,
    native_run: Path,
    dora_run: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, dict[str, Verdict]]:
    trained = read_adapter(native_run)
    work = tmp_path_factory.mktemp("controls")
    panel = {
        "native": native_run,
        "random at its norm": write_mlx_adapter(
            random_like(trained, 0), work / "random", allow_rescale=True
        ),
        "B≈0": write_mlx_adapter(shrink_b(trained), work / "bzero", allow_rescale=True),
        "DoRA": dora_run,
        "NaN DoRA magnitude": _nan_magnitude_copy(dora_run, work / "nan-dora"),
    }
    backend = MLXDifferentialBackend(normalize_config(smollm2_dir), native_run, dtype="float32")
    out = {}
    try:
        for name, path in panel.items():
            backend.set_adapter(path)
            result = run_suite(_suite(), backend=backend)
            out[name] = {p.name: p.verdict for p in result.probes}
            out[name]["overall"] = result.verdict
            for p in result.probes:  # shown with -s: the numbers behind each verdict
                print(f"\n[{name}] {p.name}: {p.verdict.value} {p.message}")
            out[name]["messages"] = {p.name: p.message for p in result.probes}  # type: ignore[assignment]
    finally:
        backend.close()
    return out


@pytest.mark.parametrize("trained", ["native", "DoRA"])
def test_trained_adapters_are_not_failed(verdicts, trained: str) -> None:
    got = verdicts[trained]
    assert got["delta_kl"] in (Verdict.PASS, Verdict.WARN), got["messages"]
    assert got["ablation"] in (Verdict.PASS, Verdict.WARN), got["messages"]


def test_nan_dora_magnitude_is_a_single_error(verdicts) -> None:
    got = verdicts["NaN DoRA magnitude"]
    assert got["overall"] is Verdict.ERROR, got["messages"]
    assert [v for k, v in got.items() if k not in ("overall", "messages")] == [Verdict.ERROR]
    assert "NaN" in " ".join(got["messages"].values())


@pytest.mark.parametrize("control", ["random at its norm", "B≈0"])
def test_controls_never_pass(verdicts, control: str) -> None:
    for probe in ("delta_kl", "ablation"):
        assert verdicts[control][probe] is not Verdict.PASS, verdicts[control]["messages"]


def test_growing_checkpoints_are_not_called_regressions(
    smollm2_dir: Path, native_run: Path
) -> None:
    rows = evaluate_checkpoints(
        native_run,
        CheckpointSetup(
            model=str(normalize_config(smollm2_dir)), prompts=_prompts(), backend="mlx", runs=4
        ),
    )
    summary = summarize(rows)
    assert [r.step for r in rows] == [10, 20, 30]
    assert not summary.regressions and "regressed" not in summary.line
