"""numpy builders of exports for the weight-check tests: model dirs (float, MLX affine
codes, raw safetensors of any dtype), fused weights, random and scaled adapters, GGUFs.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sway_common import affine_quant
from sway_common.adapters import AdapterWeights, LoraModule
from sway_common.gguf_weights import permute


def save_raw(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """A safetensors file written byte by byte: any dtype name (BF16 from float32)."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, arr) in tensors.items():
        if dtype == "BF16":
            bits = affine_quant.round_to(arr, "bfloat16").view(np.uint32) >> 16
            blob = bits.astype("<u2").tobytes()
        else:
            blob = np.ascontiguousarray(arr).tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def model_copy(src: Path, dst: Path, tensors: dict[str, np.ndarray], **config: object) -> Path:
    """``src``'s config and tokenizer with ``tensors`` as its weights (and ``config`` set)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    return dst


def fused(tensors: dict[str, np.ndarray], adapter: AdapterWeights, scale: float = 1.0):
    out = dict(tensors)
    for name, m in adapter.modules.items():
        w = tensors[f"{name}.weight"]
        out[f"{name}.weight"] = (m.merged(w) - w) * np.float32(scale) + w
    return out


def quantized(tensors: dict[str, np.ndarray], bits: int, group_size: int = 64):
    """Every 2-D weight that splits into groups as MLX affine codes, as mlx-lm saves it."""
    out = {}
    for name, w in tensors.items():
        if w.ndim == 2 and w.shape[1] % group_size == 0:
            stem = name[: -len(".weight")]
            out[name], out[f"{stem}.scales"], out[f"{stem}.biases"] = affine_quant.quantize(
                w, group_size, bits
            )
        else:
            out[name] = w
    return out


def dequantized(tensors: dict[str, np.ndarray], bits: int, group_size: int = 64):
    return {
        n: affine_quant.requantize(w, group_size, bits)
        if w.ndim == 2 and w.shape[1] % group_size == 0
        else w
        for n, w in tensors.items()
    }


def random_adapter(tensors, keys=("q_proj", "v_proj"), seed=0, std=0.05, dora=False):
    rng = np.random.default_rng(seed)
    modules = {}
    for i in (0, 1):
        for key in keys:
            name = f"model.layers.{i}.self_attn.{key}"
            out, inp = tensors[f"{name}.weight"].shape
            a = (rng.standard_normal((4, inp)) * std).astype(np.float32)
            b = (rng.standard_normal((out, 4)) * std).astype(np.float32)
            mag = None
            if dora:
                w = tensors[f"{name}.weight"] + 2.0 * b @ a
                mag = (np.linalg.norm(w, axis=1) * 1.1).astype(np.float32)
            modules[name] = LoraModule(a=a, b=b, scale=2.0, magnitude=mag)
    return AdapterWeights(fmt="peft", dora=dora, modules=modules)


def scaled(adapter: AdapterWeights, factor: float) -> AdapterWeights:
    modules = {n: replace(m, scale=m.scale * factor) for n, m in adapter.modules.items()}
    return AdapterWeights(fmt=adapter.fmt, dora=adapter.dora, modules=modules)


def write_gguf(path: Path, tensors: dict[str, np.ndarray], qtype_name: str) -> Path:
    """A llama GGUF of the tiny model's attention weights, q/k permuted like llama.cpp."""
    gguf = pytest.importorskip("gguf")
    qtype = gguf.GGMLQuantizationType[qtype_name]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    for i in (0, 1):
        for key, short in names.items():
            w = tensors[f"model.layers.{i}.self_attn.{key}.weight"]
            w = permute(w, 4) if key == "q_proj" else permute(w, 2) if key == "k_proj" else w
            data = gguf.quants.quantize(np.ascontiguousarray(w, np.float32), qtype)
            writer.add_tensor(f"blk.{i}.{short}.weight", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
