"""`sway-mlx sweep`: one suite over many adapters of one base, in this process or on Ray.

Every input is checked before a model loads (outputs, model, each adapter, Ray itself);
then the adapters run in this process, one after another on one loaded base, or, with
``--ray``, on one actor per GPU (or CPU worker) pulling them from a queue
(``sweep_ray.py``). Either way each adapter's outcome is the report ``eval --json`` writes;
the sweep gathers them into one table (``report/sweep.py``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from sway_common.app.inputs import (
    check_adapter_paths,
    check_adapters,
    check_model,
    check_output,
)
from sway_common.app.options import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    backend_option,
    err_console,
    exit_code,
    fail,
    file_option,
    no_cache_option,
    null_cache,
    read_prompts,
    runs_option,
    safety_options,
    seed_option,
)
from sway_common.app.placement import (
    device_map_option,
    dtype_option,
    max_memory_option,
    placed,
)
from sway_common.app.platform import pick_backend
from sway_common.app.run import load_spec_or_fail
from sway_common.app.sweep_ray import RayPlan, RayUnavailableError, import_ray, run_on_ray
from sway_common.app.sweep_worker import Entry, SweepJob, adapter_names, run_local
from sway_common.atomic import atomic_write_text
from sway_common.report.files import render_markdown
from sway_common.report.sweep import (
    render_sweep_markdown,
    sweep_payload,
    sweep_progress,
    sweep_table,
    write_sweep_json,
)
from sway_common.suite.placement import placement_problem
from sway_common.suite.spec import ModelSpec, SuiteSpec, quick_suite
from sway_common.types import SuiteResult, Verdict


@click.command("sweep")
@click.argument("adapters", nargs=-1, metavar="ADAPTER...")
@click.option("--model", help="Base model (local HF dir or hub id); default: the spec's.")
@click.option(
    "--spec",
    "spec_path",
    type=click.Path(dir_okay=False),
    help="Run this suite (sway.yaml) on every adapter (its own adapter is ignored). "
    "Default: the quick suite of `eval --model M --adapter-path A`.",
)
@file_option("--prompts", "prompts_file", "Quick suite: prompts file, one per line.")
@runs_option("Quick suite: null adapters per adapter.")
@click.option(
    "--ray",
    "ray_address",
    metavar="auto|local|ADDRESS",
    help="Run on Ray: auto (a running cluster, else one started here), local (a new one "
    "here), or a cluster address (ray://host:10001). Needs pip install 'sway-mlx[ray]'.",
)
@click.option(
    "--workers",
    type=click.IntRange(1),
    help="Ray workers [default: one per --gpus-per-worker GPUs, else one per CPU].",
)
@click.option(
    "--gpus-per-worker",
    type=click.FloatRange(0),
    default=1.0,
    show_default=True,
    help="GPUs each Ray worker holds (2 with --device-map: a base spread over two).",
)
@click.option(
    "--cpus-per-worker",
    type=click.FloatRange(0, min_open=True),
    default=1.0,
    show_default=True,
    help="CPUs each Ray worker holds (its torch threads on a CPU-only cluster).",
)
@file_option(
    "--json",
    "json_path",
    "Write the sweep as JSON: the table, and per adapter the report `eval --json` writes.",
)
@file_option("--markdown", "markdown_path", "Write the table as Markdown here.")
@click.option(
    "--reports",
    "reports_dir",
    type=click.Path(file_okay=False),
    help="Write each adapter's own report (NAME.json, NAME.md) into this directory.",
)
@click.option("--threshold", type=float, default=None, help="Composite score needed to pass.")
@backend_option()
@seed_option
@no_cache_option
@safety_options
@device_map_option
@max_memory_option
@dtype_option
def sweep_cmd(adapters: tuple[str, ...], **opts: Any) -> None:
    """Evaluate many adapters of one base: one table, best first; exit 0, 1 if any
    adapter FAILs, 2 if any could not be evaluated.

    \b
    In this process (the base loads once):
      sway-mlx sweep --model M runs/*/adapters --json sweep.json --markdown sweep.md
    On Ray, one worker per GPU, each loading the base once and pulling the next
    adapter from a queue when done (a worker that dies loses only its current
    adapter, which is retried once on another):
      sway-mlx sweep --model M runs/*/adapters --ray auto --json sweep.json
    \b
    Null statistics are shared through the null cache ($SWAY_MLX_NULL_CACHE): on a
    cluster, point it at a directory every node can reach.
    """
    spec = _spec(adapters, opts)
    names = adapter_names(adapters)
    _check(spec, adapters, opts)
    job = SweepJob(
        spec=spec,
        backend=opts["backend"],
        threshold=opts["threshold"],
        null_cache=str(cache.root) if (cache := null_cache(opts["no_cache"])) else None,
        allow_pickle=opts["allow_pickle"],
        trust_remote_code=opts["trust_remote_code"],
    )
    entries, workers, interrupted, seconds = _run(job, adapters, names, opts)
    summary = {
        "model": spec.model.base if spec.model else None,
        "spec": spec.source,
        "engine": "ray" if opts["ray_address"] else "local",
        "workers": workers,
        "adapters": len(adapters),
        "evaluated": len(entries),
        "duration_s": round(seconds, 3),
        "adapters_per_hour": round(len(entries) * 3600 / seconds, 2) if seconds > 0 else None,
        "base_loads": sum(bool(e.get("loaded_base")) for e in entries),
        "retried": [e["name"] for e in entries if e.get("attempts", 1) > 1],
        "interrupted": interrupted,
    }
    payload = sweep_payload(summary, entries)
    _write(payload, opts)
    Console().print(sweep_table(payload))
    err_console.print(_summary_line(summary), highlight=False)
    if interrupted:
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(max((_code(e) for e in entries), default=EXIT_ERROR))


def _spec(adapters: tuple[str, ...], opts: dict[str, Any]) -> SuiteSpec:
    if not adapters:
        fail("give at least one ADAPTER (an adapter dir or checkpoint file) to sweep")
    check_adapter_paths(adapters)
    if len(set(map(os.path.abspath, adapters))) < len(adapters):
        fail("an adapter is named twice; give each one once")
    if opts["spec_path"]:
        if opts["prompts_file"]:
            fail("--prompts is for the quick suite; with --spec the spec names the prompts")
        spec = load_spec_or_fail(opts["spec_path"])
        if opts["model"]:
            spec.model = dataclasses.replace(spec.model, base=opts["model"])
    elif not opts["model"]:
        fail("give --model (the base of every adapter), or --spec with a model block")
    else:
        model = ModelSpec(base=opts["model"], adapter=adapters[0])
        spec = quick_suite(read_prompts(opts["prompts_file"]), runs=opts["runs"], model=model)
    if opts["seed"] is not None:
        spec.defaults.seed = opts["seed"]
    spec.model = placed(spec.model, opts["device_map"], opts["max_memory"], opts["dtype"])
    return spec


def _check(spec: SuiteSpec, adapters: tuple[str, ...], opts: dict[str, Any]) -> None:
    """Everything that can fail before a model loads, in the order a user fixes it."""
    check_output(opts["json_path"], "--json")
    check_output(opts["markdown_path"], "--markdown")
    check_output(opts["reports_dir"], "--reports", directory=True)
    if opts["ray_address"]:
        try:
            import_ray()
        except RayUnavailableError as e:
            fail(str(e))
    assert spec.model is not None
    choice = pick_backend(opts["backend"] if opts["backend"] != "auto" else spec.model.kind)
    if problem := placement_problem(choice, spec.model.device_map, spec.model.max_memory):
        fail(problem)
    if choice != "dummy":
        check_model(spec.model.base, allow_pickle=opts["allow_pickle"])
        check_adapters(adapters, allow_pickle=opts["allow_pickle"])


def _run(
    job: SweepJob, adapters: tuple[str, ...], names: list[str], opts: dict[str, Any]
) -> tuple[list[Entry], int, bool, float]:
    """(entries, workers, interrupted, seconds): every adapter's outcome, or what finished."""
    entries: list[Entry] = []
    started = time.perf_counter()
    workers, interrupted = 1, False
    with sweep_progress(len(adapters), sys.stderr.isatty()) as bar:

        def done(entry: Entry) -> None:
            entries.append(entry)
            bar.finished(entry["name"])

        try:
            if opts["ray_address"]:
                plan = RayPlan(
                    address=opts["ray_address"],
                    workers=opts["workers"],
                    gpus_per_worker=opts["gpus_per_worker"],
                    cpus_per_worker=opts["cpus_per_worker"],
                )
                workers = run_on_ray(job, list(adapters), names, plan, bar.started, done)
            else:
                run_local(job, list(adapters), names, bar.started, done)
        except RayUnavailableError as e:
            fail(str(e))
        except KeyboardInterrupt:
            interrupted = True
    return entries, workers, interrupted, time.perf_counter() - started


