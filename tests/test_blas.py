"""OpenBLAS reaches MLX's process by itself and never torch's (the BLAS trap)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sway_common.blas import find_openblas, preloaded_openblas, without_openblas_preload

REPO = Path(__file__).resolve().parents[1]
# `make install` installs OpenBLAS on Linux, so there its absence fails the tests below.
needs_openblas = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="Linux only: macOS uses Accelerate"
)


def _run(code: str, **env: str) -> str:
    clean = without_openblas_preload(dict(os.environ))
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


MAPPED = "import pathlib; print('libopenblas' in pathlib.Path('/proc/self/maps').read_text())"


def test_preload_is_dropped_but_other_preloads_are_kept() -> None:
    env = {
        "LD_PRELOAD": "/x/libfoo.so /usr/lib/openblas-pthread/libopenblas.so.0:/y/libbar.so",
        "A": "1",
    }
    assert preloaded_openblas(env)
    kept = without_openblas_preload(env)
    assert kept == {"LD_PRELOAD": "/x/libfoo.so /y/libbar.so", "A": "1"}
    assert without_openblas_preload({"LD_PRELOAD": "libopenblas.so.0"}) == {}


@needs_openblas
def test_mlx_side_loads_openblas_before_mlx() -> None:
    code = (
        "import sway_mlx, mlx.core as mx; a = mx.ones((64, 64)); mx.eval(a @ a); "
        f"print(sway_mlx.BLAS); {MAPPED}"
    )
    assert _run(code).splitlines() == ["openblas", "True"]


@needs_openblas
def test_torch_side_never_loads_openblas() -> None:
    code = f"import torch, sway_hf.backend; torch.ones(64, 64) @ torch.ones(64, 64); {MAPPED}"
    assert _run(code) == "False"


@needs_openblas
def test_mlx_imported_first_is_reported_not_hidden() -> None:
    assert _run("import mlx.core, sway_mlx; print(sway_mlx.BLAS)") == "reference"


@needs_openblas
def test_cli_drops_an_inherited_openblas_preload() -> None:
    clean = without_openblas_preload(dict(os.environ))
    proc = subprocess.run(
        [sys.executable, "-m", "sway_common.app.cli", "doctor", "--json"],
        cwd=REPO,
        env={**clean, "LD_PRELOAD": find_openblas() or ""},
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(proc.stdout)
    assert report["blas"]["ld_preload_openblas"] is False
    assert report["blas"]["openblas"] == find_openblas()
