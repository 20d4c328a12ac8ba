"""`sway-mlx history`: eval runs over time, and whether the last one regressed.

No model loads: the command reads ``eval --json`` reports (oldest first), prints the
probes × runs matrix with the last change, optionally writes it as Markdown, and exits
1 when the last run regressed against the one before it (a gating probe newly FAILs or
ERRORs, or the composite score fell by more than ``--max-drop``), else 0. An unreadable
file, or runs that are not of one suite and model, is one line and exit 2, before any
output is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console

from sway_common.app.inputs import check_output
from sway_common.app.options import EXIT_FAIL, EXIT_PASS, fail, file_option
from sway_common.report.files import atomic_write_text
from sway_common.report.history import gate_line, history_table, render_history_markdown
from sway_common.suite.history import (
    DEFAULT_MAX_DROP,
    HistoryError,
    Run,
    build_history,
    unique_labels,
)
from sway_common.types import SuiteResult


def read_run(path: Path, label: str) -> Run:
    """One ``eval --json`` report, or one line naming the file and the fix, exit 2."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        fail(f"{path} does not exist; give the eval --json reports to compare")
    except IsADirectoryError:
        fail(f"{path} is a directory; give the eval --json report files")
    except UnicodeDecodeError:
        fail(f"{path} is not UTF-8 JSON; give the reports eval --json writes")
    except json.JSONDecodeError as e:
        fail(f"{path} is not valid JSON (line {e.lineno}): {e.msg}; give an eval --json report")
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror or e}; check the path")
    if not isinstance(data, dict) or "probes" not in data or "verdict" not in data:
        fail(f"{path} is not an eval --json report (no verdict and probes); give one")
    try:
        return Run(label, SuiteResult.from_dict(data))
    except ValueError as e:
        fail(f"{path}: {e}")
    except (KeyError, TypeError, AttributeError) as e:
        fail(f"{path} is a malformed eval --json report ({type(e).__name__}: {e}); rewrite it")


@click.command("history")
@click.argument("runs", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--max-drop",
    type=click.FloatRange(min=0.0),
    default=DEFAULT_MAX_DROP,
    show_default=True,
    help="Fail when the composite score falls by more than this from the run before the last.",
)
@file_option("--markdown", "markdown_out", "Also write the matrix and the gate's line as Markdown.")
def history_cmd(runs: tuple[Path, ...], max_drop: float, markdown_out: str | None) -> None:
    """Compare eval runs (their --json reports, oldest first) and gate on the last one.

    \b
    Prints a probes × runs matrix (each cell: the verdict and the probe's score)
    with the change from the run before the last. Exit 1 when the last run
    regressed: a gating probe newly FAILs or ERRORs, or the composite score fell
    by more than --max-drop; else 0. No model is loaded.

    \b
      sway-mlx eval ... --json runs/r1.json        (one per checkpoint or commit)
      sway-mlx history runs/r1.json runs/r2.json runs/r3.json --markdown history.md
    """
    if len(runs) < 2:
        fail("history needs at least two runs: give two or more eval --json reports, oldest first")
    check_output(markdown_out, "--markdown")
    labels = unique_labels(list(runs))
    loaded = [read_run(path, label) for path, label in zip(runs, labels, strict=True)]
    try:
        history = build_history(loaded, max_drop)
    except HistoryError as e:
        fail(str(e))
    if markdown_out:
        atomic_write_text(markdown_out, render_history_markdown(history))
    console = Console()
    console.print(history_table(history))
    style = "bold red" if history.regressed else "bold green"
    console.print(gate_line(history), style=style, highlight=False, soft_wrap=True)
    sys.exit(EXIT_FAIL if history.regressed else EXIT_PASS)