def _report_name(name: str) -> str:
    return name.replace("/", "__").replace("\\", "__")


def _write(payload: dict[str, Any], opts: dict[str, Any]) -> None:
    """The sweep's files, and each adapter's own report (JSON as `eval --json` writes it)."""
    links: dict[str, str] = {}
    if opts["reports_dir"]:
        root = Path(opts["reports_dir"])
        for entry in payload["adapters"]:
            if not entry.get("report"):
                continue
            stem = root / _report_name(entry["name"])
            write_sweep_json(entry["report"], f"{stem}.json")
            result = SuiteResult.from_dict(entry["report"])
            atomic_write_text(f"{stem}.md", render_markdown(result))
            links[entry["name"]] = f"{stem}.md"
    if opts["json_path"]:
        write_sweep_json(payload, opts["json_path"])
    if opts["markdown_path"]:
        where = Path(opts["markdown_path"]).resolve().parent
        relative = {k: os.path.relpath(Path(v).resolve(), where) for k, v in links.items()}
        atomic_write_text(opts["markdown_path"], render_sweep_markdown(payload, relative))


def _code(entry: Entry) -> int:
    report = entry.get("report")
    return exit_code(Verdict(report["verdict"])) if report else EXIT_ERROR


def _summary_line(s: dict[str, Any]) -> str:
    each = f"{s['duration_s'] / s['evaluated']:.1f} s per adapter" if s["evaluated"] else ""
    retried = f"; retried after a worker died: {', '.join(s['retried'])}" if s["retried"] else ""
    stop = "interrupted: the files hold the adapters that finished; " if s["interrupted"] else ""
    return (
        f"{stop}{s['evaluated']} of {s['adapters']} adapters on {s['workers']} worker(s) "
        f"({s['engine']}) in {s['duration_s']:.1f} s, {each}; base loaded "
        f"{s['base_loads']} time(s){retried}"
    )
