"""Checkpoint trajectories: discovery in both layouts, evaluation on a real backend, summaries, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from sway_common.app import platform
from sway_common.app.checkpoints import CheckpointSetup, evaluate_checkpoints
from sway_common.app.loop_cli import checkpoints_cmd
from sway_common.suite.trajectory import (
    CheckpointError,
    CheckpointRow,
    discover_checkpoints,
    summarize,
)
from sway_common.types import Verdict

PROMPTS = ["The keeper said", "In the storm"]
MLX_CONFIG = {
    "fine_tune_type": "lora",
    "num_layers": 1,
    "iters": 250,
    "lora_parameters": {"rank": 2, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]},
}


# ------------------------------------------------------------------ builders
def mlx_tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "model.layers.0.self_attn.q_proj.lora_a": rng.normal(size=(8, 2)).astype(np.float32),
        "model.layers.0.self_attn.q_proj.lora_b": rng.normal(size=(2, 8)).astype(np.float32),
    }


def write_mlx_run(run: Path, steps: list[int], final_seed: int | None = None) -> Path:
    """An mlx-lm adapter dir: one config, NNNNNNN_adapters.safetensors per step, seeded by step."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "adapter_config.json").write_text(json.dumps(MLX_CONFIG))
    for step in steps:
        save_file(mlx_tensors(step), str(run / f"{step:07d}_adapters.safetensors"))
    if final_seed is not None:
        save_file(mlx_tensors(final_seed), str(run / "adapters.safetensors"))
    return run


def write_peft_dir(d: Path, seed: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4})
    )
    rng = np.random.default_rng(seed)
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.normal(
                size=(2, 8)
            ).astype(np.float32)
        },
        str(d / "adapter_model.safetensors"),
    )


def row(step: int, z: float | None, verdict: Verdict, div: float | None = 0.1) -> CheckpointRow:
    return CheckpointRow(step, f"step {step}", div, z, 0.01, 0.002, verdict, f"{verdict.value} msg")


# ------------------------------------------------------------------ discovery
def test_mlx_layout_sorted_by_step_and_identical_final_skipped(tmp_path: Path) -> None:
    run = write_mlx_run(tmp_path / "run", [200, 50, 1000])
    shutil.copyfile(run / "0001000_adapters.safetensors", run / "adapters.safetensors")
    ckpts = discover_checkpoints(run)
    assert [c.step for c in ckpts] == [50, 200, 1000]
    assert all(c.fmt == "mlx" and not c.final for c in ckpts)
    assert ckpts[0].path == run / "0000050_adapters.safetensors"
    assert ckpts[0].label == "step 50" and ckpts[0].key == "mlx:50"


def test_mlx_final_that_differs_is_the_last_point(tmp_path: Path) -> None:
    run = write_mlx_run(tmp_path / "run", [100, 200], final_seed=999)
    ckpts = discover_checkpoints(run)
    assert [c.step for c in ckpts] == [100, 200, 250]  # 250: the run's recorded "iters"
    final = ckpts[-1]
    assert final.final and final.path == run / "adapters.safetensors"
    assert final.label == "final (step 250)" and final.key.startswith("mlx:final:")


def test_peft_trainer_layout(tmp_path: Path) -> None:
    run = tmp_path / "out"
    for step, seed in ((20, 1), (5, 2), (10, 3)):
        write_peft_dir(run / f"checkpoint-{step}", seed)
    (run / "checkpoint-30").mkdir()  # being created: no adapter files yet
    write_peft_dir(run / "tmp-checkpoint-40", 4)  # a trainer's staging name
    write_peft_dir(run, 5)  # save_model() into output_dir: differs from checkpoint-20
    (run / "trainer_state.json").write_text(json.dumps({"global_step": 25}))
    ckpts = discover_checkpoints(run)
    assert [c.step for c in ckpts] == [5, 10, 20, 25]
    assert all(c.fmt == "peft" for c in ckpts)
    assert ckpts[0].path == run / "checkpoint-5" and ckpts[-1].path == run and ckpts[-1].final
    assert ckpts[0].weights == run / "checkpoint-5" / "adapter_model.safetensors"


