"""export-check on models quantized by bitsandbytes (transformers' ``load_in_4bit`` /
``load_in_8bit``, then ``save_pretrained``), on the tiny Llama and its trained PEFT
adapter, on the CPU.

The faithful export is the adapter fused by PEFT (``merge_and_unload``) and saved
4-bit (nf4; fp4 with double quantization) or 8-bit; the base model quantized the same
way and passed off as the export has lost the delta. A QLoRA user gives the 4-bit base
itself as ``--model``, with an export PEFT merged into the 4-bit layers. GPTQ and AWQ
(GPU-built kernels) are refused in one line.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import bitsandbytes.functional as bnbf  # the hf extra: a missing one is a failure, not a skip
import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.numpy import load_file, save_file
from test_backend_contract import TEXT, make_backend
from test_export_check import _bad_copy, _invoke
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from sway_common.adapters import read_adapter
from sway_common.report import load_json
from sway_common.types import Verdict
from sway_common.weight_reader import ModelWeights

pytestmark = pytest.mark.hf

FORMATS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4-dq": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": True,
    },
    "int8": {"load_in_8bit": True},
}
STORAGE = {"nf4": "bnb nf4 (block 64)", "fp4-dq": "bnb fp4 (block 64, double-quant)"}
STORAGE.update({"int8": "bnb int8", "deq": "float32"})
# (base, export) -> exit code: the fuse saved quantized keeps the fine-tune; the base
# quantized the same way and passed off as the export does not.
CASES = {
    ("float", "fused-nf4"): 0,
    ("float", "fused-int8"): 0,
    ("float", "base-nf4"): 1,
    ("float", "base-int8"): 1,
    ("base-nf4", "qlora-nf4"): 0,  # QLoRA: the 4-bit base, PEFT's merge into its 4-bit layers
    ("base-nf4", "qlora-deq"): 0,  # ... or into the dequantized base (float32)
    ("base-nf4", "base-nf4"): 1,
}
IDS = [f"{base}-{export}" for base, export in CASES]


def _saved(model, dst: Path, tokenizer_dir: Path) -> Path:
    model.save_pretrained(str(dst))
    for f in tokenizer_dir.glob("tokenizer*"):
        shutil.copy(f, dst / f.name)
    return dst


def _merged(model, adapter: Path):
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


def _quantized(src: Path, fmt: str, adapter: Path | None = None):
    """``src`` loaded with bitsandbytes' ``fmt`` (the adapter merged into its quantized
    layers by PEFT, if given)."""
    config = BitsAndBytesConfig(**FORMATS[fmt], bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        str(src), quantization_config=config, dtype=torch.float32
    )
    return model if adapter is None else _merged(model, adapter)


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path, tiny_peft_adapter: Path, tmp_path_factory) -> dict[str, Path]:
    """The float fuse, each format of it and of the base, and the QLoRA merges."""
    root, tiny, adapter = tmp_path_factory.mktemp("bnb"), tiny_model_dir, tiny_peft_adapter
    fused = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    out = {"float": tiny, "fused": _saved(_merged(fused, adapter), root / "fused", tiny)}
    for fmt in FORMATS:
        out[f"fused-{fmt}"] = _saved(_quantized(out["fused"], fmt), root / f"fused-{fmt}", tiny)
    for fmt in ("nf4", "int8"):
        out[f"base-{fmt}"] = _saved(_quantized(tiny, fmt), root / f"base-{fmt}", tiny)
    out["qlora-nf4"] = _saved(_quantized(tiny, "nf4", adapter), root / "qlora-nf4", tiny)
    base4 = AutoModelForCausalLM.from_pretrained(str(out["base-nf4"]), dtype=torch.float32)
    out["qlora-deq"] = _saved(_merged(base4.dequantize(), adapter), root / "qlora-deq", tiny)
    return out


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_the_weights_are_read_and_redone_by_bitsandbytes(models, tiny_peft_adapter, fmt) -> None:
    """The reader's values are what bitsandbytes computes with in the loaded model, and
    its quantizer on the fused float weights gives the saved export back (up to double
    quantization's rounding of its block scales)."""
    loaded = AutoModelForCausalLM.from_pretrained(str(models[f"fused-{fmt}"]))
    reader, fused = ModelWeights(models[f"fused-{fmt}"]), ModelWeights(models["fused"])
    for name in read_adapter(tiny_peft_adapter).modules:
        stored, storage = reader.module_weight(name)
        assert storage.describe() == STORAGE[fmt]
        layer = loaded.get_submodule(name)
        if fmt == "int8":
            state = layer.state
            codes = state.CB if state.CB is not None else layer.weight.data
            scales = state.SCB if state.SCB is not None else layer.weight.SCB
            live = bnbf.int8_vectorwise_dequant(codes, scales)
        else:
            live = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        np.testing.assert_array_equal(stored, live.float().numpy())
        redone = storage.requantize(fused.module_weight(name)[0])
        if storage.nested:
            assert np.linalg.norm(redone - stored) < 1e-3 * np.linalg.norm(stored)
        else:
            np.testing.assert_array_equal(redone, stored)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_a_bnb_model_takes_its_stored_values_exactly(models, tiny_peft_adapter, fmt) -> None:
    """The noise floor's hook on a bitsandbytes model: an adapted layer given its own
    stored values computes as before (a new bitsandbytes layer holds them); other values
    change the model; the undo puts the very layer back."""
    plain = make_backend("hf", models[f"fused-{fmt}"], None)
    try:
        name = next(iter(read_adapter(tiny_peft_adapter).modules))
        stored, _ = ModelWeights(models[f"fused-{fmt}"]).module_weight(name)
        model = plain.runtime._causal_lm
        layer = model.get_submodule(name)
        ids = [plain.runtime.encode(TEXT)[0]]
        with plain.as_base():
            before = plain.runtime.last_logprobs(ids)
        with plain.weights_replaced({name: stored}), plain.as_base():
            swapped = model.get_submodule(name)
            assert swapped is not layer and type(swapped) is type(layer)
            np.testing.assert_array_equal(plain.runtime.last_logprobs(ids), before)
        with plain.weights_replaced({name: stored + np.float32(0.05)}), plain.as_base():
            assert not np.allclose(plain.runtime.last_logprobs(ids), before, atol=1e-3)
        assert model.get_submodule(name) is layer
        with plain.as_base():
            np.testing.assert_array_equal(plain.runtime.last_logprobs(ids), before)
    finally:
        plain.close()


def _check(models, adapter: Path, case: tuple[str, str], tmp_path: Path, *extra: str):
    out = tmp_path / "r.json"
    base, export = models[case[0]], models[case[1]]
    result = _invoke(base, adapter, export, "--backend", "hf", "--json", str(out), *extra)
    print(f"\n[{'-'.join(case)} {' '.join(extra)}] exit {result.exit_code}\n{result.output}")
    return result, load_json(out)


@pytest.mark.parametrize("case", list(CASES), ids=IDS)
def test_forward_verdicts(models, tiny_peft_adapter, case, tmp_path: Path) -> None:
    """PASS for the faithful quantized export, its distance from the fine-tune what
    storing a random delta of the adapter's size the same way does (the noise floor);
    FAIL for the quantized base, nothing of the delta in its weights or its outputs, its
    distance from the fine-tune far beyond the floor."""
    result, report = _check(models, tiny_peft_adapter, case, tmp_path)
    assert result.exit_code == CASES[case], result.output
    probes = {p.name: p for p in report.probes}
    weights, nt = probes["weight_delta"], probes["export_next_token"]
    fmt = case[1].split("-", 1)[1]
    assert weights.evidence["storage"] == STORAGE[fmt]
    floor = nt.evidence["noise_floor"]
    assert floor is not None and floor["storage"] == STORAGE[fmt]
    assert (floor["mean"] > 0) is (fmt != "deq")  # float32 stores W_B + ΔN as it is
    js_export_ft = float(np.mean(nt.evidence["js_export_ft"]))
    # The tiny random model's adapter barely beats its nulls (WARN, said, not gating).
    assert probes["adapter_effect"].verdict in (Verdict.PASS, Verdict.WARN)
    if CASES[case] == 0:
        assert nt.verdict is Verdict.PASS and probes["export_completion"].verdict is Verdict.PASS
        assert weights.verdict is Verdict.PASS
        if fmt == "deq":  # float32: the fine-tune itself, up to rounding
            assert weights.evidence["off_delta"] < 1e-6 and js_export_ft < 1e-6
        else:  # of the floor's order: storing the adapter's delta costs what a random one's
            # does (measured: 0.5x the floor's upper bound for nf4, 1.04x for int8)
            assert weights.evidence["off_delta"] <= weights.evidence["floor_upper"]
            assert js_export_ft <= 2 * floor["upper"], (js_export_ft, floor)
    else:
        assert report.verdict is Verdict.FAIL and nt.verdict is Verdict.FAIL
        assert abs(nt.raw) < 0.05 and abs(weights.raw) < 0.01
        assert js_export_ft > 5 * floor["upper"], (js_export_ft, floor)
        assert "base passed off as the export" in report.meta["headline"]


WEIGHT_CASES = {**CASES, ("float", "fused-fp4-dq"): 0}


@pytest.mark.parametrize("case", list(WEIGHT_CASES), ids=[*IDS, "float-fused-fp4-dq"])
def test_weights_only_agrees(models, tiny_peft_adapter, case, tmp_path: Path) -> None:
    result, report = _check(models, tiny_peft_adapter, case, tmp_path, "--weights-only", "-q")
    assert result.exit_code == WEIGHT_CASES[case], result.output
    evidence = report.probes[0].evidence
    assert evidence["storage"] == STORAGE[case[1].split("-", 1)[1]]
    if WEIGHT_CASES[case] == 0:
        assert evidence["retained"] == pytest.approx(evidence["faithful"], abs=0.01)
        assert evidence["retained"] > 0.95
    else:
        assert evidence["lost"] and evidence["retained"] == pytest.approx(0.0, abs=0.01)


def _refused(result) -> str:
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and text.count("error:") == 1, text
    return text


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_and_awq_are_refused_in_one_line(
    tiny_model_dir, tiny_peft_adapter, tmp_path, monkeypatch, method
) -> None:
    """Base or export, weights only or not: exit 2 before any model loads, naming the
    quantizer, why (its kernels are a GPU build) and what to give instead."""
    import sway_common.app.run as run

    monkeypatch.setattr(run, "build_backend", lambda *a, **k: pytest.fail("a model loaded"))
    config = {"quant_method": method, "bits": 4}
    quantized = _bad_copy(tiny_model_dir, tmp_path / method, quantization_config=config)
    package = {"gptq": "gptqmodel", "awq": "autoawq"}[method]
    for model, export, extra in (
        (tiny_model_dir, quantized, ("--backend", "hf")),
        (quantized, tiny_model_dir, ("--weights-only",)),
    ):
        text = _refused(_invoke(model, tiny_peft_adapter, export, *extra))
        assert f"quantized by {method}" in text and f"{package}, a GPU build" in text, text
        assert "give the float model instead" in text


def test_bnb_needs_the_hf_backend_and_bitsandbytes(models, tiny_peft_adapter, monkeypatch) -> None:
    """One line each: the MLX backend does not run bitsandbytes; without bitsandbytes
    nothing reads it (weights only too)."""
    import sway_common.app.run as run
    from sway_common import bnb_quant

    monkeypatch.setattr(run, "build_backend", lambda *a, **k: pytest.fail("a model loaded"))
    text = _refused(
        _invoke(models["float"], tiny_peft_adapter, models["fused-nf4"], "--backend", "mlx")
    )
    assert "the export is quantized by bitsandbytes" in text and "use --backend hf" in text
    text = _refused(
        _invoke(models["base-nf4"], tiny_peft_adapter, models["qlora-nf4"], "--backend", "mlx")
    )
    assert "the base model is quantized by bitsandbytes" in text
    monkeypatch.setattr(bnb_quant, "available", lambda: False)
    text = _refused(
        _invoke(models["float"], tiny_peft_adapter, models["fused-int8"], "--weights-only")
    )
    assert "not installed: pip install bitsandbytes" in text


def test_a_damaged_quant_state_is_one_line(models, tiny_peft_adapter, tmp_path) -> None:
    """A 4-bit weight whose saved state misses a part: bitsandbytes cannot read it, and
    the weight check says so in one line (exit 2) naming the weight and the fix."""
    damaged = Path(shutil.copytree(models["fused-nf4"], tmp_path / "damaged"))
    tensors = load_file(str(damaged / "model.safetensors"))
    gone = next(k for k in sorted(tensors) if k.endswith("q_proj.weight.absmax"))
    del tensors[gone]
    save_file(tensors, str(damaged / "model.safetensors"), metadata={"format": "pt"})
    text = _refused(_invoke(models["float"], tiny_peft_adapter, damaged, "--weights-only"))
    assert "bitsandbytes cannot dequantize" in text and gone.removesuffix(".absmax") in text
    assert "re-save it" in text
