"""Running a suite from the command line: check every input, load once, report, exit.

Shared by `eval` and `gate` (and the writing and printing of results by `export-check`).
Inputs are checked in the order a user fixes them, before any model loads; a report is
written whole or not at all.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from sway_common.app.inputs import check_adapters, check_model, check_outputs
from sway_common.app.options import (
    EXIT_ERROR,
    SuiteArgs,
    err_console,
    exit_code,
    exit_interrupted,
    fail,
    first_line,
    null_cache,
    require_plotting,
)
from sway_common.app.placement import placed
from sway_common.app.platform import build_backend, pick_backend
from sway_common.app.process import keep_torch_out
from sway_common.backend.model_views import ModelViews
from sway_common.report import headline, render_terminal, write_json, write_junit, write_markdown
from sway_common.report.figures import write_result_plots
from sway_common.report.html import write_html
from sway_common.report.progress import suite_progress
from sway_common.suite.inputs import context_problem
from sway_common.suite.placement import placement_problem
from sway_common.suite.runner import run_suite
from sway_common.suite.spec import ModelSpec, SpecError, load_spec
from sway_common.types import SuiteResult

REPORT_WRITERS = {
    "json": write_json,
    "markdown": write_markdown,
    "junit": write_junit,
    "html": write_html,
}


@dataclass
class RunOptions:
    """What `eval` and `gate` were asked for, besides the suite itself."""

    args: SuiteArgs
    threshold: float | None = None
    quiet: bool = False
    own_process: bool = False
    """Started from the command line: nothing else will import torch in this process."""
    prepare: Callable[[Any, ModelViews], str | None] | None = None
    """Called with the spec and the loaded backend before the suite runs (the quick eval
    renders its chat prompts so, with the model's own tokenizer); a returned line is a
    problem (exit 2)."""


def load_spec_or_fail(spec_path: str) -> Any:
    try:
        return load_spec(spec_path)
    except SpecError as e:
        if len(e.problems) == 1:
            fail(f"{e.source}: {e.problems[0]}")
        err_console.print(
            f"[bold red]error:[/] {escape(e.source)}: {len(e.problems)} problem(s) in the spec:",
            soft_wrap=True,
        )
        for p in e.problems:
            err_console.print(f"  - {p}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(EXIT_ERROR)


def build_or_fail(model: ModelSpec, backend: str, what: str | None = None, **kw: Any) -> ModelViews:
    """The backend for ``model``, or one line naming why it cannot load (exit 2)."""
    try:
        return build_backend(model, backend, **kw)
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        fail(f"cannot load {what}: {first_line(e)}" if what else first_line(e))


def _backend_choice(spec: Any, args: SuiteArgs) -> str:
    return pick_backend(args.backend if args.backend != "auto" else spec.model.kind)


def _check_inputs(spec: Any, args: SuiteArgs, adapters: list[str]) -> None:
    """Everything that can be checked without loading a model, in the order a user fixes it."""
    check_outputs(args.reports, args.plot_dir)
    if args.plot_dir:
        require_plotting()
    model = spec.model
    if problem := placement_problem(
        _backend_choice(spec, args), model.device_map, model.max_memory
    ):
        fail(problem)
    if _backend_choice(spec, args) == "dummy":
        return
    check_model(spec.model.base, allow_pickle=args.allow_pickle)
    check_adapters(adapters, allow_pickle=args.allow_pickle)


def _needs_torch(spec: Any, args: SuiteArgs) -> bool:
    """Whether an MLX run of ``spec`` would still import torch: to read a GGUF file or a
    pickled adapter, or to run a local embedding model."""
    base = str(spec.model.base or "")
    embeds = any(getattr(p, "embedding_model", None) for p in spec.probes)
    return args.allow_pickle or base.endswith(".gguf") or embeds


def _report_path(path: str, label: str | None) -> str:
    """``out/r.json`` for one adapter; ``out/r-<label>.json`` for each of several."""
    if label is None:
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}-{label}{p.suffix}"))


def write_reports(
    result: SuiteResult,
    reports: dict[str, str | None],
    plot_dir: str | None,
    label: str | None = None,
) -> None:
    """The report files asked for (``reports``: kind → path) and the plots."""
    for kind, path in reports.items():
        if path:
            REPORT_WRITERS[kind](result, _report_path(path, label))
    if plot_dir:
        write_result_plots(result, Path(plot_dir) / label if label else Path(plot_dir))


def emit(
    result: SuiteResult, line: str | Text, *, quiet: str | None = None, label: str | None = None
) -> Console | None:
    """Print a result: the line ``quiet`` alone when given, else the terminal report (under
    a rule naming ``label``, when given) ending in ``line``. Returns the console, for more
    lines (None when quiet)."""
    if quiet is not None:
        click.echo(quiet)
        return None
    console = Console()
    if label is not None:
        console.rule(f"adapter: {label}")
    render_terminal(result, console)
    console.print(line, highlight=False, soft_wrap=True)
    return console


def _score_line(result: SuiteResult) -> str:
    score = result.score if result.score is None else round(result.score, 3)
    return f"{result.verdict.value} score={score} threshold={result.threshold}"


def execute(spec: Any, opts: RunOptions, more_adapters: tuple[str, ...] = ()) -> NoReturn:
    """Run ``spec`` (and the same suite on ``more_adapters``, base loaded once), report, exit."""
    args = opts.args
    if args.seed is not None:
        spec.defaults.seed = args.seed
    spec.model = placed(spec.model, args.device_map, args.max_memory, args.dtype)
    adapters = [spec.model.adapter, *more_adapters]
    _check_inputs(spec, args, adapters)
    if opts.own_process and _backend_choice(spec, args) == "mlx" and not _needs_torch(spec, args):
        keep_torch_out()
    labels = [Path(a).name or str(a) for a in adapters] if more_adapters else [None]
    started = time.perf_counter()
    backend = build_or_fail(
        spec.model,
        args.backend,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
    )
    loaded = time.perf_counter()
    problem = opts.prepare(spec, backend) if opts.prepare is not None else None
    if problem := problem or context_problem(spec, backend):
        backend.close()
        fail(problem)
    try:
        codes = [
            _run_one(spec, backend, adapter, label, opts, first=adapter == adapters[0])
            for adapter, label in zip(adapters, labels, strict=False)
        ]
    finally:
        backend.close()
    if more_adapters:
        each = (time.perf_counter() - loaded) / len(adapters)
        err_console.print(
            f"base model loaded once in {loaded - started:.1f} s; "
            f"{len(adapters)} adapters at {each:.1f} s each",
            highlight=False,
        )
    sys.exit(max(codes))


def _run_one(
    spec: Any, backend: Any, adapter: str, label: str | None, opts: RunOptions, *, first: bool
) -> int:
    """One adapter's suite, reported; its exit code (Ctrl-C exits here with 130)."""
    if not first:
        backend.set_adapter(adapter)
    result = run_suite(
        spec,
        backend=backend,
        threshold=opts.threshold,
        progress=suite_progress if sys.stderr.isatty() else None,
        null_cache=null_cache(opts.args.no_cache),
    )
    write_reports(result, opts.args.reports, opts.args.plot_dir, label)
    quiet = _score_line(result) if opts.quiet else None
    emit(result, f"[bold]{headline(result)}[/]", quiet=quiet, label=label)
    if result.meta.get("interrupted"):
        exit_interrupted("interrupted: reports hold the probes that finished")
    return exit_code(result.verdict)
