"""Terminal report: one rich table of probes, category scores, and the overall verdict."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from sway_common.report.files import (
    composite_line,
    format_effect,
    format_metric,
    format_score,
    format_z,
)
from sway_common.types import SuiteResult, Verdict

VERDICT_STYLES: dict[Verdict, str] = {
    Verdict.PASS: "green",
    Verdict.WARN: "yellow",
    Verdict.FAIL: "red",
    Verdict.ERROR: "bold red",
    Verdict.SKIP: "dim",
}


def verdict_text(verdict: Verdict) -> Text:
    return Text(verdict.value, style=VERDICT_STYLES[verdict])


def _probe_table(result: SuiteResult) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, expand=False)
    # The numbers stay in narrow aligned columns; the sentences go below the table,
    # where they can use the full width of an 80-column terminal.
    table.add_column("Probe", overflow="fold", min_width=12)
    table.add_column("Kind", no_wrap=True)
    table.add_column("Verdict", no_wrap=True)
    table.add_column("Raw", justify="right", no_wrap=True)
    table.add_column("z", justify="right", no_wrap=True)
    table.add_column("Effect", justify="right", no_wrap=True)
    for p in result.probes:
        # Text cells, not str: a "[...]" in a probe name or message is not rich markup.
        table.add_row(
            Text(p.name),
            Text(p.kind, style="dim"),
            verdict_text(p.verdict),
            Text(format_metric(p.raw)),
            Text(format_z(p.z, p.null.n if p.null else None)),
            Text(format_effect(p.effect_ratio)),
        )
    return table


def _messages(result: SuiteResult) -> Text:
    out = Text()
    for p in result.probes:
        if p.message:
            out.append(f"{p.name}: ", style=VERDICT_STYLES[p.verdict])
            out.append(p.message + "\n")
    return out


def render_terminal(result: SuiteResult, console: Console | None = None) -> None:
    console = console if console is not None else Console()
    if result.probes:
        console.print(_probe_table(result))
        console.print(_messages(result), end="")
    else:
        console.print(Text("No probes ran.", style="dim"))

    if result.category_scores:
        line = Text("Categories: ", style="bold")
        for i, (name, score) in enumerate(result.category_scores.items()):
            if i:
                line.append("  ·  ", style="dim")
            line.append(f"{name} ")
            line.append(format_score(score), style="bold")
        console.print(line)

    overall = Text("Overall: ", style="bold")
    overall.append(result.verdict.value, style=VERDICT_STYLES[result.verdict] + " bold")
    overall.append(f"  {composite_line(result)}")
    console.print(overall)
