"""The CLI's process-wide fixes; ``SWAY_MLX_NO_FAST_PATHS=1`` turns each one off.

- :func:`drop_openblas_preload`: an inherited ``LD_PRELOAD`` of OpenBLAS reaches torch,
  which runs slower under it; MLX loads OpenBLAS itself (``sway_mlx.platform_fixes``),
  so the CLI starts again without the preload.
- :func:`keep_torch_out`: mlx-lm imports transformers for its tokenizers, and
  transformers imports torch when it is installed (it is: the HF backend needs it):
  1-3 s of start-up and a few hundred MB the MLX path never uses.

Only a caller that owns the process may use them (the CLI's ``main`` and its runs).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, cast

from sway_common.blas import preloaded_openblas, without_openblas_preload
from sway_common.fast_paths import fast_paths_enabled


def drop_openblas_preload(argv: Sequence[str], module: str = "sway_common.app.cli") -> None:
    """If ``LD_PRELOAD`` names OpenBLAS, replace this process by ``python -m module
    *argv`` without it (other preloads kept); otherwise return."""
    if not fast_paths_enabled() or not preloaded_openblas():
        return
    os.execve(
        sys.executable,
        [sys.executable, "-m", module, *argv],
        without_openblas_preload(dict(os.environ)),
    )


def keep_torch_out() -> bool:
    """Make ``import torch`` fail in this process, before mlx-lm is imported; True if done.

    Once hidden, transformers sees no torch for the rest of the process, so only a caller
    that will not need torch (no GGUF to convert, no pickled adapter, no local embedding
    model) may ask for this.
    """
    if not fast_paths_enabled() or "torch" in sys.modules or "transformers" in sys.modules:
        return False
    # None in sys.modules is how the import system spells "not installed".
    cast(dict[str, Any], sys.modules)["torch"] = None
    return True
