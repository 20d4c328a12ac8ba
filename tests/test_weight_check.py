"""export-check's weight-space check: the delta-survival measure, what storage alone
keeps, the verdict's rule, and `export-check --weights-only` (the readers are tested in
``test_weight_reader.py``).

Exports are built from the tiny Llama with numpy (``weight_builders``): W + s·ΔW saved
as float, as MLX affine codes, or as a GGUF.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file
from weight_builders import (
    dequantized,
    fused,
    model_copy,
    quantized,
    random_adapter,
    save_raw,
    scaled,
    write_gguf,
)

from sway_common.adapters import AdapterWeights, read_adapter
from sway_common.app.cli import app
from sway_common.report import load_json
from sway_common.suite.export_weights import check_weights
from sway_common.types import Verdict
from sway_common.weight_reader import ModelWeights

Q = "model.layers.1.self_attn.q_proj"


@pytest.fixture(scope="module")
def base_tensors(tiny_model_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(tiny_model_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def trained(tiny_peft_adapter: Path) -> AdapterWeights:
    return read_adapter(tiny_peft_adapter)


# ------------------------------------------------------------------ delta survival
def _check(base: Path, export: Path, adapter: AdapterWeights, runs: int = 4):
    return check_weights(adapter, ModelWeights(base), ModelWeights(export), runs=runs)


def test_float_exports(tiny_model_dir, base_tensors, trained, tmp_path) -> None:
    def export(label: str, tensors: dict[str, np.ndarray]) -> Path:
        return model_copy(tiny_model_dir, tmp_path / label, tensors)

    faithful = _check(tiny_model_dir, export("fused", fused(base_tensors, trained)), trained)
    assert faithful.passed and faithful.retained == pytest.approx(1.0, abs=1e-5)
    assert faithful.cosine == pytest.approx(1.0, abs=1e-5) and faithful.off_delta < 1e-5
    assert len(faithful.modules) == 4 and not faithful.lost
    base = _check(tiny_model_dir, tiny_model_dir, trained)
    assert not base.passed and base.retained == 0.0 and "do not carry" in base.message
    assert len(base.lost) == 4
    half = _check(tiny_model_dir, export("half", fused(base_tensors, trained, 0.5)), trained)
    assert not half.passed and half.retained == pytest.approx(0.5, abs=1e-5)
    assert "wrong scale" in half.message
    twice = _check(tiny_model_dir, export("twice", fused(base_tensors, trained, 2.0)), trained)
    assert not twice.passed and "merged twice" in twice.message
    partial = fused(base_tensors, trained)
    for key in ("q_proj", "v_proj"):
        name = f"model.layers.1.self_attn.{key}.weight"
        partial[name] = base_tensors[name]
    skipped = _check(tiny_model_dir, export("skipped", partial), trained)
    assert not skipped.passed and "2 of 4 adapted modules lost their delta" in skipped.message
    assert skipped.lost == [f"model.layers.1.self_attn.{k}" for k in ("q_proj", "v_proj")]
    bf16 = export("bf16", {})
    save_raw(
        bf16 / "model.safetensors",
        {n: ("BF16", w) for n, w in fused(base_tensors, trained).items()},
    )
    kept = _check(tiny_model_dir, bf16, trained)
    assert (
        kept.passed and kept.storage == "bfloat16" and kept.retained == pytest.approx(1.0, abs=0.02)
    )


def test_dora_delta_is_the_merged_weight_minus_the_base(
    tiny_model_dir, base_tensors, tmp_path
) -> None:
    dora = random_adapter(base_tensors, dora=True)
    export = model_copy(tiny_model_dir, tmp_path / "dora", fused(base_tensors, dora))
    check = _check(tiny_model_dir, export, dora)
    assert check.passed and check.retained == pytest.approx(1.0, abs=1e-5)


def test_requantizing_swallows_a_light_delta_and_keeps_a_strong_one(
    tiny_model_dir, base_tensors, trained, tmp_path
) -> None:
    """A 4-bit base, fused as mlx_lm fuse does (dequantize, add ΔW, re-quantize to 4 bits).
    The light delta mostly rounds away: the export lost it, and although the format is to
    blame (a faithful re-quantized export keeps no more), it FAILs, naming the modules
    and what keeps the delta."""
    grid = dequantized(base_tensors, 4)
    q4 = {"quantization": {"group_size": 64, "bits": 4}}
    base = model_copy(tiny_model_dir, tmp_path / "base-q4", quantized(base_tensors, 4), **q4)
    light = scaled(trained, 0.01)
    found = {}
    for label, adapter in (("strong", trained), ("light", light)):
        export = model_copy(
            tiny_model_dir, tmp_path / label, quantized(fused(grid, adapter), 4), **q4
        )
        found[label] = _check(base, export, adapter, runs=6)
    found["light-deq"] = _check(
        base, model_copy(tiny_model_dir, tmp_path / "deq", fused(grid, light)), light
    )
    strong, weak, deq = found["strong"], found["light"], found["light-deq"]
    assert (
        strong.passed and strong.retained > 0.95 and "carry the adapter's delta" in strong.message
    )
    assert strong.storage == "4-bit (group 64)"
    # The strong delta's own changes are the format's: within its noise floor.
    assert strong.off_delta <= strong.floor_upper and strong.floor > 0, strong.message
    assert weak.retained < 0.5 and weak.faithful == pytest.approx(weak.retained, abs=0.01)
    assert not weak.passed and len(weak.lost) == 4, weak.message
    assert "4 of 4 adapted modules lost their delta (model.layers.0.self_attn.q_proj" in (
        weak.message
    )
    assert "rounds a delta this small away" in weak.message and "--dequantize" in weak.message
    assert deq.passed and deq.retained == pytest.approx(1.0, abs=1e-4), deq.message
    impostor = _check(base, base, light, runs=6)
    assert not impostor.passed and impostor.retained == 0.0, impostor.message
    assert "do not carry" in impostor.message


# ------------------------------------------------------------------ the command
def _invoke(model: Path, adapter: Path, export: Path, *extra: str):
    args = ["export-check", "--model", str(model), "--adapter-path", str(adapter)]
    return CliRunner().invoke(
        app, [*args, "--export", str(export), "--weights-only", "--runs", "3", *extra]
    )


@pytest.fixture
def no_model_loads(monkeypatch) -> None:
    import sway_common.app.run as run

    def forbidden(*a, **k):
        raise AssertionError("--weights-only loaded a model")

    monkeypatch.setattr(run, "build_backend", forbidden)


def test_weights_only_verdicts_and_report(
    no_model_loads, tiny_model_dir, tiny_peft_adapter, base_tensors, trained, tmp_path
) -> None:
    export = model_copy(tiny_model_dir, tmp_path / "fused", fused(base_tensors, trained))
    out = tmp_path / "r.json"
    result = _invoke(
        tiny_model_dir, tiny_peft_adapter, export, "--json", str(out), "--backend", "dummy"
    )
    assert result.exit_code == 0, result.output
    assert "retained" in result.output and "model.layers.1.self_attn.v_proj" in result.output
    assert result.output.rstrip().splitlines()[-1].startswith("PASS: the export's weights carry")
    report = load_json(out)
    assert [p.name for p in report.probes] == ["weight_delta"] and report.verdict is Verdict.PASS
    probe = report.probes[0]
    assert probe.category == "export" and probe.raw == pytest.approx(1.0, abs=1e-5)
    assert len(probe.evidence["modules"]) == 4 and probe.evidence["lost"] == []
    assert report.meta["weights_only"] is True
    quiet = _invoke(tiny_model_dir, tiny_peft_adapter, tiny_model_dir, "-q")
    assert quiet.exit_code == 1 and quiet.output.count("\n") == 1, quiet.output
    assert quiet.output.startswith("FAIL: the export's weights do not carry the adapter's delta")
    gguf = write_gguf(tmp_path / "fused.gguf", fused(base_tensors, trained), "Q8_0")
    result = _invoke(tiny_model_dir, tiny_peft_adapter, gguf, "-q")
    assert result.exit_code == 0 and result.output.startswith("PASS: the export's weights"), (
        result.output
    )


def test_weights_only_bad_input_is_one_line_and_exit_two(
    no_model_loads, tiny_model_dir, tiny_peft_adapter, base_tensors, tmp_path
) -> None:
    partial = dict(base_tensors)
    del partial[f"{Q}.weight"]
    garbage = tmp_path / "broken.gguf"
    garbage.write_bytes(b"GGUF" + b"\x00" * 16)
    cases = {
        tmp_path / "missing": ("does not exist", ()),
        model_copy(tiny_model_dir, tmp_path / "partial", partial): (
            f"has no weight {Q}.weight",
            (),
        ),
        model_copy(tiny_model_dir, tmp_path / "wide", base_tensors, hidden_size=128): (
            "hidden_size is 128",
            (),
        ),
        garbage: ("cannot read the GGUF file", ()),
        tiny_model_dir: (
            "--plot draws the forward-pass measurement",
            ("--plot", str(tmp_path / "p")),
        ),
    }
    for export, (words, extra) in cases.items():
        result = _invoke(tiny_model_dir, tiny_peft_adapter, export, *extra)
        assert result.exit_code == 2, (export, result.output)
        text = " ".join(result.output.split())
        assert words in text and text.startswith("error:") and text.count("error:") == 1, text
