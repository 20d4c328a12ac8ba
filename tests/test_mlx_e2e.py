"""End to end on SmolLM2-135M: an adapter trained by mlx-lm's own trainer, judged by the suite.

One backend holds the base model for the whole module; the trained, untrained (B = 0)
and NaN adapters are swapped in with ``set_adapter``, so the base is loaded once.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx_lm")

import fixtures_build  # noqa: E402  (tests/ is on sys.path through conftest)
from safetensors.numpy import load_file, save_file  # noqa: E402

from sway_common.models import normalize_config  # noqa: E402
from sway_common.suite.runner import run_suite  # noqa: E402
from sway_common.suite.spec import quick_suite  # noqa: E402
from sway_common.types import Verdict  # noqa: E402
from sway_mlx.backend import MLXDifferentialBackend  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.mlx]

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    line.strip()
    for line in (REPO / "sway_common" / "app" / "data" / "demo_prompts.txt")
    .read_text()
    .splitlines()
    if line.strip()
]
TIMINGS: dict[str, float] = {}


def train_with_mlx_lm(model_dir: Path) -> Path:
    """LoRA r=8 (scale 20) on q_proj/v_proj of the last 8 layers, 16 iterations of mlx-lm.

    A high learning rate on a short document: the train loss falls from ~5.3 to ~1.9,
    far enough for a clear signal, in well under half the time of the usual 1e-4 recipe.
    Trained once per recipe, from the content-keyed cache of trained adapters.
    """
    return fixtures_build.trained_adapter(
        "mlx",
        model_dir,
        fixtures_build.document_chunks(160),
        steps=16,
        rank=8,
        alpha=160.0,
        learning_rate=6e-4,
        num_layers=8,
        max_tokens=128,
        batch_size=4,
    )


def smollm2_trained_adapter(model_dir: Path, factory: pytest.TempPathFactory) -> Path:
    """The one mlx-lm adapter of the session (test_parity and the export tests reuse it);
    the time of training it, where this session trained it, goes into TIMINGS."""
    adapter = train_with_mlx_lm(normalize_config(model_dir))
    if adapter in fixtures_build.TRAIN_SECONDS:
        TIMINGS["train"] = fixtures_build.TRAIN_SECONDS[adapter]
    return adapter


def edited_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    path = dst / "adapters.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    return dst


@pytest.fixture(scope="module")
def trained_adapter(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return smollm2_trained_adapter(smollm2_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def backend(smollm2_dir: Path, trained_adapter: Path):
    start = time.perf_counter()
    b = MLXDifferentialBackend(smollm2_dir, trained_adapter)
    TIMINGS["load"] = time.perf_counter() - start
    yield b
    b.close()
    print("\nmlx e2e timings (s):", {k: round(v, 1) for k, v in TIMINGS.items()})


def timed_suite(backend: MLXDifferentialBackend, label: str):
    start = time.perf_counter()
    result = run_suite(quick_suite(PROMPTS, runs=8), backend=backend)
    TIMINGS[f"suite_{label}"] = time.perf_counter() - start
    return result


def by_kind(result) -> dict:
    return {p.kind: p for p in result.probes}


def test_trained_adapter_passes_delta_kl(backend: MLXDifferentialBackend) -> None:
    assert backend.info["rank"] == 8 and backend.info["targets"] == ["q_proj", "v_proj"]
    result = timed_suite(backend, "trained")
    delta = by_kind(result)["delta_kl"]
    assert delta.z is not None and delta.z >= 3, delta.message
    assert delta.verdict == Verdict.PASS, delta.message


def test_untrained_adapter_does_not_pass(
    backend: MLXDifferentialBackend, trained_adapter: Path, tmp_path: Path
) -> None:
    def zero_b(tensors: dict[str, np.ndarray]) -> None:
        for key in tensors:
            if key.endswith("lora_b"):
                tensors[key] = np.zeros_like(tensors[key])

    backend.set_adapter(edited_copy(trained_adapter, tmp_path / "untrained", zero_b))
    try:
        result = timed_suite(backend, "untrained")
    finally:
        backend.set_adapter(trained_adapter)
    # B = 0 is a no-op: reported by the preflight, before any probe runs.
    assert [(p.kind, p.verdict) for p in result.probes] == [("preflight", Verdict.FAIL)]
    assert "no-op" in result.probes[0].message
    assert result.verdict == Verdict.FAIL


def test_nan_adapter_is_a_single_error(
    backend: MLXDifferentialBackend, trained_adapter: Path, tmp_path: Path
) -> None:
    def poison(tensors: dict[str, np.ndarray]) -> None:
        key = sorted(k for k in tensors if k.endswith("lora_a"))[0]
        tensors[key] = tensors[key].copy()
        tensors[key].flat[0] = np.nan

    backend.set_adapter(edited_copy(trained_adapter, tmp_path / "nan", poison))
    try:
        result = timed_suite(backend, "nan")
    finally:
        backend.set_adapter(trained_adapter)
    assert [p.verdict for p in result.probes] == [Verdict.ERROR]
    assert result.verdict == Verdict.ERROR
    assert "NaN" in result.probes[0].message
