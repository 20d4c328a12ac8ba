"""The spectrum figures of a whole adapter, of its null draws, and how they compare.

A null is drawn by :func:`~sway_common.backend.nulls.null_factors`, the recipe every
calibrated probe uses, in ``fixed`` mode (factors at the init scale); its
``norm_matched`` twin is the same draw with each module's ``B`` rescaled to the trained
module's ``‖ΔW‖_F`` (what ``null_factors`` does in that mode), so one draw and one
factor SVD serve both: only the singular values are rescaled. Norm matching makes
``rel_fro`` equal the adapter's by construction: it gets no z against those nulls
(:data:`NORM_FIXED`). The other scale-free figures (ranks, alignments) come out the
same in both modes, since the two draws share their directions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from sway_common.adapters.weights import LoraModule
from sway_common.backend.nulls import NullSpec, null_factors
from sway_common.protocols import NullMode
from sway_common.spectrum.svd import (
    FIGURES,
    TopSVD,
    lowrank_svd,
    module_figures,
    scaled_figures,
)
from sway_common.stats import null_stats, z_score

MODES: tuple[NullMode, ...] = ("fixed", "norm_matched")
NORM_FIXED = frozenset({"rel_fro"})
"""Figures norm-matched nulls share with the adapter by construction: no z there."""

Figures = dict[str, float]
ModuleFigures = dict[str, Figures | None]
"""Figures by module path; None where the module's ΔW is zero."""


@dataclass(frozen=True)
class FigureOptions:
    """What the intruder count looks at: the top ``top_n`` singular vectors of ``W + ΔW``,
    an intruder when no top-k vector of ``W`` has |cos| ≥ ``cos`` with it."""

    top_n: int = 10
    cos: float = 0.5


def adapter_figures(
    modules: Mapping[str, LoraModule], bases: Mapping[str, TopSVD], opts: FigureOptions
) -> ModuleFigures:
    """Every module's figures (DoRA: of the direction update ``scale · B·A``)."""
    return {
        name: module_figures(
            lowrank_svd(m.a, m.b, m.scale), bases[name], top_n=opts.top_n, cos=opts.cos
        )
        for name, m in sorted(modules.items())
    }


def null_figures(
    modules: Mapping[str, LoraModule],
    bases: Mapping[str, TopSVD],
    spec: NullSpec,
    opts: FigureOptions,
) -> dict[str, ModuleFigures]:
    """One null draw's figures in both :data:`MODES`, by mode then module."""
    draw = null_factors(modules, replace(spec, mode="fixed"))
    out: dict[str, ModuleFigures] = {mode: {} for mode in MODES}
    for name, (a, b) in sorted(draw.items()):
        svd = lowrank_svd(a, b, modules[name].scale)
        drawn, target = float(np.sqrt(np.sum(svd.s**2))), modules[name].frobenius_norm()
        matched = target / drawn if drawn > 0 else 0.0
        fixed, norm = scaled_figures(
            svd, bases[name], (1.0, matched), top_n=opts.top_n, cos=opts.cos
        )
        out["fixed"][name], out["norm_matched"][name] = fixed, norm
    return out


def pooled(figures: ModuleFigures, base_fro: Mapping[str, float]) -> Figures | None:
    """The adapter's figures over its modules: ``rel_fro`` pooled (``√Σ‖ΔW‖² / √Σ‖W‖²``,
    over every adapted module), ``intruders`` summed, the others averaged over the
    modules whose ΔW is not zero. None when every ΔW is zero."""
    live = {n: f for n, f in figures.items() if f is not None}
    if not live:
        return None
    out: Figures = {}
    total = sum(base_fro[n] ** 2 for n in figures)
    moved = sum((f["rel_fro"] * base_fro[n]) ** 2 for n, f in live.items())
    out["rel_fro"] = math.sqrt(moved / total) if total > 0 else math.inf
    for fig in FIGURES[1:]:
        values = [f[fig] for f in live.values()]
        out[fig] = float(sum(values)) if fig == "intruders" else float(np.mean(values))
    return out


def compare(value: float, nulls: Sequence[float], fig: str, mode: str) -> dict[str, Any]:
    """One figure against its null draws: their mean, spread, and the figure's z (None
    where the nulls are degenerate, or where norm matching fixed the figure)."""
    stats = null_stats(nulls)
    fixed_by_matching = mode == "norm_matched" and fig in NORM_FIXED
    z = None if fixed_by_matching or not math.isfinite(value) else z_score(value, stats)
    return {"mean": stats.mean, "std": stats.std, "z": z}


def against_nulls(
    value: Figures | None, nulls: Mapping[str, Sequence[Figures | None]]
) -> dict[str, dict[str, Any]]:
    """Each figure of one module (or of the pooled adapter) against the same figure of
    each null draw, by mode (``nulls``: the draws' figures by mode):
    ``{mode: {figure: {mean, std, z}}}``. Draws whose ΔW is zero are left out."""
    if value is None:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        drawn = [n for n in nulls.get(mode, ()) if n is not None]
        out[mode] = {
            fig: compare(value[fig], [n[fig] for n in drawn], fig, mode) for fig in FIGURES
        }
    return out
