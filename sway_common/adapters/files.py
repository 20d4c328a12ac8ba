"""safetensors in and out for adapters, numpy only (torch only for a pickle the user allowed).

``safetensors.numpy`` cannot load bfloat16 (numpy has no such dtype), and half-precision
adapters are common, so reading parses the (simple, documented) file layout directly:
an 8-byte little-endian header length, a JSON header of ``{name: {dtype, shape,
data_offsets}}``, then the raw little-endian bytes. bfloat16 is widened to float32,
which is exact.
"""

from __future__ import annotations

import json
import math
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
    """All tensors of a .safetensors file as numpy arrays (bf16 widened to float32).

    A truncated or corrupt file raises :class:`AdapterFormatError`, never a numpy error.
    """
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise AdapterFormatError(f"{path} is too short to be a safetensors file")
            (n,) = struct.unpack("<Q", raw_len)
            if n > _MAX_HEADER:
                raise AdapterFormatError(
                    f"{path} is not a safetensors file (header size {n}); it is corrupt: "
                    "re-save or re-download the adapter"
                )
            header = json.loads(f.read(n))
        size = path.stat().st_size - 8 - n
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"cannot read safetensors file {path}: {e}") from e
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path} is not a safetensors file (its header is not a mapping)")
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if header and size > 0 else None
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        dtype, shape, (start, end) = _entry(path, name, info, size)
        buf = data[start:end] if data is not None else np.zeros(0, np.uint8)
        if dtype == "BF16":
            bits = np.frombuffer(buf.tobytes(), dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        else:
            arr = np.frombuffer(buf.tobytes(), dtype=_NUMPY_DTYPES[dtype])
        out[name] = arr.reshape(shape).copy()
    return out


def _entry(
    path: Path, name: str, info: object, size: int
) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """(dtype, shape, byte range) of one header entry, checked against the file's length.

    A file cut short (a half-copied download, an interrupted save) fails here with its
    name, rather than deep inside numpy.
    """
    bad = f"{path} is corrupt or truncated (tensor {name!r}); re-save or re-download the adapter"
    if not isinstance(info, dict):
        raise AdapterFormatError(bad)
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _NUMPY_DTYPES and dtype != "BF16":
        raise AdapterFormatError(f"{path}: tensor {name} has unsupported dtype {dtype}")
    if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2):
        raise AdapterFormatError(bad)
    if not all(type(v) is int and v >= 0 for v in [*shape, *offsets]):
        raise AdapterFormatError(bad)
    start, end = offsets
    width = 2 if dtype == "BF16" else np.dtype(_NUMPY_DTYPES[dtype]).itemsize
    if not start <= end <= size or end - start != width * math.prod(shape):
        raise AdapterFormatError(bad)
    return dtype, tuple(shape), (start, end)


def load_pickled(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a pickled torch file (``adapter_model.bin``), read only when the user asked.

    Even then torch's ``weights_only`` loader is used: it refuses pickles that would run
    code, so ``--allow-pickle`` admits old files, not arbitrary objects.
    """
    try:
        import torch
    except ImportError:
        raise AdapterFormatError(
            f"{path} is a pickled torch file and reading it needs torch: pip install "
            "'sway-mlx[hf]', or re-save the adapter with safetensors"
        ) from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad pickle; all mean "unreadable"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AdapterFormatError(f"cannot read the pickled file {path}: {first}") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise AdapterFormatError(f"{path} does not hold a mapping of tensors")
    return {str(k): t.detach().to(torch.float32).numpy() for k, t in state.items()}


def save_safetensors(tensors: dict[str, np.ndarray], path: Path, fmt: str = "pt") -> None:
    """Write contiguous arrays; written to a temp name first so a crash leaves no half file."""
    from safetensors.numpy import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata={"format": fmt}
    )
    tmp.replace(path)
