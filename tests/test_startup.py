"""Start-up cost: what importing the CLI and the MLX backend drags in.

Fixed costs are real cost: ``import torch, transformers, peft`` alone takes seconds
(docs/benchmarks.md). Each check runs in a fresh interpreter, since this one has imported
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


RUN_CLI = """
import atexit, sys
atexit.register(lambda: print("torch loaded:", sys.modules.get("torch") is not None))
sys.argv = ["sway-mlx", *{args!r}]
from sway_common.app.cli import main
main()
"""


def cli_loads_torch(args: list[str]) -> bool:
    """Run the CLI in a fresh interpreter; whether torch got imported by the end."""
    out = subprocess.run(
        [sys.executable, "-c", RUN_CLI.format(args=args)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode in (0, 1), out.stderr[-2000:]
    return "torch loaded: True" in out.stdout


@pytest.mark.mlx
def test_mlx_eval_from_the_command_line_never_imports_torch(
    tiny_model_dir: Path, tiny_mlx_adapter: Path, tmp_path: Path
) -> None:
    args = ["eval", "--backend", "mlx", "--model", str(tiny_model_dir)]
    args += ["--adapter-path", str(tiny_mlx_adapter), "--runs", "2", "--no-cache"]
    assert not cli_loads_torch([*args, "--json", str(tmp_path / "r.json")])
    assert (tmp_path / "r.json").is_file()
    # A pickled adapter may need torch to be read: then it stays importable.
    assert cli_loads_torch([*args, "--allow-pickle"])
