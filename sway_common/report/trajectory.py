"""A training run's checkpoints on screen and on disk: the table, the summary, the JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from sway_common.report.files import atomic_write_text, format_effect, format_metric, to_jsonable
from sway_common.report.plots import plot_trajectory
from sway_common.report.terminal import VERDICT_STYLES
from sway_common.stats import format_z
from sway_common.suite.trajectory import (
    CheckpointRow,
    TrajectorySummary,
    effect_text,
    effect_trend,
)
from sway_common.types import Verdict


def rows_table(rows: list[CheckpointRow]) -> Table:
    table = Table(title="Adapter vs null adapters, per checkpoint", title_justify="left")
    table.add_column("Step", justify="right")
    table.add_column("Checkpoint")
    table.add_column("JS (nats)", justify="right")
    table.add_column("Null mean ± sd", justify="right")
    table.add_column("z", justify="right")
    table.add_column("Effect", justify="right")
    table.add_column("Verdict")
    for r in rows:
        null = (
            "—"
            if r.null_mean is None
            else f"{format_metric(r.null_mean)} ± {format_metric(r.null_std)}"
        )
        table.add_row(
            str(r.step),
            Text(r.label),
            format_metric(r.divergence),
            null,
            format_z(r.z, r.null_n),
            format_effect(r.effect_ratio),
            Text(r.verdict.value, style=VERDICT_STYLES[r.verdict]),
        )
    return table


def print_summary(console: Console, rows: list[CheckpointRow], summary: TrajectorySummary) -> None:
    for r in rows:
        if r.verdict is Verdict.ERROR:
            console.print(Text(f"{r.label}: {r.message}", style="red"))
    first = summary.first_pass
    if first is None:
        console.print(
            Text(
                "No checkpoint rose above noise: every one is within what a random "
                "adapter of the same shape does.",
                style="yellow",
            )
        )
    else:
        console.print(
            Text(
                f"First above noise: {first.label} (z={format_z(first.z, first.null_n)}, "
                f"{format_metric(first.divergence)} nats).",
                style="green",
            )
        )
    if summary.best is not None and summary.best is not first:
        console.print(
            f"Best: {summary.best.label} ({effect_text(summary.best)}).",
            highlight=False,
        )
    if trend := effect_trend(rows):
        console.print(f"Effect: {trend}.", highlight=False)
    for r in summary.below_noise:
        console.print(Text(f"Not above noise at {r.label}: {r.message}", style="yellow"))
    for g in summary.regressions:
        console.print(Text(f"Regression at {g.label}: {g.reason}", style="red"))


def row_line(r: CheckpointRow) -> Text:
    """One checkpoint as the line `watch` prints when it finishes."""
    line = Text(
        f"{r.label:>18}  JS {format_metric(r.divergence):>9}  z {format_z(r.z, r.null_n):>8}  "
    )
    line.append(r.verdict.value, style=VERDICT_STYLES[r.verdict])
    if r.verdict is not Verdict.PASS:
        line.append(f"  {r.message}", style="dim")
    return line


def plot_or_note(rows: list[CheckpointRow], path: Path | None, console: Console) -> None:
    """The trajectory plot; a failure to draw it is a note, since the numbers are printed."""
    if path is None or not rows:
        return
    try:
        plot_trajectory(rows, path)
    except (OSError, ValueError) as e:
        console.print(f"[yellow]could not write the plot {path}: {e}[/]", highlight=False)


def write_trajectory_json(
    target: Path, run: dict[str, Any], rows: list[CheckpointRow], summary: TrajectorySummary
) -> None:
    """``run`` (what was measured: run dir, model, prompts, …), the rows and the summary."""
    payload = {
        "schema_version": 1,
        **run,
        "rows": [r.to_dict() for r in rows],
        "summary": {
            "line": summary.line,
            "last_passes": summary.last_passes,
            "first_pass_step": summary.first_pass.step if summary.first_pass else None,
            "best_step": summary.best.step if summary.best else None,
            "regressions": [vars(g) for g in summary.regressions],
        },
    }
    atomic_write_text(target, json.dumps(to_jsonable(payload), indent=2, allow_nan=False) + "\n")
