"""Finding OpenBLAS on Linux and seeing whether a process has it, loaded or preloaded.

Why MLX loads it and torch must not share a process with it: ``sway_mlx.platform_fixes``.
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
