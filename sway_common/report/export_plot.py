"""The export-check plot: per prompt, where the export sits between base (0) and fine-tune (1)."""

from __future__ import annotations

from pathlib import Path

from sway_common.report.plots import COLORS, LINE_COLOR, NULL_COLOR, RC, PathLike, _save
from sway_common.types import SuiteResult, Verdict

EXPORT_PNG = "sway-export.png"
MEASURES = (("export_next_token", "next token", "o"), ("export_completion", "completion", "s"))


def plot_export(result: SuiteResult, path: PathLike) -> Path:
    """Each prompt's retention on both measures, with the band a faithful export stays in."""
    import matplotlib
    from matplotlib.figure import Figure

    probes = {p.name: p for p in result.probes}
    shown = [
        (probes[name], label, marker)
        for name, label, marker in MEASURES
        if name in probes and probes[name].evidence.get("per_prompt_retention")
    ]
    if not shown:
        raise ValueError("the result holds no export retention to plot")
    first = shown[0][0].evidence
    low, high = first["min_retention"], 1.0 / first["min_retention"]
    n = len(first["per_prompt_retention"])
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(9, 5.2), layout="constrained")
        ax = fig.add_subplot()
        ax.axhspan(
            low,
            high,
            color=COLORS[Verdict.PASS],
            alpha=0.12,
            lw=0,
            label=f"faithful export ({low:.0%}–{high:.0%})",
        )
        ax.axhline(1.0, color="black", lw=1.0, label="fine-tune (live adapter)")
        ax.axhline(0.0, color=NULL_COLOR, lw=1.5, ls="--", label="base model")
        for i, (probe, label, marker) in enumerate(shown):
            values = probe.evidence["per_prompt_retention"]
            xs = [x + (i - 0.5) * 0.18 for x in range(len(values))]
            pooled = probe.raw if probe.raw is not None else float("nan")
            ax.scatter(
                xs,
                values,
                marker=marker,
                s=40,
                zorder=3,
                color=COLORS.get(probe.verdict, LINE_COLOR),
                label=f"{label}: {pooled:.0%} pooled ({probe.verdict.value})",
            )
        ax.set_xticks(range(n))
        ax.set_xticklabels([str(i + 1) for i in range(n)])
        ax.set_xlabel("prompt")
        ax.set_ylabel("share of the adapter's effect kept")
        ax.set_title(
            "0 = the base model, 1 = the live fine-tune; pooled over prompts in the legend",
            fontsize=10,
            fontweight="normal",
            color="#424242",
        )
        fig.legend(loc="outside lower center", ncols=3, fontsize=9)
        fig.suptitle(
            f"Does the export keep the fine-tune? {result.verdict.value}",
            fontsize=13,
            fontweight="bold",
        )
        return _save(fig, path)
