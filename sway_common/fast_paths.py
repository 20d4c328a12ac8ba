"""The one switch for every platform fix and fast path: ``SWAY_MLX_NO_FAST_PATHS=1``.

Each backend keeps its fixes in one module (``sway_mlx.platform_fixes``,
``sway_hf.platform_fixes``), the CLI its own in ``sway_common.app.process``. Each one asks
:func:`fast_paths_enabled` before it applies; with the switch set, the upstream paths
run instead (mlx-lm's SwiGLU, PEFT's LoRA forward, MLX's own BLAS, no re-exec, torch
left importable), e.g. to tell whether a difference comes from a fix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

ENV_VAR = "SWAY_MLX_NO_FAST_PATHS"


def fast_paths_enabled(env: Mapping[str, str] | None = None) -> bool:
    """False when ``SWAY_MLX_NO_FAST_PATHS`` is set to anything but empty or ``0``."""
    value = (os.environ if env is None else env).get(ENV_VAR, "").strip()
    return value in ("", "0")
