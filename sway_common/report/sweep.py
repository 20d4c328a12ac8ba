"""A sweep's results in one table: adapter × probe, best first; as JSON, Markdown and text.

Input is the sweep's entries, one per adapter (plain dicts: the report ``eval --json``
writes, or the error that stopped the adapter). Rows are sorted by the overall verdict
(PASS, WARN, FAIL, SKIP, ERROR), then by effect, largest first: the headline probe's
effect ratio over a random adapter of the same size (``delta_kl``'s, else the largest a
probe reports).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from sway_common.atomic import atomic_write_text
from sway_common.report.files import format_effect, format_score
from sway_common.report.terminal import VERDICT_STYLES
from sway_common.types import Verdict

VERDICT_ORDER = {v: i for i, v in enumerate(("PASS", "WARN", "FAIL", "SKIP", "ERROR"))}
HEADLINE_KIND = "delta_kl"


@dataclass
class SweepRow:
    """One adapter's line of the table."""

    name: str
    adapter: str
    verdict: str
    score: float | None
    effect: float | None
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Probe name → its ``verdict``, ``effect`` and ``z``."""
    headline: str = ""
    seconds: float = 0.0
    attempts: int = 1


def effect_of(report: Mapping[str, Any]) -> float | None:
    """The headline probe's effect ratio, else the largest any probe reports."""
    probes = report.get("probes", [])
    for p in probes:
        if p.get("kind") == HEADLINE_KIND and _finite(p.get("effect_ratio")):
            return float(p["effect_ratio"])
    effects = [float(p["effect_ratio"]) for p in probes if _finite(p.get("effect_ratio"))]
    return max(effects) if effects else None


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def row_of(entry: Mapping[str, Any]) -> SweepRow:
    report = entry.get("report")
    base = {"name": entry["name"], "adapter": entry["adapter"]}
    extra = {"seconds": entry.get("seconds", 0.0), "attempts": entry.get("attempts", 1)}
    if not report:
        error = str(entry.get("error") or "no report")
        return SweepRow(**base, verdict="ERROR", score=None, effect=None, headline=error, **extra)
    cells = {
        p["name"]: {"verdict": p["verdict"], "effect": p.get("effect_ratio"), "z": p.get("z")}
        for p in report.get("probes", [])
    }
    return SweepRow(
        **base,
        verdict=str(report["verdict"]),
        score=report.get("score"),
        effect=effect_of(report),
        cells=cells,
        headline=str(report.get("headline", "")),
        **extra,
    )


def sorted_rows(entries: Sequence[Mapping[str, Any]]) -> list[SweepRow]:
    """Best first: verdict, then effect (largest first; none last), then name."""
    rows = [row_of(e) for e in entries]

    def key(r: SweepRow) -> tuple[int, float, str]:
        effect = -r.effect if r.effect is not None else math.inf
        return VERDICT_ORDER.get(r.verdict, len(VERDICT_ORDER)), effect, r.name

    return sorted(rows, key=key)


def probe_names(rows: Sequence[SweepRow]) -> list[str]:
    """Every probe any adapter ran, in the order they ran."""
    names: dict[str, None] = {}
    for r in rows:
        names.update(dict.fromkeys(r.cells))
    return list(names)


def cell_text(cell: Mapping[str, Any] | None) -> str:
    if cell is None:
        return "—"
    effect = cell.get("effect")
    return f"{cell['verdict']} {format_effect(effect)}" if _finite(effect) else str(cell["verdict"])


def sweep_payload(summary: Mapping[str, Any], entries: Sequence[Mapping[str, Any]]) -> dict:
    """The sweep's JSON: ``sweep`` (what ran), ``table`` (the sorted rows) and ``adapters``
    (one entry per adapter, in the table's order, each with its full ``eval --json`` report)."""
    rows = sorted_rows(entries)
    by_name = {e["name"]: e for e in entries}
    return {
        "sweep": dict(summary),
        "table": {"probes": probe_names(rows), "rows": [dataclasses.asdict(r) for r in rows]},
        "adapters": [dict(by_name[r.name]) for r in rows],
    }


def write_sweep_json(payload: Mapping[str, Any], path: str) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, allow_nan=False) + "\n")