def test_peft_final_identical_to_last_checkpoint_is_skipped(tmp_path: Path) -> None:
    run = tmp_path / "out"
    write_peft_dir(run / "checkpoint-7", 1)
    write_peft_dir(run, 1)
    assert [c.step for c in discover_checkpoints(run)] == [7]


def test_real_mlx_lm_run_dir(tiny_mlx_adapter: Path) -> None:
    ckpts = discover_checkpoints(tiny_mlx_adapter)
    # mlx-lm saved at 10 and 20; its final adapters.safetensors equals step 20, so no extra point.
    assert [(c.step, c.fmt, c.final) for c in ckpts] == [(10, "mlx", False), (20, "mlx", False)]


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda d: None, "NNNNNNN_adapters.safetensors"),
        (
            lambda d: (
                save_file(mlx_tensors(1), str(d / "adapters.safetensors"))
                or (d / "adapter_config.json").write_text(json.dumps(MLX_CONFIG))
            ),
            "--save-every",
        ),
        (lambda d: (d / "checkpoint-3").mkdir(), "full fine-tune"),
        (
            lambda d: save_file(mlx_tensors(1), str(d / "0000001_adapters.safetensors")),
            "no adapter_config.json",
        ),
        (lambda d: (write_mlx_run(d, [1]), write_peft_dir(d / "checkpoint-2", 1)), "both"),
    ],
    ids=["empty", "final-only", "full-finetune", "mlx-no-config", "both-layouts"],
)
def test_discovery_errors_name_what_was_looked_for(tmp_path: Path, setup, expected: str) -> None:
    setup(tmp_path)
    with pytest.raises(CheckpointError, match=expected) as info:
        discover_checkpoints(tmp_path)
    if expected == "NNNNNNN_adapters.safetensors":
        assert "checkpoint-N" in str(info.value)


def test_missing_dir_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a directory"):
        discover_checkpoints(tmp_path / "nope")


# ------------------------------------------------------------------ summary
def test_summary_first_pass_best_and_held_out_regressions_only() -> None:
    P, F, E = Verdict.PASS, Verdict.FAIL, Verdict.ERROR
    rows = [
        row(100, 0.5, F, 0.01),
        row(200, 4.0, P, 0.05),
        row(300, 40.0, P, 0.20),
        row(400, 30.0, P, 0.30),
        row(500, 12.0, P, 0.35),
        row(600, None, E, None),
        row(700, 1.0, F, 0.50),
        row(800, 45.0, P, 0.60),
    ]
    rows[4].held_out = {"drift": "PASS"}
    rows[6].held_out = {"drift": "FAIL"}
    rows[7].held_out = {"drift": "FAIL"}  # still failing: one regression, not two
    s = summarize(list(reversed(rows)))  # order of the input does not matter
    # Best: the largest effect that kept what the base knew, not the highest z (800 lost it).
    assert s.first_pass.step == 200 and s.best.step == 500 and s.last.step == 800
    assert "best: step 500 (0.35 nats)" in s.line
    # A falling z (300 → 500) and a lost pass (700) are not regressions; the held-out FAIL is.
    assert [g.step for g in s.regressions] == [700] and "drift" in s.regressions[0].reason
    assert [r.step for r in s.below_noise] == [600, 700]
    assert s.last_passes
    assert s.line.startswith("first above noise: step 200") and "regressed at step 700" in s.line


def test_growing_adapter_whose_z_falls_is_not_a_regression() -> None:
    """Norm-matched nulls grow with the adapter: z falls while the divergence rises."""
    rows = [
        row(10, 60.0, Verdict.PASS, 0.51),
        row(20, 40.0, Verdict.PASS, 0.59),
        row(30, 25.0, Verdict.PASS, 0.64),
    ]
    s = summarize(rows)
    assert not s.regressions and not s.below_noise
    assert "effect 0.51 → 0.64 nats (rising" in s.line and "regress" not in s.line


def test_summary_without_a_pass_and_without_rows() -> None:
    s = summarize([row(1, 0.3, Verdict.FAIL, 0.02), row(2, 1.9, Verdict.FAIL, 0.04)])
    assert s.first_pass is None and s.best.step == 2 and not s.regressions and not s.last_passes
    assert "no checkpoint rose above noise" in s.line
    empty = summarize([])
    assert (
        empty.first_pass is None and empty.best is None and empty.line == "no checkpoints evaluated"
    )


