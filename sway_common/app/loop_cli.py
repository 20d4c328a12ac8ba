"""`sway-mlx checkpoints` and `sway-mlx watch`: an adapter's signal over its training run.

Registered on the main ``app`` by ``sway_common.app.cli``. Every input is checked (run dir,
checkpoints, model, prompts, plotting) before a model loads or a file is written; bad input
is one line on stderr and exit 2.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from sway_common.app.checkpoints import BackendBuildError, CheckpointSetup, evaluate_checkpoints
from sway_common.app.inputs import check_model, check_output
from sway_common.app.options import (
    EXIT_INTERRUPTED,
    backend_option,
    fail,
    file_option,
    option_group,
    plot_option,
    read_prompts,
    require_plotting,
    runs_option,
    safety_options,
    seed_option,
)
from sway_common.app.placement import placement_options
from sway_common.app.platform import MODEL_BACKEND_KINDS, pick_backend
from sway_common.app.watch import read_history, watch
from sway_common.report.trajectory import (
    plot_or_note,
    print_summary,
    row_line,
    rows_table,
    write_trajectory_json,
)
from sway_common.suite.placement import placement_problem
from sway_common.suite.spec import Defaults
from sway_common.suite.trajectory import (
    CheckpointError,
    CheckpointRow,
    discover_checkpoints,
    summarize,
)

TRAJECTORY_PNG = "sway-trajectory.png"
HISTORY_JSONL = "sway-history.jsonl"


def recorded_base_model(run_dir: Path) -> str | None:
    """The base model a run's adapter config names (mlx-lm ``model``, PEFT
    ``base_model_name_or_path``), so ``--model`` can usually be left out."""
    for cfg in [
        run_dir / "adapter_config.json",
        *sorted(run_dir.glob("checkpoint-*/adapter_config.json")),
    ]:
        try:
            data = json.loads(cfg.read_text(encoding="utf-8-sig"))
        except (OSError, ValueError):
            continue
        name = (
            (data.get("model") or data.get("base_model_name_or_path"))
            if isinstance(data, dict)
            else None
        )
        if isinstance(name, str) and name:
            return name
    return None


@dataclass
class LoopArgs:
    """The options `checkpoints` and `watch` share (:data:`loop_options`)."""

    run_dir: str | None
    adapter_path: str | None
    model: str | None
    backend: str
    prompts_file: str | None
    runs: int
    seed: int | None
    plot_dir: str | None
    no_plot: bool
    allow_pickle: bool
    trust_remote_code: bool
    device_map: str | None
    max_memory: dict[str, str] | None
    dtype: str | None

    def plot_path(self) -> Path | None:
        """Where the trajectory PNG goes: --plot DIR, else the run directory."""
        where = self.plot_dir or self.run_dir or self.adapter_path
        if self.no_plot or not where:
            return None
        return Path(where).expanduser() / TRAJECTORY_PNG

    def resolve(self) -> tuple[Path, str, Path | None]:
        """The run directory, the base model and the plot path, checked (bad input: exit 2)."""
        plot = self.plot_path()
        if self.run_dir and self.adapter_path and Path(self.run_dir) != Path(self.adapter_path):
            fail("give the run directory once: as DIR or as --adapter-path, not both")
        given = self.run_dir or self.adapter_path
        if not given:
            fail(
                "missing the training run directory: give DIR (or --adapter-path, as for mlx_lm.lora)"
            )
        path = Path(given).expanduser()
        if not path.is_dir():
            fail(f"{path} is not a directory; give the training run's output (adapter) directory")
        model = self.model
        if model is None:
            model = recorded_base_model(path)
            if model is None:
                fail(f"no --model given and no adapter_config.json in {path} names the base model")
            Console(stderr=True).print(f"model: {model} (from the adapter config)", highlight=False)
        check_model(model, allow_pickle=self.allow_pickle)
        if problem := placement_problem(
            pick_backend(self.backend), self.device_map, self.max_memory
        ):
            fail(problem)
        if plot is not None:
            check_output(str(plot), "--plot")
            require_plotting("or pass --no-plot")
        return path, model, plot

    def setup(self, model: str, prompts: list[str]) -> CheckpointSetup:
        """How each checkpoint is measured (without --seed, a spec's default seed)."""
        return CheckpointSetup(
            model=model,
            prompts=prompts,
            backend=self.backend,
            runs=self.runs,
            seed=Defaults().seed if self.seed is None else self.seed,
            allow_pickle=self.allow_pickle,
            trust_remote_code=self.trust_remote_code,
            device_map=self.device_map,
            max_memory=self.max_memory,
            dtype=self.dtype or "auto",
        )


loop_options = option_group(
    LoopArgs,
    [
        click.argument("run_dir", metavar="[DIR]", required=False, type=click.Path()),
        click.option(
            "--adapter-path",
            type=click.Path(),
            help="The run directory, named as mlx_lm.lora names it (same as DIR).",
        ),
        click.option(
            "--model",
            help="Base model: local dir or Hugging Face id. Default: the one the run's adapter_config.json records.",
        ),
        backend_option(MODEL_BACKEND_KINDS),
        file_option(
            "--prompts",
            "prompts_file",
            "Prompts to measure on, one per line (default: 8 generic prompts). Use prompts from your training domain.",
        ),
        runs_option(
            "Null adapters drawn per checkpoint (K): more gives a steadier z, costs K forwards per prompt.",
            most=None,
        ),
        seed_option,
        plot_option(f"{TRAJECTORY_PNG}: z and divergence against step", default="DIR"),
        click.option("--no-plot", is_flag=True, help="Write no PNG."),
        safety_options,
        *placement_options,
    ],
)
"""DIR, --adapter-path, --model, --backend, --prompts, --runs, --seed, --plot, --no-plot,
the safety options and --device-map/--max-memory/--dtype, handed to the command as one
``args: LoopArgs``."""


# ------------------------------------------------------------------ checkpoints
@click.command("checkpoints")
@loop_options
@file_option("--json", "json_path", "Write the rows and the summary as JSON here.")
def checkpoints_cmd(args: LoopArgs, json_path: str | None) -> None:
    """Test every checkpoint of a training run against random adapters of its shape.

    DIR is the run's output directory: mlx-lm's --adapter-path (NNNNNNN_adapters.safetensors
    files, written with --save-every N) or an HF Trainer output_dir (checkpoint-N/ dirs
    holding a PEFT adapter). The base model loads once; each checkpoint is swapped in.

    For each checkpoint: the mean next-token JS divergence from the base model over the
    prompts, and its z against K null adapters (seeded random adapters with the same rank,
    targets and per-module norm). PASS means the checkpoint moved the model beyond noise.

    \b
    Examples:
      sway-mlx checkpoints adapters/ --model mlx-community/SmolLM2-135M-Instruct
      sway-mlx checkpoints out/ --prompts domain.txt --runs 16 --json traj.json

    Prints a table, names the first checkpoint above noise, the effect's trend, and any
    regression: a held-out probe (what the base knew) that got worse. A falling z is not
    one: norm-matched nulls grow with the adapter. Plots z and divergence against step. Exit 0 when the last checkpoint passes, 1 when
    it does not, 2 on bad input.
    """
    path, model, plot = args.resolve()
    check_output(json_path, "--json")
    try:
        ckpts = discover_checkpoints(path)
    except (CheckpointError, OSError) as e:
        fail(str(e))
    prompts = read_prompts(args.prompts_file)
    setup = args.setup(model, prompts)
    console, err = Console(), Console(stderr=True)
    err.print(
        f"{len(ckpts)} checkpoints in {path} ({ckpts[0].label} … {ckpts[-1].label}); "
        f"{len(prompts)} prompts, {setup.runs} null adapters each",
        highlight=False,
    )

    rows: list[CheckpointRow] = []
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[what]}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    task = progress.add_task("checkpoints", total=len(ckpts), what="")

    def on_row(row: CheckpointRow) -> None:
        rows.append(row)  # kept here too, so Ctrl-C can still show what finished
        progress.advance(task)

    try:
        with progress:
            evaluate_checkpoints(
                path,
                setup,
                checkpoints=ckpts,
                on_row=on_row,
                on_status=lambda c, what: progress.update(task, description=c.label, what=what),
            )
    except BackendBuildError as e:
        fail(str(e))
    except KeyboardInterrupt:
        err.print("interrupted: showing the checkpoints that finished")
    summary = summarize(rows)
    console.print(rows_table(rows))
    print_summary(console, rows, summary)
    plot_or_note(rows, plot, err)
    if plot is not None and plot.exists():
        console.print(f"Plot: {plot}", highlight=False)
    if json_path:
        run = {
            "run_dir": str(path),
            "model": model,
            "backend": setup.backend,
            "prompts": prompts,
            "runs": setup.runs,
            "seed": setup.seed,
        }
        write_trajectory_json(Path(json_path), run, rows, summary)
        console.print(f"JSON: {json_path}", highlight=False)
    if len(rows) < len(ckpts):
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(0 if summary.last_passes else 1)


