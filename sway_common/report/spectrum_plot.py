"""The weight-spectrum heat map: per layer and module type, how large the adapter's update
is relative to the base weight, and how many intruder dimensions it makes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from sway_common.report.plots import RC, PathLike, _save
from sway_common.types import ProbeResult, SuiteResult

SPECTRUM_PNG = "sway-spectrum.png"
ANNOTATED_CELLS = 300
"""Up to this many cells each intruder count is written in its cell."""


def spectrum_probes(result: SuiteResult) -> list[ProbeResult]:
    """The weight_spectrum results that hold per-module figures."""
    return [p for p in result.probes if p.kind == "weight_spectrum" and p.evidence.get("modules")]


def _grid(rows: list[dict[str, Any]], figure: str) -> tuple[list[int], list[str], Any]:
    """(layers, module types, a layers × types array of ``figure``; NaN where not adapted)."""
    layered = [r for r in rows if r.get("layer") is not None]
    layers = sorted({int(r["layer"]) for r in layered})
    kinds = sorted({str(r["type"]) for r in layered})
    grid = np.full((len(layers), len(kinds)), np.nan)
    for r in layered:
        value = (r.get("figures") or {}).get(figure, 0.0 if figure == "intruders" else None)
        if value is not None and math.isfinite(value):
            grid[layers.index(int(r["layer"])), kinds.index(str(r["type"]))] = value
    return layers, kinds, grid


def _annotate(ax: Any, counts: Any, top: int) -> None:
    """Each count written in its cell, when the grid is small enough to read them."""
    if counts.size > ANNOTATED_CELLS:
        return
    for (i, j), count in np.ndenumerate(counts):
        if np.isfinite(count):
            color = "white" if count > top / 2 else "black"
            ax.text(j, i, f"{count:.0f}", ha="center", va="center", fontsize=9, color=color)


def plot_spectrum(probe: ProbeResult, path: PathLike) -> Path:
    """Two heat maps, layers down and module types across: ‖ΔW‖_F/‖W‖_F (log colour) and
    intruder dimensions; a module that stands out is boxed."""
    import matplotlib
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    rows = probe.evidence.get("modules") or []
    layers, kinds, size = _grid(rows, "rel_fro")
    if not layers:
        raise ValueError(f"{probe.name} holds no per-layer modules to plot")
    _, _, intruders = _grid(rows, "intruders")
    out = {o["module"] for o in probe.evidence.get("standouts") or []}
    boxed = [
        (layers.index(int(r["layer"])), kinds.index(str(r["type"])))
        for r in rows
        if r["module"] in out and r.get("layer") is not None
    ]
    positive = size[np.isfinite(size) & (size > 0)]
    with matplotlib.rc_context(RC):
        height = min(14.0, 2.4 + 0.28 * len(layers))
        fig = Figure(figsize=(3.2 + 2.2 * len(kinds), height), layout="constrained")
        left, right = fig.subplots(1, 2, sharey=True)
        norm = LogNorm(float(positive.min()), float(positive.max())) if positive.size else None
        shown = np.where(size > 0, size, np.nan)
        image = left.imshow(shown, aspect="auto", cmap="viridis", norm=norm)
        fig.colorbar(image, ax=left, shrink=0.9)
        top = int(np.nanmax(intruders)) if np.isfinite(intruders).any() else 0
        steps = matplotlib.colormaps["magma_r"].resampled(top + 1)
        image = right.imshow(intruders, aspect="auto", cmap=steps, vmin=-0.5, vmax=top + 0.5)
        fig.colorbar(image, ax=right, shrink=0.9, ticks=range(top + 1))
        _annotate(right, intruders, top)
        titles = ((left, "‖ΔW‖_F / ‖W‖_F"), (right, "intruder dimensions"))
        for ax, title in titles:
            ax.grid(False)
            ax.set_xticks(range(len(kinds)))
            ax.set_xticklabels([k.rsplit(".", 1)[-1] for k in kinds], rotation=30, ha="right")
            ax.set_title(title, fontsize=11)
            for i, j in boxed:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=1.8))
        left.set_yticks(range(len(layers)))
        left.set_yticklabels([str(i) for i in layers])
        left.set_ylabel("layer")
        note = " (boxed: stands out)" if boxed else ""
        fig.suptitle(f"Where the adapter changed its base: {probe.name}{note}", fontsize=13)
        return _save(fig, path)


def write_spectrum_plots(result: SuiteResult, plot_dir: PathLike) -> list[Path]:
    """A heat map per weight_spectrum result: ``sway-spectrum.png`` (then ``-<name>``)."""
    probes = spectrum_probes(result)
    written = []
    for i, probe in enumerate(probes):
        name = SPECTRUM_PNG if i == 0 else f"sway-spectrum-{probe.name}.png"
        written.append(plot_spectrum(probe, Path(plot_dir) / name))
    return written
