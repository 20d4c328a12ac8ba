"""The null adapter recipe, written once: seeded random LoRA factors in numpy.

A null view replaces the trained factors with random ones of the same structure (rank,
scale, targeted modules). The draw happens here, in numpy, and every backend only
installs the arrays; so the same seed gives the same null ΔW on MLX, on torch and in
the dummy, and a z-score measured against nulls on one backend means the same on
another.

Factors are in PEFT orientation (``a``: ``(r, in)``, ``b``: ``(out, r)``, ΔW =
``scale · b @ a``), the orientation of :class:`~sway_common.adapters.LoraModule`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray

from sway_common.adapters.weights import LoraModule
from sway_common.protocols import NULL_MODES, NullMode

NullFactors = tuple[NDArray[np.float32], NDArray[np.float32]]
"""``(a, b)`` of one module: ``a`` is ``(r, in)``, ``b`` is ``(out, r)``."""


# Part of every null-cache key: change it whenever the draw below changes, so cached
# statistics of an older recipe are never read back as this one's.
NULL_RECIPE = "numpy-blake2b-module-seed/1"


def check_null_args(init_scale: float, rank_scale: float, mode: str) -> None:
    """Refuse a null that has no meaning, before any view is opened or factor drawn."""
    if not rank_scale > 0:
        raise ValueError(f"rank_scale must be > 0, got {rank_scale}")
    if not init_scale > 0:
        raise ValueError(f"init_scale must be > 0, got {init_scale}")
    if mode not in NULL_MODES:
        raise ValueError(f"null mode must be one of {NULL_MODES}, got {mode!r}")


def module_seed(seed: int, path: str) -> int:
    """A 63-bit seed for one module's draw, from (seed, module path).

    A content hash rather than Python's ``hash()`` (salted per process) and rather than
    a split of one root key (which would tie each module's draw to how many modules
    exist): the same module gets the same draw in any process, on any backend.
    """
    digest = hashlib.blake2b(f"null-seed:{int(seed)}\x00{path}\x00".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") & ((1 << 63) - 1)


def null_factors(
    modules: Mapping[str, LoraModule],
    seed: int,
    *,
    init_scale: float = 0.02,
    rank_scale: float = 1.0,
    mode: NullMode = "fixed",
) -> dict[str, NullFactors]:
    """Seeded Gaussian factors for every module of a trained adapter, float32, by path.

    ``a`` has std ``init_scale`` and ``b`` std ``init_scale · sqrt(rank_scale)``: only
    one factor grows, so Var(ΔW) = scale² · r · σ_A² · σ_B² is linear in ``rank_scale``,
    like a null of rank ``r · rank_scale``. ``norm_matched`` then rescales ``b`` so that
    each module's ``‖ΔW‖_F`` equals the trained module's (an untrained module, ΔW = 0,
    gets zero noise); ``a`` is the same in both modes, so they share a direction.
    """
    check_null_args(init_scale, rank_scale, mode)
    b_std = init_scale * math.sqrt(rank_scale)
    out: dict[str, NullFactors] = {}
    for path in sorted(modules):
        real = modules[path]
        rng = np.random.default_rng(module_seed(seed, path))
        # Drawn in float64 and rounded once, so the norm match below is exact to float32.
        a = init_scale * rng.standard_normal(real.a.shape)
        b = b_std * rng.standard_normal(real.b.shape)
        if mode == "norm_matched":
            drawn = LoraModule(a=a, b=b, scale=real.scale).frobenius_norm()
            b = b * (real.frobenius_norm() / drawn) if drawn > 0 else np.zeros_like(b)
        out[path] = (a.astype(np.float32), b.astype(np.float32))
    return out
