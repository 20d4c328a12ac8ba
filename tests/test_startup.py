"""Start-up cost: what importing the CLI and the MLX backend drags in.

Fixed costs are real cost: on the GPU machine ``import torch, transformers, peft`` alone
took 11-12 s. Each check runs in a fresh interpreter, since this one has imported
everything already.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def loaded_after(statement: str, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` are in ``sys.modules`` after ``statement`` in a fresh interpreter."""
    code = f"import sys\n{statement}\nprint(' '.join(n for n in {names!r} if n in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=REPO
    )
    return out.stdout.split()


def test_cli_loads_no_framework_and_no_plotting() -> None:
    heavy = ("torch", "transformers", "peft", "mlx", "mlx_lm", "matplotlib")
    assert loaded_after("import sway_common.app.cli", heavy) == []


@pytest.mark.mlx
def test_mlx_backend_loads_neither_peft_nor_the_hf_backend() -> None:
    # torch itself still loads where it is installed: mlx-lm's tokenizer loader imports
    # transformers, whose configuration_utils imports torch (transformers 5).
    assert loaded_after("import sway_mlx.backend", ("peft", "sway_hf")) == []
