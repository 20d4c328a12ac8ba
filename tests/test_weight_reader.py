"""The weight check's readers: safetensors dirs (float dtypes, shards, MLX affine codes
checked bit for bit against ``mx.quantize`` / ``mx.dequantize``) and GGUF files (q/k rows
unpermuted), and what they refuse."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from weight_builders import fused, model_copy, random_adapter, save_raw, write_gguf

from sway_common import affine_quant
from sway_common.gguf_weights import GGUFWeights, permute, unpermute
from sway_common.suite.export_weights import check_weights
from sway_common.weight_reader import ModelWeights, Storage, WeightReadError

Q = "model.layers.1.self_attn.q_proj"


@pytest.fixture(scope="module")
def base_tensors(tiny_model_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(tiny_model_dir / "model.safetensors"))


# ------------------------------------------------------------------ the reader
def test_reader_reads_float_dtypes_and_shards(tiny_model_dir, base_tensors, tmp_path) -> None:
    w = base_tensors[f"{Q}.weight"]
    for dtype, expect in [
        ("F16", w.astype(np.float16).astype(np.float32)),
        ("BF16", affine_quant.round_to(w, "bfloat16")),
    ]:
        d = tmp_path / dtype
        d.mkdir()
        (d / "config.json").write_text("{}")
        cast = {"F16": w.astype(np.float16), "BF16": w}[dtype]
        save_raw(
            d / "model.safetensors",
            {"x": ("F32", np.ones(3, np.float32)), f"{Q}.weight": (dtype, cast)},
        )
        got, storage = ModelWeights(d).module_weight(Q)
        assert np.array_equal(got, expect) and storage.kind == "float"
        assert storage.dtype == {"F16": "float16", "BF16": "bfloat16"}[dtype]
    names = sorted(base_tensors)
    half = len(names) // 2
    shards = model_copy(tiny_model_dir, tmp_path / "sharded", {})
    (shards / "model.safetensors").unlink()
    weight_map = {}
    for i, part in enumerate([names[:half], names[half:]]):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: base_tensors[n] for n in part}, str(shards / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    weights = ModelWeights(shards)
    for name in (names[0], names[-1]):
        module = name[: -len(".weight")]
        if name.endswith(".weight") and base_tensors[name].ndim == 2:
            assert np.array_equal(weights.module_weight(module)[0], base_tensors[name])
    assert np.array_equal(weights.module_weight(Q)[0], w)


def test_reader_refuses_what_it_cannot_read(tiny_model_dir, base_tensors, tmp_path) -> None:
    w = base_tensors[f"{Q}.weight"]
    cases = {}
    d = model_copy(tiny_model_dir, tmp_path / "cut", {f"{Q}.weight": w})
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-100])
    cases[d] = "corrupt or truncated"
    d = model_copy(tiny_model_dir, tmp_path / "f8", {})
    save_raw(d / "model.safetensors", {f"{Q}.weight": ("F8_E4M3", w.astype(np.uint8))})
    cases[d] = "as F8_E4M3"
    d = model_copy(tiny_model_dir, tmp_path / "gptq", {f"{Q}.qweight": w.view(np.int32)})
    cases[d] = "GPTQ/AWQ"
    d = model_copy(tiny_model_dir, tmp_path / "other", {"lm_head.weight": w})
    cases[d] = f"has no weight {Q}.weight"
    d = model_copy(tiny_model_dir, tmp_path / "mxfp4", {f"{Q}.weight": w.view(np.uint32)[:, :8]})
    save_raw(
        d / "model.safetensors",
        {
            f"{Q}.weight": ("U32", w.view(np.uint32)[:, :8].copy()),
            f"{Q}.scales": ("U8", np.ones((64, 2), np.uint8)),
        },
    )
    cases[d] = "mxfp4/mxfp8/nvfp4"
    for model_dir, words in cases.items():
        with pytest.raises(WeightReadError, match=words.replace("/", ".")):
            ModelWeights(model_dir).module_weight(Q, (64, 64))
    shards = model_copy(tiny_model_dir, tmp_path / "missing-shard", {})
    index = {"weight_map": {f"{Q}.weight": "model-00002-of-00002.safetensors"}}
    (shards / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightReadError, match="misses the shard"):
        ModelWeights(shards)


# ------------------------------------------------------------------ MLX affine
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_numpy_affine_quantization_is_mlx_bit_for_bit(bits: int, dtype: str) -> None:
    mx = pytest.importorskip("mlx.core")
    w = (np.random.default_rng(bits).standard_normal((16, 256)) * 0.1).astype(np.float32)
    wm = mx.array(w).astype(getattr(mx, dtype))
    w = np.array(wm.astype(mx.float32))
    q, s, b = mx.quantize(wm, group_size=64, bits=bits)
    s32, b32 = np.array(s.astype(mx.float32)), np.array(b.astype(mx.float32))
    packed, scales, biases = affine_quant.quantize(w, 64, bits, dtype)
    assert np.array_equal(packed, np.array(q)) and np.array_equal(scales, s32)
    assert np.array_equal(biases, b32)
    theirs = np.array(mx.dequantize(q, s, b, group_size=64, bits=bits).astype(mx.float32))
    ours = affine_quant.dequantize(np.array(q), s32, b32, 64, bits, dtype)
    assert np.array_equal(ours, theirs)
    assert np.array_equal(affine_quant.requantize(w, 64, bits, dtype), theirs)
    codes = affine_quant.unpack(packed, bits)
    assert np.array_equal(affine_quant.pack(codes, bits), packed)


def test_a_quantized_dir_with_a_per_layer_override_reads_as_mlx_dequantizes(
    tiny_model_dir, base_tensors, tmp_path
) -> None:
    mx = pytest.importorskip("mlx.core")
    tensors, expect = {}, {}
    for name in (Q, "model.layers.0.self_attn.v_proj"):
        gs, bits = (32, 8) if name == Q else (64, 4)
        q, s, b = mx.quantize(mx.array(base_tensors[f"{name}.weight"]), group_size=gs, bits=bits)
        tensors.update(
            {
                f"{name}.weight": np.array(q),
                f"{name}.scales": np.array(s),
                f"{name}.biases": np.array(b),
            }
        )
        expect[name] = np.array(mx.dequantize(q, s, b, group_size=gs, bits=bits))
    quantization = {"group_size": 64, "bits": 4, Q: {"group_size": 32, "bits": 8}}
    d = model_copy(tiny_model_dir, tmp_path / "mixed", tensors, quantization=quantization)
    weights = ModelWeights(d)
    for name, shape in ((Q, None), ("model.layers.0.self_attn.v_proj", (32, 64))):
        got, storage = weights.module_weight(name, shape)
        assert np.array_equal(got, expect[name])
    assert weights.module_weight(Q)[1].describe() == "8-bit (group 32)"
    # A config that disagrees with the shapes: the base's shape settles bits and groups.
    wrong = model_copy(
        tiny_model_dir, tmp_path / "wrong", tensors, quantization={"group_size": 64, "bits": 4}
    )
    got, storage = ModelWeights(wrong).module_weight(Q, (64, 64))
    assert (storage.bits, storage.group_size) == (8, 32) and np.array_equal(got, expect[Q])


# ------------------------------------------------------------------ GGUF
def test_gguf_weights_are_read_unpermuted(tiny_model_dir, base_tensors, tmp_path) -> None:
    w = base_tensors["model.layers.0.self_attn.k_proj.weight"]
    assert np.array_equal(unpermute(permute(w, 2), 2), w) and not np.array_equal(permute(w, 2), w)
    adapter = random_adapter(base_tensors, keys=("q_proj", "k_proj", "v_proj"))
    base = ModelWeights(tiny_model_dir)
    plain = GGUFWeights(write_gguf(tmp_path / "base.gguf", base_tensors, "F32"))
    assert np.array_equal(plain.module_weight(Q)[0], base_tensors[f"{Q}.weight"])
    impostor = check_weights(adapter, base, plain, runs=4)
    assert not impostor.passed and impostor.retained == 0.0
    fused_gguf = write_gguf(tmp_path / "fused.gguf", fused(base_tensors, adapter), "Q8_0")
    check = check_weights(adapter, base, GGUFWeights(fused_gguf), runs=4)
    assert check.passed and check.retained == pytest.approx(1.0, abs=0.02), check.message
    assert check.storage == "GGUF Q8_0" and check.faithful == pytest.approx(1.0, abs=0.02)
    # Q8_0's own changes on a random delta of this size: its noise floor, which the
    # export's off-delta is read against.
    assert 0 < check.floor < 0.5 and check.off_delta <= check.floor_upper
    assert check.cosine > 0.95  # rows out of order would decorrelate q and k


class _NoFloor:
    """An export stored in a type numpy cannot re-quantize (a GGUF k-quant)."""

    def __init__(self, tensors: dict[str, np.ndarray]) -> None:
        self.tensors = tensors

    def module_weight(self, module: str, shape=None):
        return self.tensors[f"{module}.weight"], Storage("gguf", qtype="Q4_K")


def test_without_a_floor_the_share_alone_decides(tiny_model_dir, base_tensors) -> None:
    pytest.importorskip("gguf")
    with pytest.raises(NotImplementedError):
        Storage("gguf", qtype="Q4_K").requantize(base_tensors[f"{Q}.weight"])
    adapter = random_adapter(base_tensors)
    base = ModelWeights(tiny_model_dir)
    kept = check_weights(adapter, base, _NoFloor(fused(base_tensors, adapter)), runs=3)
    assert kept.passed and math.isnan(kept.floor)
    lost = check_weights(adapter, base, _NoFloor(base_tensors), runs=3)
    assert not lost.passed and "do not carry" in lost.message
    half = check_weights(adapter, base, _NoFloor(fused(base_tensors, adapter, 0.6)), runs=3)
    assert not half.passed and "numpy cannot re-quantize GGUF Q4_K" in half.message
