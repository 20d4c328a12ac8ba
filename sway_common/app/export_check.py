"""`sway-mlx export-check`: does the fused / merged / re-quantized export keep the fine-tune?

Registered on the main ``app`` by ``sway_common.app.cli``. Every input is checked (paths,
that the export is a model of the same architecture and vocabulary, plotting) before a
model loads; bad input is one line on stderr and exit 2. The weight-space check
(:mod:`sway_common.app.weight_check`) runs first, and alone with ``--weights-only``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click
from rich.console import Console
from rich.text import Text

from sway_common.app.export_inputs import check_pair, export_dir_of
from sway_common.app.inputs import check_adapters, check_model, check_outputs
from sway_common.app.options import (
    SuiteArgs,
    err_console,
    exit_code,
    exit_interrupted,
    fail,
    file_option,
    first_line,
    null_cache,
    read_prompts,
    require_plotting,
    runs_option,
    suite_options,
)
from sway_common.app.placement import placed
from sway_common.app.run import build_or_fail, emit, write_reports
from sway_common.app.weight_check import (
    floor_for,
    gguf_config,
    is_gguf,
    measure,
    print_check,
    report_weights_only,
    table,
    weights_only_result,
)
from sway_common.backend.model_views import ModelViews
from sway_common.report.export_plot import EXPORT_PNG, plot_export
from sway_common.suite.export import check_export
from sway_common.suite.export_floor import FloorModels
from sway_common.suite.export_math import ExportCriteria
from sway_common.suite.export_weights import WeightCheck, weight_result
from sway_common.suite.spec import ModelSpec
from sway_common.types import ProbeResult, SuiteResult
from sway_common.weight_reader import WeightReadError


def _no_loader_bars() -> None:
    """Loading bars of transformers / the hub would bury the verdict line; the spinner
    below shows progress instead. (Their warnings stay: a weight missing from an export
    is worth reading.)"""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported already: the variable is read at import
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@contextmanager
def _progress(quiet: bool) -> Iterator[Callable[[str], None]]:
    """A transient spinner on stderr naming the current step (nothing when piped or quiet)."""
    if quiet or not sys.stderr.isatty():
        yield lambda _msg: None
        return
    with err_console.status("starting") as status:
        yield lambda msg: status.update(msg)


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _report(result: SuiteResult, args: SuiteArgs, quiet: bool) -> None:
    write_reports(result, args.reports, args.plot_dir)
    if args.plot_dir and any(p.evidence.get("per_prompt_retention") for p in result.probes):
        plot_export(result, Path(args.plot_dir) / EXPORT_PNG)
    line = f"{result.verdict.value}: {result.meta.get('headline', '')}"
    console = emit(result, Text(line, style="bold"), quiet=line if quiet else None)
    if console is None:
        return
    memory = result.meta.get("memory") or {}
    console.print(
        f"peak memory (base + adapter and the export, two models): "
        f"{_human_bytes(memory.get('peak_rss_bytes'))} resident, "
        f"{_human_bytes(memory.get('framework_peak_bytes'))} in the framework's allocator",
        highlight=False,
        style="dim",
    )


def _close(*backends: ModelViews | None) -> None:
    for b in backends:
        if b is not None:
            b.close()


@dataclass
class ExportJob:
    """What `export-check` was asked to compare, and how."""

    model: str
    adapter: str
    export: str
    prompts: list[str]
    backend: str
    criteria: ExportCriteria
    runs: int
    seed: int
    no_cache: bool
    allow_pickle: bool = False
    trust_remote_code: bool = False
    weights_only: bool = False
    device_map: str | None = None
    max_memory: dict[str, str] | None = None
    """Where both models' weights go (``--device-map``/``--max-memory``)."""
    dtype: str | None = None
    """The precision both models run in (``--dtype``)."""


@dataclass
class Prepared:
    """The checked inputs: both model dirs, and the weight check's probe once measured."""

    base_dir: Path
    export_dir: Path
    weights: ProbeResult | None = None
    floor: FloorModels | None = None


