"""A history of runs on screen and as Markdown: the probes × runs matrix, the last
change, and the gate's line."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from sway_common.report.files import format_score
from sway_common.report.terminal import VERDICT_STYLES
from sway_common.suite.history import Cell, History, delta, score_delta


def cell_text(cell: Cell | None) -> str:
    if cell is None:
        return "—"
    if cell.score is None:
        return cell.verdict.value
    return f"{cell.verdict.value} {format_score(cell.score)}"


def gate_line(h: History) -> str:
    """'REGRESSED: why; why' or 'no regression: what was compared'."""
    last, prev = h.runs[-1].label, h.runs[-2].label
    if h.regressed:
        return f"REGRESSED ({last} vs {prev}): " + "; ".join(h.regressions)
    shown = "; ".join(h.notes) if h.notes else "no gating probe newly fails"
    return f"no regression ({last} vs {prev}): {shown}"


def _labels(h: History) -> list[str]:
    return [r.label for r in h.runs]


def history_table(h: History) -> Table:
    """The matrix for the terminal: a row for the suite, then one per probe."""
    table = Table(title="Probes × runs (oldest first)", title_justify="left")
    table.add_column("Probe")
    for label in _labels(h):
        table.add_column(label)
    table.add_column("Δ last", justify="right")
    suite = [
        Text(
            f"{r.result.verdict.value} {format_score(r.result.score)}",
            VERDICT_STYLES.get(r.result.verdict, ""),
        )
        for r in h.runs
    ]
    table.add_row(Text("suite", style="bold"), *suite, score_delta(*h.scores[-2:]))
    for row in h.rows:
        cells = [
            Text(cell_text(c), style=VERDICT_STYLES[c.verdict]) if c else Text("—", style="dim")
            for c in row.cells
        ]
        name = Text(row.name + (" (gating)" if row.gating else ""))
        table.add_row(name, *cells, delta(row.cells[-2], row.cells[-1]))
    return table


def _md(value: str) -> str:
    return " ".join(value.replace("\\", "\\\\").replace("|", "\\|").split())


def render_history_markdown(h: History) -> str:
    """The same matrix and line as Markdown (for a PR comment or a CI summary)."""
    labels = _labels(h)
    title = "regressed" if h.regressed else "no regression"
    lines = [f"# sway-mlx history: {title}", "", f"**{_md(gate_line(h))}**", ""]
    lines.append("| Probe | " + " | ".join(_md(x) for x in labels) + " | Δ last |")
    lines.append("|---|" + "---|" * len(labels) + "---:|")
    suite = [f"{r.result.verdict.value} {format_score(r.result.score)}" for r in h.runs]
    lines.append(f"| **suite** | {' | '.join(suite)} | {score_delta(*h.scores[-2:])} |")
    for row in h.rows:
        name = _md(row.name) + (" (gating)" if row.gating else "")
        cells = " | ".join(cell_text(c) for c in row.cells)
        lines.append(f"| {name} | {cells} | {_md(delta(row.cells[-2], row.cells[-1]))} |")
    lines += ["", "Cells: verdict and the probe's score (0–1); — where the run had no such probe."]
    started = [(r.label, r.result.meta.get("started_at")) for r in h.runs]
    if any(t for _, t in started):
        lines += ["", "## Runs", ""]
        lines += [f"- {_md(label)}: `{t}`" for label, t in started if t]
    return "\n".join(lines) + "\n"
