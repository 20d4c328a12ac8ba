"""export-check's weight-space check on the command line: read, measure, print, report.

``--weights-only`` runs only this (no model loads: the headers of the safetensors files
or the GGUF, and the adapted modules' weights are read, nothing else); without the flag
it is printed first, before the forward-pass measurement. Bad input is one line and exit 2, like the rest of
export-check.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from sway_common import __version__
from sway_common.adapters import AdapterFormatError, read_adapter
from sway_common.app.options import fail, first_line
from sway_common.app.run import write_reports
from sway_common.gguf_weights import GGUFWeights
from sway_common.probes.context import NullCalibration
from sway_common.suite.export_floor import FloorModels, floor_models
from sway_common.suite.export_math import format_multiple
from sway_common.suite.export_weights import WeightCheck, check_weights, weight_result
from sway_common.suite.runner import composite
from sway_common.types import SuiteResult
from sway_common.weight_reader import ModelWeights, WeightReadError, WeightSource


def is_gguf(export: str | Path) -> bool:
    path = Path(export).expanduser()
    return path.is_file() and path.suffix.lower() == ".gguf"


@functools.lru_cache(maxsize=2)
def _gguf(path: Path, _stamp: tuple[int, int]) -> GGUFWeights:
    """A GGUF file read once per command (its header is parsed whole: seconds for a real
    model's vocabulary), keyed by size and time so a rewritten file is read again."""
    return GGUFWeights(path)


def read_gguf(path: Path) -> GGUFWeights:
    stat = Path(path).stat()
    return _gguf(Path(path).resolve(), (stat.st_size, stat.st_mtime_ns))


def gguf_config(path: Path) -> dict[str, Any]:
    """The config fields a GGUF file's header gives (its shape), or one line and exit 2."""
    try:
        return read_gguf(path).config
    except WeightReadError as e:
        fail(first_line(e))


def open_weights(path: Path, what: str) -> WeightSource:
    """The weights of a model dir or GGUF file; a :class:`WeightReadError` naming
    ``what`` otherwise."""
    try:
        return read_gguf(path) if is_gguf(path) else ModelWeights(path)
    except WeightReadError as e:
        raise WeightReadError(f"cannot read {what}'s weights: {first_line(e)}") from None


def measure(
    base_dir: Path,
    adapter: str,
    export: Path,
    *,
    runs: int,
    min_share: float,
    allow_pickle: bool = False,
) -> WeightCheck:
    """Read the three and measure the delta's survival; :class:`WeightReadError` when
    something cannot be read or compared (the adapter was checked before)."""
    try:
        weights = read_adapter(adapter, allow_pickle=allow_pickle)
    except AdapterFormatError as e:
        raise WeightReadError(first_line(e)) from None
    base = open_weights(base_dir, "the base model")
    exported = open_weights(export, "the export")
    try:
        return check_weights(weights, base, exported, runs=runs, min_share=min_share)
    except WeightReadError as e:
        raise WeightReadError(f"cannot compare the weights: {first_line(e)}") from None


def floor_for(
    base_dir: Path, adapter: str, export: Path, *, runs: int, allow_pickle: bool = False
) -> FloorModels:
    """The forward check's noise floor, drawn with the run's nulls; one that cannot be
    built says why (the forward check then judges without it)."""
    try:
        weights = read_adapter(adapter, allow_pickle=allow_pickle)
        base = open_weights(base_dir, "the base model")
        exported = open_weights(export, "the export")
        return floor_models(weights, base, exported, NullCalibration(runs=runs).specs())
    except (WeightReadError, AdapterFormatError) as e:
        return FloorModels(missing=f"no noise floor: {first_line(e)}")


def _pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.1%}"


def _floor(mean: float, spread: float) -> str:
    return "—" if math.isnan(mean) else f"{mean:.2g}×±{spread:.1g}"


def table(check: WeightCheck) -> Table:
    """One row per adapted module: retained, cosine, off-delta (and, for a lossy format,
    what a faithful export keeps and the noise floor: the off-delta storing a random
    delta of this size leaves)."""
    lossy = any(m.storage != "float32" for m in check.modules)
    t = Table(
        title="weights: the adapter's ΔW in the export",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    t.add_column("module", no_wrap=True, overflow="ellipsis")
    for name in ("retained", "cosine", "off-delta") + (
        ("faithful", "noise floor") if lossy else ()
    ):
        # The numbers keep their width on a narrow terminal; the module names give way.
        t.add_column(name, justify="right", no_wrap=True, min_width=max(len(name), 7))
    rows: list[tuple[str, Any]] = [(m.name, m) for m in check.modules]
    rows.append(("all (‖ΔW‖²-weighted)", check))
    for i, (name, r) in enumerate(rows):
        cells = [name, _pct(r.retained), f"{r.cosine:.3f}", format_multiple(r.off_delta)]
        if lossy:
            cells += [_pct(r.faithful), _floor(r.floor, r.floor_spread)]
        last = i == len(rows) - 1
        style = "bold" if last else "red" if r.lost else None
        t.add_row(*cells, style=style, end_section=i == len(rows) - 2)
    return t


def verdict_text(check: WeightCheck, prefix: str = "") -> Text:
    verdict = "PASS" if check.passed else "FAIL"
    return Text(f"{prefix}{verdict}: {check.message}", style="bold" if prefix == "" else "")


def print_check(check: WeightCheck, console: Console, prefix: str = "") -> None:
    console.print(table(check))
    console.print(verdict_text(check, prefix), highlight=False, soft_wrap=True)


def weights_only_result(check: WeightCheck, meta: dict[str, Any], started: float) -> SuiteResult:
    """The check alone as a suite result: one gating probe, ``weight_delta``, whose
    verdict is the suite's (its score, the share, is reported but decides nothing: a
    format-limited share passes below ``min_share``)."""
    probe = weight_result(check, gating=True)
    score, cats = composite([probe])
    meta = {
        "command": "export-check",
        "weights_only": True,
        "sway_version": __version__,
        **meta,
        "headline": check.message,
        "duration_s": round(time.time() - started, 3),
    }
    return SuiteResult(
        probes=[probe],
        verdict=probe.verdict,
        score=score,
        category_scores=cats,
        threshold=check.min_share,
        meta=meta,
    )


def report_weights_only(result: SuiteResult, reports: dict[str, str | None], quiet: bool) -> None:
    """--weights-only: the reports and the verdict line (the table came before)."""
    write_reports(result, reports, None)
    line = f"{result.verdict.value}: {result.meta.get('headline', '')}"
    if quiet:
        click.echo(line)
    else:
        Console().print(Text(line, style="bold"), highlight=False, soft_wrap=True)
