"""Read named weights of a model dir without loading the model: numpy only.

A model dir holds one ``*.safetensors`` file or several shards (named by
``model.safetensors.index.json``, or else every ``*.safetensors`` file of the dir).
Only the headers are parsed up front; :meth:`ModelWeights.module_weight` then reads the
byte range of the tensors it needs (``np.fromfile`` with an offset), so a check of a
few adapted modules reads a few MB of a many-GB model.

Float weights: float32, float16 and bfloat16 (widened to float32, which is exact).
MLX affine-quantized weights (``mlx_lm convert -q``, ``mlx_lm fuse`` of a quantized
base): ``<module>.weight`` (uint32 codes) with ``<module>.scales`` and
``<module>.biases``; ``config.json``'s ``quantization`` gives ``group_size`` and
``bits``, and mlx-lm writes an entry per module path where one differs (mixed-bit
recipes). Both are dequantized exactly as ``mx.dequantize`` does
(:mod:`sway_common.affine_quant`). bitsandbytes 4- and 8-bit weights (transformers'
``load_in_4bit`` / ``load_in_8bit``, then ``save_pretrained``) are dequantized by
bitsandbytes itself (:mod:`sway_common.bnb_quant`). Other formats (MLX's mxfp4/nvfp4
modes, GPTQ/AWQ ``qweight``, 8-bit float) are refused with a :class:`WeightReadError`
naming them.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from numpy.typing import NDArray

from sway_common import affine_quant, bnb_quant
from sway_common.affine_quant import FloatName

INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024
_FLOAT_DTYPES: dict[str, FloatName] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# How each safetensors dtype is read (bf16 as its bit pattern, widened after).
_RAW = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "I64": "<i8",
    "I32": "<i4",
    "U32": "<u4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
}


class WeightReadError(ValueError):
    """A model dir whose weights this reader cannot read; the message names file and fix."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie: ``file`` from byte ``offset``, ``nbytes`` long."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file holds, checked against its length; no data read."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 0 < n <= _MAX_HEADER:
                raise WeightReadError(
                    f"{path} is not a safetensors file; re-save or re-download it"
                )
            header = json.loads(f.read(n))
        size = path.stat().st_size
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightReadError(f"cannot read safetensors file {path}: {e}") from None
    if not isinstance(header, dict):
        raise WeightReadError(f"{path} is not a safetensors file (its header is not a mapping)")
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        out[name] = _entry(path, name, info, 8 + n, size)
    return out


def _entry(path: Path, name: str, info: Any, start: int, size: int) -> TensorInfo:
    bad = f"{path} is corrupt or truncated (tensor {name!r}); re-save or re-download it"
    if not isinstance(info, dict):
        raise WeightReadError(bad)
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not (isinstance(dtype, str) and isinstance(shape, list) and isinstance(offsets, list)):
        raise WeightReadError(bad)
    if len(offsets) != 2 or not all(type(v) is int and v >= 0 for v in [*shape, *offsets]):
        raise WeightReadError(bad)
    lo, hi = offsets
    width = np.dtype(_RAW[dtype]).itemsize if dtype in _RAW else None
    if not lo <= hi <= size - start or (width and hi - lo != width * math.prod(shape)):
        raise WeightReadError(bad)
    return TensorInfo(path, dtype, tuple(shape), start + lo, hi - lo)


def read_tensor(info: TensorInfo) -> NDArray[Any]:
    """One tensor's values: floats as float32 (bf16 widened), integers as stored."""
    if info.dtype not in _RAW:
        raise WeightReadError(
            f"{info.file} stores a tensor as {info.dtype}: the weight check reads float "
            "(F32/F16/BF16), MLX-quantized and bitsandbytes weights only"
        )
    raw_dtype = _RAW[info.dtype]
    count = info.nbytes // np.dtype(raw_dtype).itemsize
    try:
        arr = np.fromfile(info.file, dtype=raw_dtype, count=count, offset=info.offset)
    except OSError as e:
        raise WeightReadError(f"cannot read {info.file}: {e}") from None
    if arr.size != count:
        raise WeightReadError(f"{info.file} is truncated; re-save or re-download it")
    if info.dtype == "BF16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    elif info.dtype in ("F16", "F64"):
        arr = arr.astype(np.float32)
    return arr.reshape(info.shape)


def read_bytes(info: TensorInfo) -> NDArray[np.uint8]:
    """One tensor's raw bytes (a bitsandbytes 4-bit weight is packed bytes whatever
    dtype its storage names)."""
    try:
        arr = np.fromfile(info.file, dtype=np.uint8, count=info.nbytes, offset=info.offset)
    except OSError as e:
        raise WeightReadError(f"cannot read {info.file}: {e}") from None
    if arr.size != info.nbytes:
        raise WeightReadError(f"{info.file} is truncated; re-save or re-download it")
    return arr


