"""watch(): checkpoints written while it runs, half-written and corrupt files, history and restart."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file
from test_checkpoints import PROMPTS, mlx_tensors, write_mlx_run

from sway_common.adapters import read_adapter
from sway_common.app import platform
from sway_common.app.checkpoints import BackendBuildError, CheckpointSetup
from sway_common.app.loop_cli import watch_cmd
from sway_common.app.watch import append_history, read_history, watch
from sway_common.suite.trajectory import Checkpoint, CheckpointRow, error_row
from sway_common.types import Verdict

FAST = {"poll_s": 0.02, "settle_s": 0.06}


class FakeEvaluate:
    """Stands in for the model: reads the adapter for real, returns z = step."""

    def __init__(self, interrupt_at: int | None = None, crash_at: int | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.interrupt_at, self.crash_at = interrupt_at, crash_at

    def __call__(self, ckpt: Checkpoint) -> CheckpointRow:
        self.calls.append((ckpt.key, ckpt.weights.stat().st_size))
        if ckpt.step == self.interrupt_at:
            raise KeyboardInterrupt
        if ckpt.step == self.crash_at:
            raise RuntimeError("backend fell over")
        try:
            read_adapter(ckpt.path)
        except ValueError as e:
            return error_row(ckpt, str(e))
        return CheckpointRow(
            ckpt.step,
            ckpt.label,
            ckpt.step / 1000,
            float(ckpt.step),
            0.01,
            0.001,
            Verdict.PASS,
            "ok",
            key=ckpt.key,
        )


def run_watch(
    run: Path,
    history: Path,
    evaluate: Callable[[Checkpoint], CheckpointRow] | None,
    *,
    until: Callable[[], bool] | None = None,
    timeout: float = 30.0,
    **kw,
) -> list[CheckpointRow]:
    deadline = time.monotonic() + timeout
    kw = {**FAST, **kw}
    return watch(
        run,
        CheckpointSetup(model="unused", prompts=PROMPTS),
        history=history,
        evaluate=evaluate,
        stop=lambda: time.monotonic() > deadline or (until is not None and until()),
        **kw,
    )


def history_lines(history: Path) -> list[dict]:
    return [json.loads(line) for line in history.read_text().splitlines()]


def valid_bytes(tmp: Path, seed: int) -> bytes:
    save_file(mlx_tensors(seed), str(tmp))
    data = tmp.read_bytes()
    tmp.unlink()
    return data


def test_checkpoints_written_during_the_watch(tmp_path: Path) -> None:
    run = write_mlx_run(tmp_path / "run", [])
    history = tmp_path / "h.jsonl"
    blobs = {s: valid_bytes(tmp_path / "x.safetensors", s) for s in (100, 200, 400)}
    corrupt = tmp_path / "bad.safetensors"
    save_file({"foo": mlx_tensors(3)["model.layers.0.self_attn.q_proj.lora_a"]}, str(corrupt))

    def trainer() -> None:
        (run / "0000100_adapters.safetensors").write_bytes(blobs[100])
        time.sleep(0.1)
        half = len(blobs[200]) // 2
        path = run / "0000200_adapters.safetensors"
        path.write_bytes(blobs[200][:half])
        time.sleep(0.5)  # a stalled writer: the half file outlives the settle time
        with open(path, "ab") as f:
            f.write(blobs[200][half:])
        shutil.copyfile(corrupt, run / "0000300_adapters.safetensors")
        time.sleep(0.1)
        (run / "0000400_adapters.safetensors").write_bytes(blobs[400])

    fake = FakeEvaluate()
    writer = threading.Thread(target=trainer)
    writer.start()
    rows = run_watch(run, history, fake, max_checkpoints=4, max_tries=1000)
    writer.join()
    assert sorted(r.step for r in rows) == [100, 200, 300, 400]
    by_step = {r.step: r for r in rows}
    assert by_step[300].verdict is Verdict.ERROR and "foo" in by_step[300].message
    assert all(by_step[s].verdict is Verdict.PASS for s in (100, 200, 400))
    # The half-written file was never handed to the evaluator: once, complete.
    assert [c for c in fake.calls if c[0] == "mlx:200"] == [("mlx:200", len(blobs[200]))]
    lines = history_lines(history)
    assert sorted(rec["key"] for rec in lines) == ["mlx:100", "mlx:200", "mlx:300", "mlx:400"]
    assert all(rec["fingerprint"] and rec["recorded_at"] for rec in lines)
    assert [r.step for r in read_history(history)] == [100, 200, 300, 400]


def test_restart_skips_recorded_checkpoints(tmp_path: Path) -> None:
    run = write_mlx_run(tmp_path / "run", [1, 2])
    history = tmp_path / "h.jsonl"
    assert [r.step for r in run_watch(run, history, FakeEvaluate(), max_checkpoints=2)] == [1, 2]
    save_file(mlx_tensors(3), str(run / "0000003_adapters.safetensors"))
    fake = FakeEvaluate()
    assert [r.step for r in run_watch(run, history, fake, max_checkpoints=1)] == [3]
    assert [key for key, _ in fake.calls] == ["mlx:3"]
    idle = FakeEvaluate()
    assert run_watch(run, history, idle, timeout=0.3) == [] and idle.calls == []
    assert len(history_lines(history)) == 3


def test_unreadable_file_is_an_error_after_max_tries_and_retried_once_rewritten(
    tmp_path: Path,
) -> None:
    run = write_mlx_run(tmp_path / "run", [])
    good = valid_bytes(tmp_path / "x.safetensors", 1)
    target = run / "0000001_adapters.safetensors"
    target.write_bytes(good[:-10])  # truncated for good: its header promises more bytes
    history = tmp_path / "h.jsonl"
    fake = FakeEvaluate()
    (r,) = run_watch(run, history, fake, max_checkpoints=1, max_tries=3)
    assert (
        r.verdict is Verdict.ERROR and "unreadable after 3 tries" in r.message and fake.calls == []
    )
    assert read_history(history)[0].verdict is Verdict.ERROR
    time.sleep(0.01)  # a new mtime even on coarse clocks
    target.write_bytes(good)
    (r,) = run_watch(run, history, fake, max_checkpoints=1)
    assert r.verdict is Verdict.PASS
    assert [row.verdict for row in read_history(history)] == [Verdict.PASS]  # latest line wins
    assert len(history_lines(history)) == 2


def test_final_adapter_only_when_it_differs_from_the_last_checkpoint(tmp_path: Path) -> None:
    run = write_mlx_run(tmp_path / "run", [10, 20])
    shutil.copyfile(run / "0000020_adapters.safetensors", run / "adapters.safetensors")
    history = tmp_path / "h.jsonl"
    fake = FakeEvaluate()
    assert [r.step for r in run_watch(run, history, fake, max_checkpoints=2)] == [10, 20]
    assert run_watch(run, history, fake, timeout=0.4) == []  # the final equals step 20
    save_file(mlx_tensors(99), str(run / "adapters.safetensors"))  # training stopped between saves
    (final,) = run_watch(run, history, fake, max_checkpoints=1)
    assert final.label == "final (step 250)" and final.key.startswith("mlx:final:")
    assert run_watch(run, history, fake, timeout=0.3) == []


def test_ctrl_c_keeps_history_and_the_interrupted_checkpoint_is_redone(tmp_path: Path) -> None:
    run = write_mlx_run(tmp_path / "run", [1, 2])
    history = tmp_path / "h.jsonl"
    rows = run_watch(run, history, FakeEvaluate(interrupt_at=2))
    assert [r.step for r in rows] == [1]
    assert [rec["key"] for rec in history_lines(history)] == ["mlx:1"]
    fake = FakeEvaluate()
    assert [r.step for r in run_watch(run, history, fake, max_checkpoints=1)] == [2]


def test_a_crashing_evaluation_is_recorded_and_the_watch_goes_on(tmp_path: Path) -> None:
    run = write_mlx_run(tmp_path / "run", [1, 2])
    rows = run_watch(run, tmp_path / "h.jsonl", FakeEvaluate(crash_at=1), max_checkpoints=2)
    assert [(r.step, r.verdict) for r in rows] == [(1, Verdict.ERROR), (2, Verdict.PASS)]
    assert "backend fell over" in rows[0].message


def test_a_base_model_that_cannot_load_ends_the_watch(tmp_path: Path) -> None:
    run = write_mlx_run(tmp_path / "run", [1])

    def broken(_ckpt: Checkpoint) -> CheckpointRow:
        raise BackendBuildError("cannot load m")

    with pytest.raises(BackendBuildError):
        run_watch(run, tmp_path / "h.jsonl", broken)


def test_a_torn_history_line_is_ignored_and_not_glued_to(tmp_path: Path) -> None:
    run = write_mlx_run(tmp_path / "run", [1])
    history = tmp_path / "h.jsonl"
    history.write_text('{"key": "mlx:1", "verdict": "PA')  # a crash mid-write
    (r,) = run_watch(run, history, FakeEvaluate(), max_checkpoints=1)
    lines = history.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["key"] == "mlx:1"
    append_history(history, r)
    assert len(read_history(history)) == 1


def test_missing_run_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        run_watch(tmp_path / "nope", tmp_path / "h.jsonl", FakeEvaluate())


# ------------------------------------------------------------------ real backend
def test_watch_with_a_real_backend(
    tiny_mlx_adapter: Path, tiny_model_dir: Path, tmp_path: Path, real_backend: str, monkeypatch
) -> None:
    builds = []
    real_build = platform.build_backend
    monkeypatch.setattr(
        platform, "build_backend", lambda *a, **k: builds.append(1) or real_build(*a, **k)
    )
    run = tmp_path / "run"
    run.mkdir()
    src = tiny_mlx_adapter

    def trainer() -> None:
        shutil.copyfile(src / "adapter_config.json", run / "adapter_config.json")
        shutil.copyfile(src / "0000010_adapters.safetensors", run / "0000010_adapters.safetensors")
        (run / "0000015_adapters.safetensors").write_bytes(b"\x00" * 64)  # garbage: never readable
        data = (src / "0000020_adapters.safetensors").read_bytes()
        path = run / "0000020_adapters.safetensors"
        path.write_bytes(data[: len(data) // 3])
        time.sleep(0.3)  # stalled longer than the settle time, shorter than the tries
        with open(path, "ab") as f:
            f.write(data[len(data) // 3 :])
        shutil.copyfile(src / "adapters.safetensors", run / "adapters.safetensors")

    writer = threading.Thread(target=trainer)
    writer.start()
    history = tmp_path / "h.jsonl"
    deadline = time.monotonic() + 120
    rows = watch(
        run,
        CheckpointSetup(model=str(tiny_model_dir), prompts=PROMPTS, backend=real_backend, runs=3),
        history=history,
        max_checkpoints=3,
        max_tries=30,
        poll_s=0.05,
        settle_s=0.1,
        stop=lambda: time.monotonic() > deadline,
    )
    writer.join()
    by_step = {r.step: r for r in rows}
    assert sorted(by_step) == [10, 15, 20]
    assert by_step[15].verdict is Verdict.ERROR
    for step in (10, 20):
        assert by_step[step].verdict is not Verdict.ERROR and by_step[step].divergence > 0
    assert len(builds) == 1 and len(history_lines(history)) == 3


def test_cli_watch(
    tiny_mlx_adapter: Path, tiny_model_dir: Path, tmp_path: Path, real_backend: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_mlx_adapter, run)
    args = [
        str(run),
        "--model",
        str(tiny_model_dir),
        "--backend",
        real_backend,
        "--runs",
        "3",
        "--poll",
        "0.05",
        "--max-checkpoints",
        "2",
    ]
    result = CliRunner().invoke(watch_cmd, args)
    assert result.exit_code == 0, result.output
    assert "step 10" in result.output and "step 20" in result.output
    assert len(history_lines(run / "sway-history.jsonl")) == 2
    assert (run / "sway-trajectory.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        "first above noise" in result.output.lower()
        or "no checkpoint rose" in result.output.lower()
    )


def test_cli_watch_bad_input(tmp_path: Path) -> None:
    result = CliRunner().invoke(watch_cmd, [str(tmp_path / "missing"), "--model", "m"])
    assert result.exit_code == 2 and "is not a directory" in result.output
    assert not (tmp_path / "missing").exists()
