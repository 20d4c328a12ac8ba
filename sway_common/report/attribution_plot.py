"""The attribution plot: each group's share of the effect, overall and prompt by prompt."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from sway_common.report.plots import COLORS, LINE_COLOR, RC, PathLike, _save
from sway_common.types import ProbeResult, SuiteResult, Verdict

ATTRIBUTION_PNG = "sway-attribution.png"


def attribution_probes(result: SuiteResult) -> list[ProbeResult]:
    """The attribution results that hold shares to plot."""
    return [p for p in result.probes if p.kind == "attribution" and p.evidence.get("groups")]


def plot_attribution(probe: ProbeResult, path: PathLike) -> Path:
    """Shares with their intervals (left) and a groups × prompts heat map of them (right)."""
    import matplotlib
    from matplotlib.figure import Figure

    rows = probe.evidence.get("groups") or []
    if not rows:
        raise ValueError(f"{probe.name} holds no attribution shares to plot")
    labels = [str(r["group"]) for r in rows]
    grid = np.array(
        [[np.nan if v is None else v for v in row] for row in probe.evidence["per_prompt_share"]],
        dtype=np.float64,
    )
    with matplotlib.rc_context(RC):
        height = 2.2 + 0.32 * len(rows)
        fig = Figure(figsize=(11, height), layout="constrained")
        bars, heat = fig.subplots(1, 2, width_ratios=[1, 1.6], sharey=True)
        _share_bars(bars, rows)
        finite = grid[np.isfinite(grid)]
        # Symmetric about 0, so a small negative share looks small; up to the largest
        # share, so thirty layers of a few percent each still show their pattern.
        span = float(np.abs(finite).max()) if finite.size else 0.0
        span = span if span > 0 else 1.0
        image = heat.imshow(
            grid, aspect="auto", cmap="RdBu_r", vmin=-span, vmax=span, interpolation="nearest"
        )
        heat.set_xticks(range(grid.shape[1]))
        heat.set_xticklabels([str(i + 1) for i in range(grid.shape[1])])
        heat.set_xlabel("prompt")
        heat.grid(False)
        heat.set_title("share on each prompt", fontsize=10, fontweight="normal")
        fig.colorbar(image, ax=heat, label="share of the effect", shrink=0.9)
        bars.set_yticks(range(len(labels)))
        bars.set_yticklabels(labels)
        grouping = probe.evidence.get("grouping")
        by = grouping if isinstance(grouping, str) else f"{len(rows)} globs"
        interaction = probe.evidence.get("interaction")
        left = f"interaction {interaction:+.0%}; " if interaction is not None else ""
        fig.suptitle(
            f"Where the effect sits: {probe.name}, by {by}\n{left}shares need not add up to 100%",
            fontsize=12,
            fontweight="bold",
        )
        return _save(fig, path)


def _share_bars(ax: Any, rows: list[dict[str, Any]]) -> None:
    shares = [float(r["share"]) for r in rows]
    ax.barh(range(len(rows)), shares, height=0.6, color=LINE_COLOR, alpha=0.85)
    for i, r in enumerate(rows):
        iv = r.get("interval")
        if iv is not None:
            ax.plot(iv, [i, i], color="black", lw=1.4)
    ax.axvline(0.0, color="black", lw=0.8)
    ends = shares + [float(x) for r in rows for x in (r.get("interval") or ())]
    right = max(0.1, *ends)
    if right > 0.5:  # the whole effect, where the bars come near it
        ax.axvline(1.0, color=COLORS[Verdict.SKIP], lw=1.0, ls=":")
        right = max(1.0, right)
    pad = 0.05 * (right - min(0.0, *ends))
    ax.set_xlim(min(0.0, *ends) - pad, right + pad)
    ax.invert_yaxis()
    ax.set_xlabel("share of the effect (95% interval over prompts)")
    ax.set_title("overall", fontsize=10, fontweight="normal")
    ax.grid(axis="y", visible=False)


def write_attribution_plots(result: SuiteResult, plot_dir: PathLike) -> list[Path]:
    """One PNG per attribution result (named after it when there are several)."""
    probes = attribution_probes(result)
    if len(probes) == 1:
        return [plot_attribution(probes[0], Path(plot_dir) / ATTRIBUTION_PNG)]
    return [
        plot_attribution(p, Path(plot_dir) / f"sway-attribution-{_safe(p.name)}.png")
        for p in probes
    ]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "probe"