def index_tensors(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of a model dir, by name, from the shard index or the files' headers."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted({model_dir / str(f) for f in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise WeightReadError(f"cannot read {index}: {e}; re-save the model") from None
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightReadError(
                f"{model_dir} misses the shard {missing[0]} its index names; copy the whole model"
            )
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightReadError(f"{model_dir} holds no *.safetensors weights")
    out: dict[str, TensorInfo] = {}
    for f in files:
        out.update(read_header(f))
    return out


@dataclass(frozen=True)
class Storage:
    """How an export stores a weight: a float dtype, MLX affine codes in groups, a GGUF
    (llama.cpp) tensor type, or bitsandbytes codes."""

    kind: Literal["float", "affine", "gguf", "bnb"]
    dtype: FloatName = "float32"
    """The float dtype, or the dtype of an affine weight's scales and biases (bnb: the
    dtype it was quantized from)."""
    bits: int = 0
    group_size: int = 0
    """Affine: inputs per group; bnb 4-bit: values per block."""
    qtype: str = ""
    """GGUF: the tensor type's name (``Q4_K``, ``Q8_0``, ``F16`` ...); bnb: ``nf4``,
    ``fp4`` or ``int8``."""
    nested: bool = False
    """bnb 4-bit: double quantization (the block scales quantized too)."""

    def describe(self) -> str:
        if self.kind == "float":
            return self.dtype
        if self.kind == "gguf":
            return f"GGUF {self.qtype}"
        if self.kind == "bnb":
            if self.qtype == "int8":
                return "bnb int8"
            nested = ", double-quant" if self.nested else ""
            return f"bnb {self.qtype} (block {self.group_size}{nested})"
        return f"{self.bits}-bit (group {self.group_size})"

    def bnb_format(self) -> bnb_quant.BnbFormat:
        return bnb_quant.BnbFormat(self.qtype, self.group_size, self.nested, self.dtype)

    def requantize(self, w: NDArray[np.floating]) -> NDArray[np.float32]:
        """What storing ``w`` this way keeps of it (rounding, or re-quantization).

        Raises NotImplementedError for a GGUF type the ``gguf`` package cannot quantize
        (the k-quants, the i-quants): there is then no floor to measure.
        """
        if self.kind == "float":
            return affine_quant.round_to(w, self.dtype)
        if self.kind == "gguf":
            from gguf import GGMLQuantizationType, quants

            qtype = GGMLQuantizationType[self.qtype]
            w32 = np.ascontiguousarray(w, dtype=np.float32)
            try:
                stored = quants.dequantize(quants.quantize(w32, qtype), qtype)
            except (NotImplementedError, quants.QuantError) as e:
                raise NotImplementedError(f"cannot re-quantize to {self.qtype}: {e}") from None
            return np.asarray(stored, dtype=np.float32)
        if self.kind == "bnb":
            return bnb_quant.requantize(w, self.bnb_format())
        return affine_quant.requantize(w, self.group_size, self.bits, self.dtype)


class WeightSource(Protocol):
    """Anything that reads one module's weight: a model dir, a GGUF file."""

    def module_weight(
        self, module: str, shape: tuple[int, ...] | None = None
    ) -> tuple[NDArray[np.float32], Storage]: ...


class ModelWeights:
    """The weights of one model dir, read tensor by tensor on demand."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self.tensors = index_tensors(self.model_dir)
        self.config = _read_config(self.model_dir)
        q = self.config.get("quantization")
        self.quantization: dict[str, Any] = q if isinstance(q, dict) else {}

    def weight_name(self, module: str) -> str:
        """The tensor name of ``module``'s weight: ``<module>.weight``, or the one name
        that ends so (a wrapper's prefix such as ``language_model.``)."""
        name = f"{module}.weight"
        if name in self.tensors:
            return name
        found = [n for n in self.tensors if n.endswith(f".{name}")]
        if len(found) == 1:
            return found[0]
        if f"{module}.qweight" in self.tensors:
            raise WeightReadError(
                f"{self.model_dir} stores {module} GPTQ/AWQ-packed (qweight); the weight "
                "check reads float, MLX-quantized and bitsandbytes weights only"
            )
        raise WeightReadError(f"{self.model_dir} has no weight {name}")

    def module_weight(
        self, module: str, shape: tuple[int, ...] | None = None
    ) -> tuple[NDArray[np.float32], Storage]:
        """``module``'s weight, dequantized to float32, and how it is stored.

        ``shape``: the (out, in) expected, which settles an affine weight's bits and
        group size from the tensors' shapes (as mlx-lm infers them) when config.json's
        values do not fit.
        """
        name = self.weight_name(module)
        info = self.tensors[name]
        stem = name[: -len(".weight")]
        if f"{stem}.SCB" in self.tensors or any(
            f"{name}.{bnb_quant.QUANT_STATE}{t}" in self.tensors for t in ("nf4", "fp4")
        ):
            return self._bnb(stem, info)
        if f"{stem}.scales" not in self.tensors:
            if info.dtype not in _FLOAT_DTYPES:
                raise WeightReadError(
                    f"{self.model_dir} stores {name} as {info.dtype}: the weight check reads "
                    "float (F32/F16/BF16), MLX-quantized and bitsandbytes weights only"
                )
            return read_tensor(info).astype(np.float32), Storage("float", _FLOAT_DTYPES[info.dtype])
        return self._affine(stem, info, shape)

    def _affine(
        self, stem: str, info: TensorInfo, shape: tuple[int, ...] | None
    ) -> tuple[NDArray[np.float32], Storage]:
        scales_info, biases_info = (
            self.tensors[f"{stem}.scales"],
            self.tensors.get(f"{stem}.biases"),
        )
        params = self._quant_params(stem)
        mode = params.get("mode", "affine")
        if biases_info is None or scales_info.dtype not in _FLOAT_DTYPES or mode != "affine":
            if mode == "affine":
                mode = "mxfp4/mxfp8/nvfp4"  # no biases, or uint8 scales: a float mode
            raise WeightReadError(
                f"{self.model_dir} quantizes {stem} in MLX's {mode} mode; the weight check "
                "reads MLX's affine quantization only"
            )
        storage = _affine_storage(stem, info, scales_info, params, shape)
        w = affine_quant.dequantize(
            read_tensor(info),
            read_tensor(scales_info),
            read_tensor(biases_info),
            storage.group_size,
            storage.bits,
            storage.dtype,
        )
        return w, storage

    def _bnb(self, stem: str, info: TensorInfo) -> tuple[NDArray[np.float32], Storage]:
        """A bitsandbytes weight, dequantized by bitsandbytes (int8 rows or 4-bit blocks)."""
        name = f"{stem}.weight"
        try:
            if f"{stem}.SCB" in self.tensors:
                layout = self.tensors.get(f"{stem}.weight_format")
                if info.dtype != "I8":
                    raise ValueError(f"8-bit codes stored as {info.dtype}, not I8")
                if layout is not None and int(read_tensor(layout).reshape(-1)[0]) != 0:
                    raise ValueError("its weight_format is not row-major (0)")
                scales = read_tensor(self.tensors[f"{stem}.SCB"])
                w = bnb_quant.dequantize_int8(read_tensor(info), scales)
                return w, Storage("bnb", "float16", 8, 0, "int8")
            keys = [*bnb_quant.STATE_KEYS, *(bnb_quant.QUANT_STATE + t for t in ("nf4", "fp4"))]
            state = {
                k: read_tensor(self.tensors[f"{name}.{k}"])
                for k in keys
                if f"{name}.{k}" in self.tensors
            }
            w, fmt = bnb_quant.dequantize_4bit(read_bytes(info), state)
        except ImportError as e:
            raise WeightReadError(str(e)) from None
        except (ValueError, RuntimeError) as e:
            raise WeightReadError(
                f"{self.model_dir}: bitsandbytes cannot dequantize {name} ({e}); re-save it "
                "with transformers' save_pretrained"
            ) from None
        return w, Storage("bnb", fmt.dtype, 4, fmt.blocksize, fmt.qtype, fmt.nested)

    def _quant_params(self, stem: str) -> dict[str, Any]:
        own = self.quantization.get(stem)
        if isinstance(own, dict):
            return own
        return {
            k: self.quantization[k]
            for k in ("group_size", "bits", "mode")
            if k in self.quantization
        }


def _affine_storage(
    stem: str,
    info: TensorInfo,
    scales: TensorInfo,
    params: dict[str, Any],
    shape: tuple[int, ...] | None,
) -> Storage:
    """Bits and group size of one affine weight: config.json's, or inferred from shapes."""
    words, groups = info.shape[-1], scales.shape[-1]
    bits = int(params.get("bits", 4))
    cols = words * 32 // bits
    if shape is not None and (len(shape) != 2 or shape[0] != info.shape[0] or cols != shape[1]):
        cols = int(shape[-1])
        bits = words * 32 // cols if cols else 0
    group_size = cols // groups if groups else 0
    if (
        info.dtype != "U32"
        or bits not in affine_quant.BITS
        or not group_size
        or group_size * groups != cols
        or words * 32 != cols * bits
    ):
        raise WeightReadError(
            f"the quantized weight {stem} ({info.shape}, scales {scales.shape}) fits no "
            f"affine layout of {shape or 'its config'}; re-convert the export with mlx_lm"
        )
    return Storage("affine", _FLOAT_DTYPES[scales.dtype], bits, group_size)


def _read_config(model_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((model_dir / "config.json").read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as e:
        raise WeightReadError(f"cannot read {model_dir / 'config.json'}: {e}") from None
    return data if isinstance(data, dict) else {}