def _md(text: Any) -> str:
    return " ".join(str(text).replace("\\", "\\\\").replace("|", "\\|").split())


def render_sweep_markdown(
    payload: Mapping[str, Any], links: Mapping[str, str] | None = None
) -> str:
    """The table as Markdown, under a line of what ran; ``links``: name → report file."""
    s = payload["sweep"]
    rows = [SweepRow(**r) for r in payload["table"]["rows"]]
    probes = payload["table"]["probes"]
    counts = {v: sum(r.verdict == v for r in rows) for v in VERDICT_ORDER}
    lines = [
        f"# sway-mlx sweep: {len(rows)} adapters of {_md(s.get('model'))}",
        "",
        ", ".join(f"{n} {v}" for v, n in counts.items() if n)
        + f" · {s.get('workers')} worker(s), {s.get('engine')} · {s.get('duration_s')} s",
        "",
        "| Adapter | Verdict | Score | Effect | " + " | ".join(_md(p) for p in probes) + " |",
        "|---|---|---:|---:|" + "---|" * len(probes),
    ]
    for r in rows:
        name = f"[{_md(r.name)}]({links[r.name]})" if links and r.name in links else _md(r.name)
        cells = [cell_text(r.cells.get(p)) for p in probes]
        lines.append(
            f"| {name} | **{r.verdict}** | {format_score(r.score)} | {format_effect(r.effect)} | "
            + " | ".join(_md(c) for c in cells)
            + " |"
        )
    errors = [r for r in rows if r.verdict == "ERROR"]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {_md(r.name)}: {_md(r.headline)}" for r in errors]
    return "\n".join(lines) + "\n"


def sweep_table(payload: Mapping[str, Any]) -> Table:
    """The table for a terminal: per adapter its verdict, score and effect, and the probes
    that did not pass (all of them are in the Markdown and JSON): fits 80 columns."""
    rows = [SweepRow(**r) for r in payload["table"]["rows"]]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("Adapter", overflow="fold", min_width=8)
    table.add_column("Verdict", no_wrap=True)
    table.add_column("Score", justify="right", no_wrap=True)
    table.add_column("Effect", justify="right", no_wrap=True)
    table.add_column("Not passing", overflow="fold")
    for r in rows:
        others = Text(", ").join(
            Text(f"{p} ") + _verdict_cell(c)
            for p, c in r.cells.items()
            if c["verdict"] != Verdict.PASS.value
        )
        table.add_row(
            Text(r.name),
            _verdict_cell({"verdict": r.verdict}),
            Text(format_score(r.score)),
            Text(format_effect(r.effect)),
            others if r.cells else Text(r.headline, style="dim"),
        )
    return table


def _verdict_cell(cell: Mapping[str, Any] | None) -> Text:
    if cell is None:
        return Text("—", style="dim")
    verdict = str(cell["verdict"])
    style = VERDICT_STYLES[Verdict(verdict)] if verdict in VERDICT_ORDER else ""
    return Text(verdict, style=style)


class SweepBar:
    """One bar across the sweep: adapters done of all, what is running, time left."""

    def __init__(self, bar: Progress | None, total: int) -> None:
        self._bar = bar
        self._task = bar.add_task("", total=total, running="") if bar is not None else None
        self._running: list[str] = []

    def started(self, name: str) -> None:
        self._running.append(name)
        self._show()

    def finished(self, name: str) -> None:
        if name in self._running:
            self._running.remove(name)
        if self._bar is not None and self._task is not None:
            self._bar.advance(self._task)
        self._show()

    def _show(self) -> None:
        if self._bar is None or self._task is None:
            return
        shown = ", ".join(self._running[:3]) + (" …" if len(self._running) > 3 else "")
        self._bar.update(self._task, running=shown)


@contextmanager
def sweep_progress(total: int, show: bool) -> Iterator[SweepBar]:
    """A transient bar on stderr when ``show`` (a terminal); else a bar that draws nothing."""
    if not show:
        yield SweepBar(None, total)
        return
    bar = Progress(
        TextColumn("[bold]sweep"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[running]}"),
        transient=True,
        console=Console(stderr=True),
    )
    with bar:
        yield SweepBar(bar, total)
