"""PNG plots of a suite result and of a checkpoint trajectory.

matplotlib is imported inside each function (it is an optional extra and slow to
import) and only through ``matplotlib.figure.Figure``, which renders with Agg and never
touches pyplot's global state or the user's interactive backend.

Colours carry the verdict everywhere (green PASS, red FAIL, orange WARN, grey otherwise);
the grey band is always "what a random adapter of the same shape does".
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sway_common.stats import format_z
from sway_common.suite.trajectory import CheckpointRow, summarize
from sway_common.types import ProbeResult, SuiteResult, Verdict

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

PathLike = str | os.PathLike[str]
DPI = 120
Z_THRESHOLD = 3.0
"""The probes' default ``assert_z_gte``; results do not carry their thresholds."""
COLORS = {
    Verdict.PASS: "#2e7d32",
    Verdict.FAIL: "#c62828",
    Verdict.WARN: "#ef6c00",
    Verdict.ERROR: "#6a1b9a",
    Verdict.SKIP: "#9e9e9e",
}
NULL_COLOR = "#9e9e9e"
LINE_COLOR = "#1565c0"
RC: dict[RcKeyType, Any] = {
    "font.size": 11,
    "axes.titlesize": 13,
    "axes.titleweight": "bold",
    "axes.labelsize": 11,
    "legend.fontsize": 9.5,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}


def _save(fig: Any, path: PathLike) -> Path:
    """Render to a temp file beside ``path`` and rename: an image viewer that reloads
    on change (or a watch refreshing the plot) never sees half a PNG."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target


def _z_scale(axis: Any, set_scale: Any, values: Sequence[float]) -> None:
    """Symlog once z reaches the hundreds (trained adapters do): a linear axis would crush
    the threshold and the noise band into one line at zero. Ticks stay plain numbers."""
    from matplotlib.ticker import FixedLocator, FuncFormatter

    top = max((abs(v) for v in values), default=0.0)
    if top <= 100:
        return
    set_scale("symlog", linthresh=10, linscale=1.5)
    ticks = [-10, -2, 0, 2, 3, 10]
    decade = 30
    while decade <= top * 1.5:
        ticks += [decade, decade * 10 // 3]
        decade *= 10
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_minor_locator(FixedLocator([]))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))


def _note_across(ax: Any, text: str, color: str) -> None:
    """A message in the middle of an axes that has nothing to show."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color=color)


def _legend_outside(ax: Any, **kw: Any) -> None:
    # Beside the axes, so it never hides a point; constrained layout makes room for it.
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, **kw)


# ------------------------------------------------------------------ ablation
def ablation_probe(result: SuiteResult) -> ProbeResult | None:
    for p in result.probes:
        if p.kind == "adapter_ablation" and p.evidence.get("lambdas") and p.evidence.get("curve"):
            return p
    return None