def _prepare(job: ExportJob, note: Callable[[str], None]) -> Prepared:
    """Resolve and check base and export (a GGUF dequantized, unless weights only)."""
    if job.weights_only and is_gguf(job.export):  # read as it is: nothing to dequantize
        gguf = Path(job.export).expanduser()
        return Prepared(check_pair(job.model, gguf, None, gguf_config(gguf)), gguf)
    export_dir = export_dir_of(job.export, note)
    if job.weights_only:
        return Prepared(check_pair(job.model, export_dir, None), export_dir)
    base_dir = check_pair(job.model, export_dir, job.backend)
    check_model(str(base_dir), allow_pickle=job.allow_pickle)
    check_model(str(export_dir), allow_pickle=job.allow_pickle)
    return Prepared(base_dir, export_dir)


def _weight_check(job: ExportJob, ready: Prepared) -> WeightCheck:
    """The weight check; :class:`WeightReadError` when the weights cannot be compared."""
    export = Path(job.export).expanduser() if is_gguf(job.export) else ready.export_dir
    return measure(
        ready.base_dir,
        job.adapter,
        export,
        runs=job.runs,
        min_share=job.criteria.min_retention,
        allow_pickle=job.allow_pickle,
    )


def _run(job: ExportJob, ready: Prepared, note: Callable[[str], None]) -> SuiteResult:
    base_dir, export_dir = ready.base_dir, ready.export_dir
    safety = {"allow_pickle": job.allow_pickle, "trust_remote_code": job.trust_remote_code}
    note("loading the base model and the adapter")
    main = build_or_fail(
        placed(
            ModelSpec(base=str(base_dir), adapter=job.adapter),
            job.device_map,
            job.max_memory,
            job.dtype,
        ),
        job.backend,
        "the adapter",
        **safety,
    )
    exported = None
    try:
        note("loading the export (a second model in memory)")
        exported = build_or_fail(
            placed(ModelSpec(base=str(export_dir)), job.device_map, job.max_memory, job.dtype),
            job.backend,
            "the export",
            plain=True,
            **safety,
        )
        meta = {"export": job.export, "export_info": dict(exported.info)}
        return check_export(
            main,
            exported,
            job.prompts,
            criteria=job.criteria,
            runs=job.runs,
            seed=job.seed,
            null_cache=null_cache(job.no_cache),
            progress=note,
            meta=meta,
            extra=[ready.weights] if ready.weights is not None else [],
            floor=ready.floor,
        )
    except ValueError as e:  # models that cannot be compared (tokenizer, vocabulary)
        fail(first_line(e))
    finally:
        _close(main, exported)