def test_summary_steady_pass_has_no_regression() -> None:
    s = summarize([row(1, 5.0, Verdict.PASS), row(2, 9.0, Verdict.PASS), row(3, 5.0, Verdict.PASS)])
    assert not s.regressions and s.first_pass.step == 1 and "no held-out probe ran" in s.line


def test_row_round_trips_through_dict() -> None:
    r = row(3, 2.5, Verdict.WARN)
    assert CheckpointRow.from_dict({**r.to_dict(), "unknown": 1}) == r


# ------------------------------------------------------------------ evaluation (real backend)
@pytest.fixture
def run_with_bad_checkpoints(tiny_mlx_adapter: Path, tmp_path: Path) -> Path:
    """The real mlx-lm run plus a garbage first checkpoint (5) and a truncated one (15)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_mlx_adapter, run)
    (run / "0000005_adapters.safetensors").write_bytes(b"not a safetensors file")
    good = (run / "0000010_adapters.safetensors").read_bytes()
    (run / "0000015_adapters.safetensors").write_bytes(good[: len(good) // 2])
    return run


def test_evaluate_checkpoints_builds_base_once_and_survives_bad_ones(
    run_with_bad_checkpoints: Path, tiny_model_dir: Path, real_backend: str, monkeypatch
) -> None:
    builds = []
    real_build = platform.build_backend

    def counting_build(*args, **kwargs):
        builds.append(args[0].adapter)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(platform, "build_backend", counting_build)
    seen: list[int] = []
    rows = evaluate_checkpoints(
        run_with_bad_checkpoints,
        CheckpointSetup(model=str(tiny_model_dir), prompts=PROMPTS, backend=real_backend, runs=3),
        on_row=lambda r: seen.append(r.step),
    )
    assert [r.step for r in rows] == seen == [5, 10, 15, 20]
    by_step = {r.step: r for r in rows}
    assert by_step[5].verdict is Verdict.ERROR and "cannot read" in by_step[5].message
    assert by_step[15].verdict is Verdict.ERROR
    # The base was built once, with the first checkpoint that reads; later ones are swapped in.
    assert len(builds) == 1 and builds[0].endswith("0000010_adapters.safetensors")
    for step in (10, 20):
        r = by_step[step]
        assert r.verdict is not Verdict.ERROR, r.message
        assert r.divergence > 0 and r.null_mean > 0 and r.null_std >= 0 and r.z is not None
        assert r.key == f"mlx:{step}" and r.duration_s > 0
    # Different weights, different divergence: step 20 really was swapped in.
    assert by_step[10].divergence != by_step[20].divergence


# ------------------------------------------------------------------ CLI
def test_cli_checkpoints_end_to_end(
    tiny_mlx_adapter: Path, tiny_model_dir: Path, tmp_path: Path, real_backend: str
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The keeper said\n\nIn the storm\n")
    plots, out = tmp_path / "plots", tmp_path / "traj.json"
    args = [
        str(tiny_mlx_adapter),
        "--model",
        str(tiny_model_dir),
        "--backend",
        real_backend,
        "--prompts",
        str(prompts),
        "--runs",
        "3",
        "--plot",
        str(plots),
        "--json",
        str(out),
    ]
    result = CliRunner().invoke(checkpoints_cmd, args)
    data = json.loads(out.read_text())
    last_passes = data["rows"][-1]["verdict"] == "PASS"
    assert result.exit_code == (0 if last_passes else 1), result.output
    assert [r["step"] for r in data["rows"]] == [10, 20] and data["prompts"] == PROMPTS
    assert (
        data["summary"]["line"] in result.output.replace("\n", " ")
        or "rose above noise" in result.output
    )
    assert "step 10" in result.output and "step 20" in result.output
    # --plot names a directory, as for `eval`.
    assert (plots / "sway-trajectory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["{tmp}/missing", "--model", "m"], "is not a directory"),
        (["{tmp}/empty", "--model", "m"], "no checkpoints"),
        (
            ["{tmp}/run", "--model", "m", "--prompts", "{tmp}/nope.txt"],
            "cannot read the prompts file",
        ),
        (["{tmp}/run", "--model", "m", "--prompts", "{tmp}/blank.txt"], "holds no prompts"),
        ([], "missing the training run directory"),
        (["{tmp}/run", "--adapter-path", "{tmp}/empty", "--model", "m"], "not both"),
        (["{tmp}/bare"], "no --model given"),
        (["{tmp}/run", "--model", "{tmp}/empty"], "has no config.json"),
        (["{tmp}/run", "--model", "m", "--plot", "{tmp}/blank.txt/p"], "cannot write --plot"),
    ],
    ids=[
        "missing-dir",
        "no-checkpoints",
        "unreadable-prompts",
        "blank-prompts",
        "no-dir",
        "two-dirs",
        "no-model",
        "model-without-config",
        "plot-into-a-file",
    ],
)
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "bare").mkdir()
    save_file(mlx_tensors(1), str(tmp_path / "bare" / "0000001_adapters.safetensors"))
    (tmp_path / "bare" / "adapter_config.json").write_text(json.dumps(MLX_CONFIG))  # no "model"
    write_mlx_run(tmp_path / "run", [1, 2])
    (tmp_path / "blank.txt").write_text("\n  \n")
    before = sorted(p for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(
        checkpoints_cmd,
        [a.format(tmp=tmp_path) for a in args] + ["--json", str(tmp_path / "o.json")],
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.output
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_an_unwritable_json_is_refused_before_any_work(tmp_path: Path) -> None:
    run = write_mlx_run(tmp_path / "run", [1])
    (tmp_path / "a-file").write_text("x")
    args = [str(run), "--model", "m", "--no-plot", "--json", str(tmp_path / "a-file" / "o.json")]
    result = CliRunner().invoke(checkpoints_cmd, args)
    assert result.exit_code == 2 and "cannot write --json" in result.output, result.output
    assert "checkpoints in" not in result.output


def test_model_defaults_to_the_one_the_adapter_config_records(tmp_path: Path, monkeypatch) -> None:
    run = write_mlx_run(tmp_path / "run", [1])
    cfg = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps({**cfg, "model": "some/base-model"}))

    def refuse(spec, backend="auto", **_kw):
        raise OSError(f"no model {spec.base}")

    monkeypatch.setattr(platform, "build_backend", refuse)
    result = CliRunner().invoke(checkpoints_cmd, [str(run), "--no-plot"])
    assert result.exit_code == 2
    assert "some/base-model (from the adapter config)" in result.output
    assert "cannot load some/base-model" in result.output


@pytest.mark.parametrize("command", ["checkpoints", "watch"])
def test_safety_flags_reach_the_model_load(tmp_path: Path, monkeypatch, command: str) -> None:
    from sway_common.app.loop_cli import watch_cmd

    run = write_mlx_run(tmp_path / "run", [1])
    seen: list[dict] = []

    def capture(spec, backend="auto", **kw):
        seen.append(kw)
        raise OSError("stop here")

    monkeypatch.setattr(platform, "build_backend", capture)
    cmd = checkpoints_cmd if command == "checkpoints" else watch_cmd
    args = [str(run), "--model", "some/base", "--no-plot", "--poll", "0.05"]
    args = args if command == "watch" else args[:-2]
    for flags, expected in [
        (["--allow-pickle", "--trust-remote-code"], True),
        ([], False),
    ]:
        result = CliRunner().invoke(cmd, [*args, *flags])
        assert result.exit_code == 2 and "stop here" in result.output, result.output
        assert seen[-1] == {"allow_pickle": expected, "trust_remote_code": expected}


def test_light_imports() -> None:
    import subprocess
    import sys

    code = (
        "import sys, sway_common.app.checkpoints, sway_common.app.watch, sway_common.app.loop_cli, "
        "sway_common.report.plots; heavy = {'torch', 'mlx', 'matplotlib', 'transformers'} & "
        "{m.split('.')[0] for m in sys.modules}; assert not heavy, heavy"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1]
    )