# ------------------------------------------------------------------ watch
@click.command("watch")
@loop_options
@file_option(
    "--history",
    "history_path",
    f"JSONL file, one line per tested checkpoint; a restarted watch skips what it holds [default: DIR/{HISTORY_JSONL}].",
)
@click.option(
    "--poll",
    "poll_s",
    type=click.FloatRange(min=0.05),
    default=2.0,
    show_default=True,
    help="Seconds between looks at DIR.",
)
@click.option(
    "--settle",
    "settle_s",
    type=click.FloatRange(min=0.0),
    default=None,
    help="Seconds a checkpoint's files must stay unchanged before it is read [default: --poll].",
)
@click.option(
    "--max-checkpoints",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after testing this many new checkpoints (default: run until Ctrl-C).",
)
def watch_cmd(
    args: LoopArgs,
    history_path: str | None,
    poll_s: float,
    settle_s: float | None,
    max_checkpoints: int | None,
) -> None:
    """Test each checkpoint while training runs, as soon as it is written.

    Start it beside your trainer, pointing at the same directory:

    \b
      mlx_lm.lora --model M --train --data data/ --adapter-path adapters/ --save-every 100 &
      sway-mlx watch adapters/ --model M --prompts domain.txt

    A checkpoint is read once its files stopped changing (half-written files are waited
    for, a corrupt one is recorded as ERROR and the watch goes on). The base model loads
    once, at the first checkpoint. Each result is appended to the history file and
    flushed to disk, so Ctrl-C (or a crash) loses nothing: run the same command again to
    resume. Delete the history to re-test with other prompts or another model.

    Exit 0 when stopped (Ctrl-C or --max-checkpoints), 2 on bad input or if the base
    model cannot load.
    """
    path, model, plot = args.resolve()
    setup = args.setup(model, read_prompts(args.prompts_file))
    history = Path(history_path) if history_path else path / HISTORY_JSONL
    check_output(str(history), "--history")
    console, err = Console(), Console(stderr=True)
    try:
        known = len(read_history(history))
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read the history {history}: {getattr(e, 'strerror', None) or e}")
    err.print(
        f"watching {path} ({len(setup.prompts)} prompts, {setup.runs} null adapters per checkpoint); "
        f"history {history}" + (f" ({known} already tested)" if known else "") + "; Ctrl-C to stop",
        highlight=False,
    )

    def on_row(r: CheckpointRow) -> None:
        console.print(row_line(r))
        plot_or_note(read_history(history), plot, err)

    status = err.status("waiting for checkpoints", spinner="dots")
    try:
        with status:
            watch(
                path,
                setup,
                history=history,
                poll_s=poll_s,
                settle_s=settle_s,
                max_checkpoints=max_checkpoints,
                on_row=on_row,
                on_status=lambda msg: status.update(msg),
            )
    except (BackendBuildError, CheckpointError) as e:
        fail(str(e))
    rows = read_history(history)
    if rows:
        print_summary(console, rows, summarize(rows))
        if plot is not None and plot.exists():
            console.print(f"Plot: {plot}", highlight=False)
    console.print(f"History: {history} ({len(rows)} checkpoints)", highlight=False)
