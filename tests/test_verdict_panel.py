"""Verdicts on a panel of real SmolLM2-135M adapters (MLX backend, the native mlx-lm trainer).

A healthy adapter trained by `mlx_lm lora` itself (all linear layers of the last 8 blocks,
checkpoints every 10 iterations) must not FAIL delta_kl or adapter_ablation; a random
adapter at its norm and the same adapter with B ~ 0 must PASS neither; the checkpoint
trajectory of a growing adapter must not report a regression.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

import fixtures_build  # noqa: E402

from sway_common.adapters import read_adapter, write_mlx_adapter  # noqa: E402
from sway_common.adapters.controls import random_like, shrink_b  # noqa: E402
from sway_common.app.checkpoints import evaluate_checkpoints  # noqa: E402
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
from sway_mlx.train import train_lora  # noqa: E402

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
def native_run(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 iterations of `mlx_lm lora`, all linear layers of the last 8 blocks, saved every 10."""
    return train_lora(
        normalize_config(smollm2_dir),
        fixtures_build.document_chunks(160),
        tmp_path_factory.mktemp("native"),
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
def verdicts(
    smollm2_dir: Path, native_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Verdict]]:
    trained = read_adapter(native_run)
    work = tmp_path_factory.mktemp("controls")
    panel = {
        "native": native_run,
        "random at its norm": write_mlx_adapter(
            random_like(trained, 0), work / "random", allow_rescale=True
        ),
        "B≈0": write_mlx_adapter(shrink_b(trained), work / "bzero", allow_rescale=True),
    }
    backend = MLXDifferentialBackend(normalize_config(smollm2_dir), native_run, dtype="float32")
    out = {}
    try:
        for name, path in panel.items():
            backend.set_adapter(path)
            result = run_suite(_suite(), backend=backend)
            out[name] = {p.name: p.verdict for p in result.probes}
            out[name]["messages"] = {p.name: p.message for p in result.probes}  # type: ignore[assignment]
    finally:
        backend.close()
    return out


def test_native_mlx_adapter_is_not_failed(verdicts) -> None:
    native = verdicts["native"]
    assert native["delta_kl"] in (Verdict.PASS, Verdict.WARN), native["messages"]
    assert native["ablation"] in (Verdict.PASS, Verdict.WARN), native["messages"]


@pytest.mark.parametrize("control", ["random at its norm", "B≈0"])
def test_controls_never_pass(verdicts, control: str) -> None:
    for probe in ("delta_kl", "ablation"):
        assert verdicts[control][probe] is not Verdict.PASS, verdicts[control]["messages"]


def test_growing_checkpoints_are_not_called_regressions(
    smollm2_dir: Path, native_run: Path
) -> None:
    rows = evaluate_checkpoints(
        native_run,
        model=str(normalize_config(smollm2_dir)),
        backend="mlx",
        prompts=_prompts(),
        runs=4,
    )
    summary = summarize(rows)
    assert [r.step for r in rows] == [10, 20, 30]
    assert not summary.regressions and "regressed" not in summary.line
