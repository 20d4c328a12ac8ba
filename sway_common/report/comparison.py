"""Two adapters side by side (``sway-mlx compare``): the terminal table and the JSON file."""

from __future__ import annotations

import json
from typing import IO

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from sway_common.atomic import PathLike, atomic_write
from sway_common.report.files import format_effect, format_metric, to_jsonable
from sway_common.report.terminal import verdict_text
from sway_common.stats import format_z
from sway_common.suite.compare import Comparison, Interval
from sway_common.types import ProbeResult


def _interval(iv: Interval | None, fmt: str = "{:.3g}") -> str:
    if iv is None:
        return "—"
    value, low, high = iv
    return f"{fmt.format(value)} [{fmt.format(low)}–{fmt.format(high)}]"


def _cell(p: ProbeResult | None) -> Text:
    if p is None:
        return Text("—")
    out = verdict_text(p.verdict)
    out.append(f" {format_metric(p.raw)}")
    if p.z is not None:
        out.append(f" z={format_z(p.z, p.null.n if p.null else None)}")
    if p.effect_ratio is not None:
        out.append(f" {format_effect(p.effect_ratio)}")
    return out


def _suites(c: Comparison) -> Table:
    """Each adapter against the base and its nulls: one row per probe, A and B beside."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="each against the base and its nulls")
    table.add_column("Probe", overflow="fold", min_width=10)
    table.add_column("A", overflow="fold")
    table.add_column("B", overflow="fold")
    a, b = c.results
    theirs = {p.name: p for p in b.probes}
    for p in a.probes:
        table.add_row(Text(p.name), _cell(p), _cell(theirs.get(p.name)))
    table.add_row(Text("suite", style="bold"), verdict_text(a.verdict), verdict_text(b.verdict))
    return table


def _harm(c: Comparison) -> Table:
    """What each keeps of general knowledge and prose, item by item: B − A."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="what B forgets against A")
    table.add_column("Probe", overflow="fold", min_width=10)
    table.add_column("B − A per item [95%]", no_wrap=True)
    table.add_column("B forgets", no_wrap=True)
    for h in c.harm:
        says = {"more": "more", "less": "less", "same": "as much"}[h.says]
        table.add_row(Text(h.name), Text(_interval(h.difference, "{:+.3g}")), Text(says))
    return table


def _direct(c: Comparison) -> Table:
    """A against B on the target prompts."""
    s = c.shift
    n = len(c.prompts)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title=f"A against B on {n} target prompts")
    table.add_column("Measure")
    table.add_column("Value [95% over prompts]", no_wrap=True)
    table.add_row("JS between A and B (nats)", _interval(s.distance))
    table.add_row("B's effect ÷ A's", _interval(s.strength, "{:.3g}×"))
    table.add_row("B closest to A scaled by", _interval(s.along, "{:g}"))
    table.add_row("B's effect off A's path", _interval(s.elsewhere, "{:.0%}"))
    table.add_row("cosine of the straight shifts", _interval(s.cosine, "{:.2f}"))
    return table


def render_comparison(c: Comparison, console: Console) -> None:
    console.print(Text(f"A = {c.a}\nB = {c.b}", style="dim"))
    console.print(_suites(c))
    if c.harm:
        console.print(_harm(c))
    console.print(_direct(c))
    console.print(Text(c.verdict, style="bold"), soft_wrap=True)


def write_comparison_json(c: Comparison, path: PathLike) -> None:
    payload = to_jsonable(c.to_dict())

    def write(f: IO[str]) -> None:
        json.dump(payload, f, indent=2, allow_nan=False)
        f.write("\n")

    atomic_write(path, write)