@click.command("export-check")
@click.option("--model", required=True, help="Base model: local HF dir or hub id.")
@click.option(
    "--adapter-path",
    "adapter",
    required=True,
    type=click.Path(exists=True),
    help="The live adapter (mlx-lm or PEFT dir, or an mlx-lm checkpoint file).",
)
@click.option(
    "--export",
    "export",
    required=True,
    help="The exported model: a dir (mlx_lm fuse, mlx_lm convert -q, PEFT "
    "merge_and_unload + save_pretrained, also bitsandbytes 4/8-bit on the HF backend) or a "
    ".gguf file (needs the gguf extra).",
)
@file_option(
    "--prompts",
    "prompts_file",
    "Prompts file, one per line (default: generic prompts). Use prompts the "
    "adapter was trained for: that is where it acts.",
)
@runs_option("Null adapters that size the adapter's effect.")
@click.option(
    "--min-retention",
    type=click.FloatRange(0.05, 0.99),
    default=0.8,
    show_default=True,
    help="Share of the adapter's effect the export must keep (and at most its inverse).",
)
@click.option(
    "--max-residual",
    type=click.FloatRange(min=0.0, min_open=True),
    default=0.25,
    show_default=True,
    help="Largest export-vs-fine-tune distance, in units of the adapter's effect.",
)
@click.option(
    "--weights-only",
    is_flag=True,
    help="Only the weight-space check: does each adapted weight of the export carry the "
    "adapter's ΔW? No model loads (seconds); a safetensors export dir (float, MLX-quantized or "
    "bitsandbytes 4/8-bit) or a GGUF file.",
)
@click.option("-q", "--quiet", is_flag=True, help="Print only the verdict line.")
@suite_options
def export_check_cmd(
    model: str,
    adapter: str,
    export: str,
    prompts_file: str | None,
    runs: int,
    min_retention: float,
    max_residual: float,
    weights_only: bool,
    quiet: bool,
    args: SuiteArgs,
) -> None:
    """Does the exported model still carry the fine-tune? Exit 0 yes, 1 no, 2 bad input.

    Compares, per prompt, the export with the live fine-tune (base + adapter) and the
    base: next-token distributions and the log-prob of the fine-tune's own completions.
    Retention is the share of the adapter's effect the export keeps (1 = the fine-tune,
    0 = the base); the residual is what separates it from the fine-tune, in units of
    the adapter's effect, split into lost effect and the export's own noise
    (quantization). Null adapters say how large the adapter's effect is.

    A quantized export adds noise of its own: it is judged after a noise floor (the
    export with each adapted weight replaced by base + a random delta of the adapter's
    size, stored the export's way), and the retention on its 95% interval over prompts
    (WARN when the prompts cannot tell). KL(fine-tune||export) over every position of the
    prompts and completions (mean, median, p99, max) and top-token agreement are reported
    beside the base's figures.

    The export is a SECOND model in memory next to the base (which the adapter views
    share): expect about twice the memory of `eval`. Peak memory is reported.

    First, with no model loaded, the weight-space check: the share of each adapted
    module's ΔW that the export's weight carries, against what storing a random delta
    of that size the export's way (its dtype, or its bits and group size) keeps.
    --weights-only runs only that.

    \b
    Examples:
      mlx_lm.fuse --model M --adapter-path adapters --save-path fused
      sway-mlx export-check --model M --adapter-path adapters --export fused
      mlx_lm.convert --hf-path fused -q --mlx-path fused-4bit
      sway-mlx export-check --model M --adapter-path adapters --export fused-4bit \\
          --backend mlx --prompts my_prompts.txt --json export.json --plot plots/
      sway-mlx export-check --model M --adapter-path adapters --export model.gguf -q
      sway-mlx export-check --model M --adapter-path adapters --export fused-4bit \\
          --weights-only
    """
    if args.backend == "dummy" and not weights_only:
        fail("export-check needs real models: use --backend auto, mlx or hf")
    check_outputs(args.reports, args.plot_dir)
    if args.plot_dir and weights_only:
        fail("--plot draws the forward-pass measurement; drop --plot or --weights-only")
    if args.plot_dir:
        require_plotting()
    prompts = read_prompts(prompts_file)
    check_adapters([adapter], allow_pickle=args.allow_pickle)
    _no_loader_bars()
    job = ExportJob(
        model=model,
        adapter=adapter,
        export=export,
        prompts=prompts,
        backend=args.backend,
        criteria=ExportCriteria(min_retention=min_retention, max_residual=max_residual),
        runs=runs,
        seed=0 if args.seed is None else args.seed,
        no_cache=args.no_cache,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        weights_only=weights_only,
        device_map=args.device_map,
        max_memory=args.max_memory,
        dtype=args.dtype,
    )
    try:
        result = _check(job, quiet)
    except KeyboardInterrupt:
        exit_interrupted("interrupted: no verdict on the export")
    if weights_only:
        report_weights_only(result, args.reports, quiet)
    else:
        _report(result, args, quiet)
    sys.exit(exit_code(result.verdict))


def _check(job: ExportJob, quiet: bool) -> SuiteResult:
    """The weight check (printed first), then, unless weights only, the forward pass."""
    started = time.time()
    with _progress(quiet) as note:
        ready = _prepare(job, note)
    console = None if quiet else Console()
    try:
        check = _weight_check(job, ready)
    except WeightReadError as e:
        if job.weights_only:
            fail(str(e))
        if console is not None:  # the forward pass may still read what this cannot
            console.print(f"weights: not checked ({e})", style="dim", highlight=False)
    else:
        if job.weights_only:
            if console is not None:
                console.print(table(check))
            meta = {"model": job.model, "adapter": job.adapter, "export": job.export}
            return weights_only_result(check, meta, started)
        if console is not None:
            print_check(check, console, prefix="weights: ")
        ready.weights = weight_result(check, gating=False)
    export = Path(job.export).expanduser() if is_gguf(job.export) else ready.export_dir
    ready.floor = floor_for(
        ready.base_dir, job.adapter, export, runs=job.runs, allow_pickle=job.allow_pickle
    )
    with _progress(quiet) as note:
        return _run(job, ready, note)
