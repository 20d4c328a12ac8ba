"""Fast float32 matmuls for MLX on a Linux CPU, without slowing torch down.

The ``mlx[cpu]`` wheel links a reference BLAS (~5 GFLOP/s here); OpenBLAS runs the same
matmuls ~35x faster. Loading OpenBLAS with ``RTLD_GLOBAL`` *before* ``mlx.core`` is
imported makes MLX bind to it, the same effect as ``LD_PRELOAD`` but for one process
that asked for it. torch must not share a process with it: with OpenBLAS loaded, torch's
CPU matmuls ran ~25% slower in a micro-benchmark and whole probe runs up to 4x slower, so
only the MLX side loads it, and the CLI drops an inherited ``LD_PRELOAD`` of it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

# Debian/Ubuntu's threaded OpenBLAS (package libopenblas0-pthread), by architecture.
_KNOWN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
)
INSTALL_HINT = "apt-get install libopenblas0-pthread"


def find_openblas() -> str | None:
    """Path (or soname) of an OpenBLAS shared library on this Linux machine, if any."""
    if not sys.platform.startswith("linux"):
        return None
    for path in _KNOWN_PATHS:
        if Path(path).exists():
            return path
    return ctypes.util.find_library("openblas")


def openblas_mapped() -> bool:
    """Whether an OpenBLAS library is loaded into this process (Linux only)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return "libopenblas" in maps


def preloaded_openblas(env: dict[str, str] | None = None) -> bool:
    """Whether ``LD_PRELOAD`` names OpenBLAS (it then reaches every process, torch's too)."""
    return "openblas" in (os.environ if env is None else env).get("LD_PRELOAD", "")


def without_openblas_preload(env: dict[str, str]) -> dict[str, str]:
    """``env`` with OpenBLAS removed from ``LD_PRELOAD`` (other preloads kept)."""
    kept = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if "openblas" not in p]
    out = {k: v for k, v in env.items() if k != "LD_PRELOAD"}
    if kept:
        out["LD_PRELOAD"] = " ".join(kept)
    return out


def load_openblas_for_mlx() -> str:
    """Make MLX use OpenBLAS in this process if it can; say what happened.

    Returns one of ``"openblas"`` (loaded now or already), ``"reference"`` (mlx.core was
    imported before and bound to its own BLAS; nothing to do now) or ``"missing"``
    (no OpenBLAS on this machine), or ``"native"`` off Linux (Accelerate on macOS).
    """
    if not sys.platform.startswith("linux"):
        return "native"
    if openblas_mapped():
        return "openblas"
    if "mlx.core" in sys.modules:
        return "reference"
    path = find_openblas()
    if path is None:
        return "missing"
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return "missing"
    return "openblas"
