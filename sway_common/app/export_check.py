"""`sway-mlx export-check`: does the fused / merged / re-quantized export keep the fine-tune?

Registered on the main ``app`` by ``sway_common.app.cli``. Every input is checked (paths,
that the export is a model of the same architecture and vocabulary, plotting) before a
model loads; bad input is one line on stderr and exit 2.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.text import Text

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
from sway_common.app.platform import pick_backend
from sway_common.app.run import build_or_fail, emit, write_reports
from sway_common.backend.model_views import ModelViews
from sway_common.models import ModelNotFoundError, gguf_model_dir, resolve_model_dir
from sway_common.report.export_plot import EXPORT_PNG, plot_export
from sway_common.suite.export import check_export, config_mismatch
from sway_common.suite.export_math import ExportCriteria
from sway_common.suite.spec import ModelSpec
from sway_common.types import SuiteResult


def _config(model_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((model_dir / "config.json").read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as e:
        fail(f"cannot read {model_dir / 'config.json'}: {first_line(e)}")
    if not isinstance(data, dict):
        fail(f"{model_dir / 'config.json'} is not a JSON object")
    return data


def _export_dir(export: str, note: Callable[[str], None]) -> Path:
    """The export as a model dir: itself, or a GGUF file dequantized into a cached dir."""
    path = Path(export).expanduser()
    if not path.exists():
        fail(
            f"export {export} does not exist; give the directory mlx_lm fuse, mlx_lm convert or "
            "save_pretrained wrote, or a .gguf file"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            fail(
                f"export {export} is a file but not a .gguf; give a model directory or a GGUF file"
            )
        note("reading the GGUF export (dequantized once, then cached)")
        try:
            # transformers' GGUF reader draws its own tqdm bar, whatever the settings say.
            with contextlib.redirect_stderr(io.StringIO()):
                return gguf_model_dir(path)
        except ImportError as e:
            fail(first_line(e))
        except Exception as e:  # a GGUF transformers cannot read is bad input, not a crash
            fail(f"cannot read the GGUF export {export}: {first_line(e)}")
    if not (path / "config.json").is_file():
        fail(
            f"export {export} is not a model directory (no config.json); give the directory "
            "mlx_lm fuse or save_pretrained wrote"
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        fail(f"export {export} holds no weights (*.safetensors or *.bin)")
    return path.resolve()


def _check_pair(model: str, export_dir: Path, backend: str) -> Path:
    """Refuse an export that cannot be the base model fine-tuned; return the base dir."""
    try:
        base_dir = resolve_model_dir(model)
    except (ModelNotFoundError, OSError) as e:
        fail(first_line(e))
    base_cfg, export_cfg = _config(base_dir), _config(export_dir)
    problem = config_mismatch(base_cfg, export_cfg)
    if problem:
        fail(f"{problem}: the export is not a version of {model}")
    if "quantization" in export_cfg and pick_backend(backend) == "hf":
        fail(
            "the export is quantized by mlx-lm (config 'quantization'); only the MLX backend "
            "reads it: use --backend mlx"
        )
    return base_dir


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


def _run(job: ExportJob, note: Callable[[str], None]) -> SuiteResult:
    export_dir = _export_dir(job.export, note)
    base_dir = _check_pair(job.model, export_dir, job.backend)
    check_model(str(base_dir), allow_pickle=job.allow_pickle)
    check_model(str(export_dir), allow_pickle=job.allow_pickle)
    safety = {"allow_pickle": job.allow_pickle, "trust_remote_code": job.trust_remote_code}
    note("loading the base model and the adapter")
    main = build_or_fail(
        ModelSpec(base=str(base_dir), adapter=job.adapter), job.backend, "the adapter", **safety
    )
    exported = None
    try:
        note("loading the export (a second model in memory)")
        exported = build_or_fail(
            ModelSpec(base=str(export_dir)), job.backend, "the export", plain=True, **safety
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
    "merge_and_unload + save_pretrained) or a .gguf file (needs the gguf extra).",
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

    The export is a SECOND model in memory next to the base (which the adapter views
    share): expect about twice the memory of `eval`. Peak memory is reported.

    \b
    Examples:
      mlx_lm.fuse --model M --adapter-path adapters --save-path fused
      sway-mlx export-check --model M --adapter-path adapters --export fused
      mlx_lm.convert --hf-path fused -q --mlx-path fused-4bit
      sway-mlx export-check --model M --adapter-path adapters --export fused-4bit \\
          --backend mlx --prompts my_prompts.txt --json export.json --plot plots/
      sway-mlx export-check --model M --adapter-path adapters --export model.gguf -q
    """
    if args.backend == "dummy":
        fail("export-check needs real models: use --backend auto, mlx or hf")
    check_outputs(args.reports, args.plot_dir)
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
    )
    try:
        with _progress(quiet) as note:
            result = _run(job, note)
    except KeyboardInterrupt:
        exit_interrupted("interrupted: no verdict on the export")
    _report(result, args, quiet)
    sys.exit(exit_code(result.verdict))