def plot_ablation(result: SuiteResult, path: PathLike) -> Path:
    """Divergence from the base as the adapter is scaled by λ, against the null at λ=1."""
    import matplotlib
    from matplotlib.figure import Figure

    probe = ablation_probe(result)
    if probe is None:
        raise ValueError("the result has no adapter_ablation probe with a λ curve")
    lams = [float(x) for x in probe.evidence["lambdas"]]
    curve = [float(x) for x in probe.evidence["curve"]]
    kind = str(probe.evidence.get("divergence", "js")).upper()
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(7.5, 4.8), layout="constrained")
        ax = fig.add_subplot()
        ax.axvline(1.0, color="black", lw=1, ls=":", zorder=1)
        ax.text(
            1.0,
            1.0,
            " trained adapter (λ=1)",
            transform=ax.get_xaxis_transform(),
            va="top",
            ha="left",
            fontsize=9.5,
        )
        null = probe.null
        if null is not None and null.n:
            lo, hi = null.mean - 2 * null.std, null.mean + 2 * null.std
            ax.fill_between(
                [0.93, 1.07],
                [lo, lo],
                [hi, hi],
                color=NULL_COLOR,
                alpha=0.45,
                lw=0,
                label=f"{null.n} null adapters at λ=1 (mean ± 2σ)",
                zorder=2,
            )
            ax.hlines(null.mean, 0.93, 1.07, color="#616161", lw=1.5, zorder=3)
        color = COLORS.get(probe.verdict, LINE_COLOR)
        ax.plot(lams, curve, "-o", color=LINE_COLOR, lw=2, ms=6, label="real adapter × λ", zorder=4)
        at_one = curve[lams.index(1.0)] if 1.0 in lams else None
        if at_one is not None:
            ax.plot([1.0], [at_one], "o", ms=11, mfc="none", mec=color, mew=2.2, zorder=5)
        if max(curve) <= 1e-12:
            _note_across(ax, "no measurable change from the base at any λ", COLORS[Verdict.FAIL])
        ax.set_xlabel("adapter scale λ (0 = base model, 1 = as trained)")
        ax.set_ylabel(f"mean next-token {kind} from base (nats)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"Adapter dose-response: {probe.name}")
        z = f", z={format_z(probe.z, null.n if null else None)}" if probe.z is not None else ""
        ax.legend(loc="upper left", title=f"{probe.verdict.value} at λ=1{z}", title_fontsize=10)
        return _save(fig, path)


# ------------------------------------------------------------------ z per probe
def _no_z_note(p: ProbeResult) -> str:
    if p.kind == "null_adapter" and p.verdict is not Verdict.SKIP:
        return "calibration: it defines the null, no z"
    msg = " ".join(p.message.split())
    return "no z: " + (msg if len(msg) <= 60 else msg[:57] + "...")


def plot_z(result: SuiteResult, path: PathLike, *, z_threshold: float = Z_THRESHOLD) -> Path:
    """Each probe's z against its null adapters, as horizontal bars."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    probes = list(result.probes)
    if not probes:
        raise ValueError("the result holds no probes to plot")
    zs = [p.z for p in probes if p.z is not None and math.isfinite(p.z)]
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(8, 1.4 + 0.6 * len(probes)), layout="constrained")
        ax = fig.add_subplot()
        ax.axvspan(-2, 2, color=NULL_COLOR, alpha=0.25, lw=0)
        ax.axvline(z_threshold, color="black", ls="--", lw=1.2)
        ax.axvline(0, color="black", lw=0.8)
        right = max([z_threshold * 1.6, *zs])
        left = min([-3.0, *zs])
        for i, p in enumerate(probes):
            label_y = len(probes) - 1 - i
            if p.z is not None and math.isfinite(p.z):
                ax.barh(label_y, p.z, height=0.6, color=COLORS.get(p.verdict, LINE_COLOR))
                # Right of the bar's end (or of zero for a negative z): clear of the tick labels.
                ax.text(
                    max(p.z, 0.0),
                    label_y,
                    f" {format_z(p.z, p.null.n if p.null else None)}",
                    va="center",
                    ha="left",
                    fontsize=10,
                    fontweight="bold",
                )
            else:
                ax.barh(label_y, 0.0, height=0.6, color=NULL_COLOR)
                ax.text(
                    0.02,
                    label_y,
                    _no_z_note(p),
                    transform=ax.get_yaxis_transform(),
                    va="center",
                    ha="left",
                    color="#424242",
                    fontsize=9.5,
                    style="italic",
                    bbox={"fc": "white", "ec": "none", "alpha": 0.85, "pad": 2},
                )
        ax.set_yticks(range(len(probes)))
        ax.set_yticklabels([f"{p.name}\n({p.kind}: {p.verdict.value})" for p in reversed(probes)])
        for tick, p in zip(ax.get_yticklabels(), reversed(probes), strict=True):
            if p.z is None:
                tick.set_color("#757575")  # greyed: nothing to compare against the threshold
        ax.set_xlim(left * 1.15, right * 1.25)
        _z_scale(ax.xaxis, ax.set_xscale, zs)
        ax.grid(axis="y", visible=False)
        ax.set_xlabel("z: standard deviations above null adapters of the same shape (σ)")
        ax.set_title(f"Signal vs noise per probe: suite {result.verdict.value}")
        handles = [
            Patch(color=NULL_COLOR, alpha=0.25, label="null adapters (±2σ)"),
            Line2D([], [], color="black", ls="--", label=f"PASS needs z ≥ {z_threshold:g}"),
        ]
        fig.legend(handles=handles, loc="outside lower center", ncols=2)
        return _save(fig, path)


# ------------------------------------------------------------------ trajectory
def plot_trajectory(
    rows: Sequence[CheckpointRow],
    path: PathLike,
    *,
    z_threshold: float = Z_THRESHOLD,
    title: str = "Adapter signal over training",
) -> Path:
    """z and divergence per checkpoint, sharing the step axis; first pass and regressions marked."""
    import matplotlib
    from matplotlib.figure import Figure

    rows = sorted(rows, key=lambda r: r.step)
    if not rows:
        raise ValueError("no checkpoint rows to plot")
    summary = summarize(rows)
    scored = [r for r in rows if r.z is not None]
    errors = [r for r in rows if r.verdict is Verdict.ERROR]
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(10.5, 7), layout="constrained")
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1.15, 1])
        top.axhspan(-2, 2, color=NULL_COLOR, alpha=0.25, lw=0, label="null adapters (±2σ)")
        top.axhline(
            z_threshold, color="black", ls="--", lw=1.2, label=f"PASS needs z ≥ {z_threshold:g}"
        )
        zs = [r.z for r in scored if r.z is not None]
        if scored:
            z_steps = [r.step for r in scored]
            top.plot(z_steps, zs, "-", color=LINE_COLOR, lw=1.8, zorder=3)
            top.scatter(
                z_steps,
                zs,
                s=42,
                zorder=4,
                c=[COLORS.get(r.verdict, LINE_COLOR) for r in scored],
                edgecolors="white",
            )
        top.set_ylim(min([-3.0, *zs]) * 1.1, max([z_threshold * 1.8, *zs]) * 1.15)
        _z_scale(top.yaxis, top.set_yscale, zs)
        # Explicit limits: vertical markers (errors, regressions) do not widen the axis.
        first_step, last_step = rows[0].step, rows[-1].step
        pad = max(0.5, 0.04 * (last_step - first_step))
        bottom.set_xlim(first_step - pad, last_step + pad)
        if len(rows) <= 12:
            bottom.set_xticks([r.step for r in rows])
        for r in errors:
            for ax in (top, bottom):
                ax.axvline(r.step, color=COLORS[Verdict.ERROR], lw=1, ls=":", alpha=0.8)
            top.text(
                r.step,
                0.02,
                " ERROR",
                transform=top.get_xaxis_transform(),
                rotation=90,
                va="bottom",
                ha="right",
                color=COLORS[Verdict.ERROR],
                fontsize=9,
            )
        first = summary.first_pass
        if first is not None and first.z is not None:
            top.annotate(
                f"first above noise\n{first.label}",
                xy=(first.step, first.z),
                xytext=(12, 28),
                textcoords="offset points",
                fontsize=10,
                arrowprops={"arrowstyle": "->", "color": COLORS[Verdict.PASS]},
                color=COLORS[Verdict.PASS],
                fontweight="bold",
            )
        by_step = {r.step: r for r in rows}
        marked = [by_step[g.step] for g in summary.regressions]
        for r in marked:
            for ax in (top, bottom):
                ax.axvline(r.step, color=COLORS[Verdict.FAIL], lw=8, alpha=0.12)
        dropped = [r for r in marked if r.z is not None]
        if dropped:
            top.scatter(
                [r.step for r in dropped],
                [r.z for r in dropped],
                marker="v",
                s=150,
                facecolors="none",
                edgecolors=COLORS[Verdict.FAIL],
                linewidths=2,
                zorder=5,
                label="regression",
            )
        top.set_ylabel("z vs null adapters (σ)")
        _legend_outside(top)
        top.set_title(summary.line, fontsize=9.5, fontweight="normal", color="#424242", wrap=True)

        div = [r for r in rows if r.divergence is not None]
        band = [
            (r.step, r.null_mean, r.null_std)
            for r in div
            if r.null_mean is not None and r.null_std is not None
        ]
        if band:
            band_steps = [step for step, _, _ in band]
            bottom.fill_between(
                band_steps,
                [max(0.0, mean - 2 * std) for _, mean, std in band],
                [mean + 2 * std for _, mean, std in band],
                color=NULL_COLOR,
                alpha=0.3,
                lw=0,
                label="null adapters (mean ± 2σ)",
            )
            bottom.plot(band_steps, [mean for _, mean, _ in band], color="#616161", lw=1, ls="--")
        if div:
            bottom.plot(
                [r.step for r in div],
                [r.divergence for r in div],
                "-o",
                color=LINE_COLOR,
                lw=1.8,
                ms=5,
                label="real adapter",
            )
        else:
            _note_across(bottom, "no checkpoint could be evaluated", COLORS[Verdict.ERROR])
        bottom.set_ylim(bottom=0)
        bottom.set_xlabel("training step")
        bottom.set_ylabel("mean next-token JS\nfrom base (nats)")
        _legend_outside(bottom)
        fig.suptitle(title, fontsize=13, fontweight="bold")
        return _save(fig, path)


def write_plots(result: SuiteResult, plot_dir: PathLike) -> list[Path]:
    """Every plot that applies to ``result``, as PNGs in ``plot_dir``."""
    plot_dir = Path(plot_dir)
    written = []
    if result.probes:
        written.append(plot_z(result, plot_dir / "sway-z.png"))
    if ablation_probe(result) is not None:
        written.append(plot_ablation(result, plot_dir / "sway-ablation.png"))
    return written
