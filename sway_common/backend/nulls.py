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
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
from numpy.typing import NDArray

from sway_common.adapters.weights import LoraModule, lowrank_norm
from sway_common.protocols import NULL_MODES, NullMode

NullFactors = tuple[NDArray[np.float32], NDArray[np.float32]]
"""``(a, b)`` of one module: ``a`` is ``(r, in)``, ``b`` is ``(out, r)``."""


# Part of every null-cache key: change it whenever the draw below changes, so cached
# statistics of an older recipe are never read back as this one's.
NULL_RECIPE = "numpy-blake2b-module-seed/1"

DEFAULT_INIT_SCALE = 0.02
"""The std of a null's factors before any norm matching (PEFT's and mlx-lm's LoRA init scale)."""

CALIBRATION_MODE: NullMode = "norm_matched"
"""The mode a suite's null calibration draws in, unless its spec says otherwise: it asks
whether the adapter's *direction* matters, not only its size. A single null view asked
of a backend (:class:`NullSpec`'s default) is the protocol's plain draw at ``init_scale``."""


@dataclass(frozen=True, slots=True)
class NullSpec:
    """Which null adapter: the one specification, from a suite's spec to a backend's draw.

    ``seed`` fixes the draw; ``init_scale`` is the factors' std; ``rank_scale`` emulates a
    null of rank ``r · rank_scale`` (Var(ΔW) linear in it); ``mode`` is ``fixed`` (factors
    at ``init_scale``) or ``norm_matched`` (each module's ΔW rescaled to the trained
    module's Frobenius norm). Invalid values raise ``ValueError`` on construction.
    """

    seed: int = 0
    init_scale: float = DEFAULT_INIT_SCALE
    rank_scale: float = 1.0
    mode: NullMode = "fixed"

    def __post_init__(self) -> None:
        if not self.rank_scale > 0:
            raise ValueError(f"rank_scale must be > 0, got {self.rank_scale}")
        if not self.init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {self.init_scale}")
        if self.mode not in NULL_MODES:
            raise ValueError(f"null mode must be one of {NULL_MODES}, got {self.mode!r}")

    def draw(self) -> dict[str, Any]:
        """The draw's fields, as the null cache keys a measurement under it."""
        return {
            "seed": self.seed,
            "init_scale": self.init_scale,
            "rank_scale": self.rank_scale,
            "mode": self.mode,
        }


ArrayT = TypeVar("ArrayT")


@dataclass(frozen=True, slots=True)
class PlacedFactors(Generic[ArrayT]):
    """One module's null factors as a backend placed them: its framework's arrays, on its
    device, in its layout. ``folded``: the pair a backend's layer computes with, when it
    keeps one (MLX LoRA: ``(A, scale·B)`` in the layer's dtype); None otherwise."""

    a: ArrayT
    b: ArrayT
    folded: tuple[ArrayT, ArrayT] | None = None

    @property
    def nbytes(self) -> int:
        """numpy, torch and MLX arrays all say ``nbytes``."""
        arrays = (self.a, self.b, *(self.folded or ()))
        return sum(int(getattr(array, "nbytes", 0)) for array in arrays)


PlacedNull = Mapping[str, PlacedFactors[Any]]
"""A drawn null by module path, as :meth:`Runtime.place_null` placed it."""


def module_seed(seed: int, path: str) -> int:
    """A 63-bit seed for one module's draw, from (seed, module path).

    A content hash rather than Python's ``hash()`` (salted per process) and rather than
    a split of one root key (which would tie each module's draw to how many modules
    exist): the same module gets the same draw in any process, on any backend.
    """
    digest = hashlib.blake2b(f"null-seed:{int(seed)}\x00{path}\x00".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") & ((1 << 63) - 1)


def null_factors(modules: Mapping[str, LoraModule], spec: NullSpec) -> dict[str, NullFactors]:
    """Seeded Gaussian factors for every module of a trained adapter, float32, by path.

    ``a`` has std ``init_scale`` and ``b`` std ``init_scale · sqrt(rank_scale)``: only
    one factor grows, so Var(ΔW) = scale² · r · σ_A² · σ_B² is linear in ``rank_scale``,
    like a null of rank ``r · rank_scale``. ``norm_matched`` then rescales ``b`` so that
    each module's ``‖ΔW‖_F`` equals the trained module's (an untrained module, ΔW = 0,
    gets zero noise); ``a`` is the same in both modes, so they share a direction.
    """
    b_std = spec.init_scale * math.sqrt(spec.rank_scale)
    out: dict[str, NullFactors] = {}
    for path in sorted(modules):
        real = modules[path]
        rng = np.random.default_rng(module_seed(spec.seed, path))
        # Drawn in float64 and rounded once, so the norm match below is exact to float32.
        a = spec.init_scale * rng.standard_normal(real.a.shape)
        b = b_std * rng.standard_normal(real.b.shape)
        if spec.mode == "norm_matched":
            drawn = lowrank_norm(a, b, real.scale)
            b = b * (real.frobenius_norm() / drawn) if drawn > 0 else np.zeros_like(b)
        out[path] = (a.astype(np.float32), b.astype(np.float32))
    return out
