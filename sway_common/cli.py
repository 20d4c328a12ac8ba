"""`sway-mlx`: the command line.

Exit codes: 0 the adapter passed, 1 a gating probe failed or the score is below the
threshold, 2 bad input or a runtime error, 130 interrupted (reports hold what finished).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console

from sway_common import __version__

EXIT_PASS, EXIT_FAIL, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130

err_console = Console(stderr=True)


def fail(message: str) -> NoReturn:
    """One line naming the problem (and the fix), exit 2."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(EXIT_ERROR)


def _load_spec_or_fail(spec_path: str) -> Any:
    from sway_common.spec import SpecError, load_spec

    try:
        return load_spec(spec_path)
    except SpecError as e:
        err_console.print(f"[bold red]error:[/] {e.source}: {len(e.problems)} problem(s) in the spec:", soft_wrap=True)
        for p in e.problems:
            err_console.print(f"  - {p}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(EXIT_ERROR)


def _build_or_fail(model: Any, backend: str) -> Any:
    from sway_common.platform import build_backend

    try:
        return build_backend(model, backend)
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(first)


def _execute(spec: Any, backend_name: str, seed: int | None, threshold: float | None,
             reports: dict[str, str | None], quiet: bool = False) -> NoReturn:
    from sway_common.report import render_terminal, write_json, write_junit, write_markdown
    from sway_common.runner import run_suite
    from sway_common.types import Verdict

    if seed is not None:
        spec.defaults.seed = seed
    backend = _build_or_fail(spec.model, backend_name)
    try:
        result = run_suite(spec, backend=backend, threshold=threshold, show_progress=sys.stderr.isatty())
    finally:
        close = getattr(backend, "close", None)
        if callable(close):
            close()
    writers = {"json": write_json, "markdown": write_markdown, "junit": write_junit}
    for kind, path in reports.items():
        if path:
            writers[kind](result, path)
    if not quiet:
        render_terminal(result, Console())
    else:
        click.echo(f"{result.verdict.value} score={result.score if result.score is None else round(result.score, 3)} threshold={result.threshold}")
    if result.meta.get("interrupted"):
        err_console.print("interrupted: reports hold the probes that finished")
        sys.exit(EXIT_INTERRUPTED)
    sys.exit({Verdict.PASS: EXIT_PASS, Verdict.WARN: EXIT_PASS, Verdict.FAIL: EXIT_FAIL}.get(result.verdict, EXIT_ERROR))


def report_options(f: Any) -> Any:
    f = click.option("--junit", "junit_path", type=click.Path(dir_okay=False), help="Write a JUnit XML report here (for CI).")(f)
    f = click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), help="Write a Markdown report here.")(f)
    f = click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the full result as JSON here (loads back with sway_common.report.load_json).")(f)
    f = click.option("--backend", type=click.Choice(["auto", "mlx", "hf", "dummy"]), default="auto", show_default=True,
                     help="auto: MLX on Apple silicon, HF on CUDA, elsewhere HF if torch is installed, else MLX.")(f)
    f = click.option("--seed", type=int, default=None, help="Override the spec's seed.")(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="sway-mlx")
def app() -> None:
    """Differential tests for LoRA adapters.

    Did this adapter really change the model, beyond what a random adapter of the
    same shape would do? Every measurement compares views of ONE loaded model: the
    base, the fine-tune, the adapter scaled by λ, and seeded random "null" adapters.

    \b
    Quick start:
      sway-mlx eval sway.yaml --json result.json   # run a suite
      sway-mlx gate sway.yaml --threshold 0.6      # CI: exit 1 below the threshold
      sway-mlx list-probes                         # what a suite can contain
      sway-mlx doctor                              # which backend runs here
    """


@app.command("eval")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@report_options
@click.option("--threshold", type=float, default=None, help="Composite score needed to pass (default: the spec's defaults.coverage_threshold).")
def eval_cmd(spec_path: str, json_path: str | None, markdown_path: str | None, junit_path: str | None,
             backend: str, seed: int | None, threshold: float | None) -> None:
    """Run the suite in SPEC (sway.yaml v1, YAML or JSON) and report.

    The spec is validated completely before any model loads; every problem is listed
    at once. Exit 0 when the adapter passes, 1 when a gating probe fails, 2 on bad
    input or errors.
    """
    spec = _load_spec_or_fail(spec_path)
    _execute(spec, backend, seed, threshold, {"json": json_path, "markdown": markdown_path, "junit": junit_path})


@app.command("gate")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@report_options
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=None, help="Composite score needed to pass (default: the spec's defaults.coverage_threshold).")
def gate_cmd(spec_path: str, json_path: str | None, markdown_path: str | None, junit_path: str | None,
             backend: str, seed: int | None, threshold: float | None) -> None:
    """CI gate: run SPEC, print one line, exit 0 pass / 1 fail / 2 error."""
    spec = _load_spec_or_fail(spec_path)
    _execute(spec, backend, seed, threshold, {"json": json_path, "markdown": markdown_path, "junit": junit_path}, quiet=True)


@app.command("list-probes")
def list_probes_cmd() -> None:
    """List the probe kinds a suite can use, with their fields and defaults."""
    import dataclasses

    from sway_common.probes import REGISTRY

    console = Console()
    for kind, cls in sorted(REGISTRY.items()):
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        gate = "gating" if cls.gating else "non-gating"
        console.print(f"[bold]{kind}[/]  ({cls.category}, {gate})  {doc}", highlight=False)
        for f in dataclasses.fields(cls.Config):
            if f.name in ("name", "kind"):
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            shown = repr(default)
            console.print(f"    {f.name}: {shown if len(shown) < 60 else shown[:57] + '...'}", highlight=False, markup=False)


@app.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor_cmd(as_json: bool) -> None:
    """Show the platform, which backends import, versions, and what `auto` picks."""
    from sway_common.platform import doctor_report

    report = doctor_report()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    console = Console()
    console.print(f"platform     {report['platform']} (python {report['python']})", highlight=False)
    console.print(f"apple silicon {report['apple_silicon']}   cuda {report['cuda']}", highlight=False)
    for name, status in report["backends"].items():
        colour = "green" if status == "ok" else "yellow"
        console.print(f"backend {name:<5} [{colour}]{status}[/]", highlight=False)
    for dist, version in report["packages"].items():
        console.print(f"  {dist:<13} {version or '-'}", highlight=False)
    console.print(f"--backend auto picks: [bold]{report['auto_picks']}[/]")


@app.command("convert-adapter")
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@click.option("--to", "to", type=click.Choice(["mlx", "peft"]), required=True, help="Target format.")
def convert_adapter_cmd(src: str, dst: str, to: str) -> None:
    """Convert a LoRA adapter between mlx-lm and PEFT layouts (weights bit-exact).

    SRC is an adapter directory (or an mlx-lm checkpoint file NNNNNNN_adapters.safetensors);
    DST is a new directory. Parts the target cannot express are refused, never dropped.
    """
    from sway_common.adapters import convert_adapter

    if Path(dst).exists() and any(Path(dst).iterdir()):
        fail(f"{dst} exists and is not empty; choose a new directory")
    try:
        out = convert_adapter(src, dst, to=to)
    except (OSError, ValueError) as e:
        fail(str(e).splitlines()[0])
    click.echo(f"wrote {to} adapter to {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
