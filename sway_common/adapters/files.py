"""safetensors in and out for adapters, numpy only.

``safetensors.numpy`` cannot load bfloat16 (numpy has no such dtype), and half-precision
adapters are common, so reading parses the (simple, documented) file layout directly:
an 8-byte little-endian header length, a JSON header of ``{name: {dtype, shape,
data_offsets}}``, then the raw little-endian bytes. bfloat16 is widened to float32,
which is exact.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

_NUMPY_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}
_MAX_HEADER = 100 * 1024 * 1024


class AdapterFormatError(ValueError):
    """An adapter this tool cannot read, or cannot represent without losing something."""


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as numpy arrays (bf16 widened to float32)."""
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise AdapterFormatError(f"{path} is too short to be a safetensors file")
            (n,) = struct.unpack("<Q", raw_len)
            if n > _MAX_HEADER:
                raise AdapterFormatError(f"{path} has an implausible safetensors header size {n}")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"cannot read safetensors file {path}: {e}") from e
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if header else None
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        dtype, shape = info["dtype"], tuple(info["shape"])
        start, end = info["data_offsets"]
        buf = data[start:end] if data is not None else np.zeros(0, np.uint8)
        if dtype == "BF16":
            bits = np.frombuffer(buf.tobytes(), dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        elif dtype in _NUMPY_DTYPES:
            arr = np.frombuffer(buf.tobytes(), dtype=_NUMPY_DTYPES[dtype])
        else:
            raise AdapterFormatError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        out[name] = arr.reshape(shape).copy()
    return out


def save_safetensors(tensors: dict[str, np.ndarray], path: Path, fmt: str = "pt") -> None:
    """Write contiguous arrays; written to a temp name first so a crash leaves no half file."""
    from safetensors.numpy import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata={"format": fmt}
    )
    tmp.replace(path)
