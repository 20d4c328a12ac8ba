"""MLX's affine quantization, in numpy: read what ``mlx_lm convert -q`` wrote, and redo it.

A quantized Linear is three tensors: ``weight`` (uint32, the codes packed), ``scales``
and ``biases`` (one per group of ``group_size`` consecutive inputs of a row, in the
model's float dtype). A weight is ``w = scales · q + biases`` with ``q`` in
``[0, 2^bits − 1]``. Codes are packed as one little-endian bit stream per row: for 4
bits the first code sits in the 4 lowest bits of the first uint32; for 3, 5 or 6 bits
codes straddle words (mlx does the same; ``tests/test_weight_reader.py`` checks both
directions against ``mx.quantize`` / ``mx.dequantize`` at several widths).

:func:`quantize` follows mlx's own recipe (``mlx/ops.cpp`` ``affine_quantize``), in
float32: per group the extreme of larger magnitude becomes the bias (so it is exactly
representable), the scale is ``(max − min) / (2^bits − 1)`` with its sign pointing
inwards and nudged so that 0.0 is representable too; the codes are computed with the
float32 scales, which are then rounded to the weight's dtype for storage.

numpy only: no mlx import, so the weight check runs wherever numpy does.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import NDArray

FloatName = Literal["float32", "float16", "bfloat16"]

BITS = (1, 2, 3, 4, 5, 6, 8)
_EPS = 1e-7


def round_to(x: NDArray[np.floating], dtype: FloatName) -> NDArray[np.float32]:
    """``x`` rounded to ``dtype`` (to nearest, ties to even) and widened back to float32."""
    x32 = np.asarray(x, dtype=np.float32)
    if dtype == "float32":
        return x32
    if dtype == "float16":
        return x32.astype(np.float16).astype(np.float32)
    bits = np.ascontiguousarray(x32).view(np.uint32).astype(np.uint64)
    rounded = (bits + np.uint64(0x7FFF) + ((bits >> np.uint64(16)) & np.uint64(1))) & np.uint64(
        0xFFFF0000
    )
    return rounded.astype(np.uint32).view(np.float32).reshape(x32.shape)


def unpack(packed: NDArray[np.uint32], bits: int) -> NDArray[np.uint8]:
    """The codes of a packed (rows, words) uint32 array: (rows, words · 32 / bits)."""
    if bits not in BITS:
        raise ValueError(f"affine quantization has 1-6 or 8 bits, not {bits}")
    words = np.ascontiguousarray(packed, dtype="<u4")
    rows = words.shape[0]
    stream = np.unpackbits(words.view(np.uint8).reshape(rows, -1), axis=1, bitorder="little")
    cols = stream.shape[1] // bits
    per_code = stream[:, : cols * bits].reshape(rows, cols, bits)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (per_code.astype(np.uint16) @ weights).astype(np.uint8)


def pack(codes: NDArray[np.integer], bits: int) -> NDArray[np.uint32]:
    """Inverse of :func:`unpack`: (rows, cols) codes → (rows, cols · bits / 32) uint32."""
    codes = np.asarray(codes)
    rows, cols = codes.shape
    if (cols * bits) % 32:
        raise ValueError(f"{cols} codes of {bits} bits do not fill whole 32-bit words")
    shifts = np.arange(bits, dtype=np.uint8)
    stream = ((codes[..., None].astype(np.uint8) >> shifts) & 1).reshape(rows, cols * bits)
    raw = np.packbits(stream, axis=1, bitorder="little")
    return np.ascontiguousarray(raw).view("<u4").astype(np.uint32)


def dequantize(
    packed: NDArray[np.uint32],
    scales: NDArray[np.floating],
    biases: NDArray[np.floating],
    group_size: int,
    bits: int,
    dtype: FloatName = "float32",
) -> NDArray[np.float32]:
    """``scales · q + biases`` per group, computed as mlx does in ``dtype`` (the scales'
    dtype: each product and sum rounded to it), returned as float32."""
    codes = unpack(packed, bits)
    rows, cols = codes.shape
    if cols != scales.shape[-1] * group_size or scales.shape != biases.shape:
        raise ValueError(
            f"packed codes ({rows}, {cols}) do not match scales {scales.shape} at group "
            f"size {group_size}"
        )
    groups = codes.reshape(rows, -1, group_size).astype(np.float32)
    s = np.asarray(scales, dtype=np.float32)[..., None]
    b = np.asarray(biases, dtype=np.float32)[..., None]
    return _affine(groups, s, b, dtype).reshape(rows, cols)


def _affine(
    codes: NDArray[np.float32],
    scales: NDArray[np.float32],
    biases: NDArray[np.float32],
    dtype: FloatName,
) -> NDArray[np.float32]:
    """``scales · codes + biases`` with every step rounded to ``dtype``, as mlx computes it."""
    return round_to(round_to(codes * scales, dtype) + biases, dtype)


def _quantize_groups(
    w: NDArray[np.floating], group_size: int, bits: int, dtype: FloatName
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
    """(codes as float32, stored scales, stored biases), groups on the last axis."""
    if bits not in BITS:
        raise ValueError(f"affine quantization has 1-6 or 8 bits, not {bits}")
    w32 = np.asarray(w, dtype=np.float32)
    rows, cols = w32.shape
    if cols % group_size:
        raise ValueError(f"{cols} inputs do not split into groups of {group_size}")
    n_bins = np.float32((1 << bits) - 1)
    g = w32.reshape(rows, cols // group_size, group_size)
    w_max, w_min = g.max(axis=-1, keepdims=True), g.min(axis=-1, keepdims=True)
    mask = np.abs(w_min) > np.abs(w_max)
    scales = np.maximum((w_max - w_min) / n_bins, np.float32(_EPS))
    scales = np.where(mask, scales, -scales)
    edge = np.where(mask, w_min, w_max)
    q0 = np.rint(edge / scales)
    with np.errstate(divide="ignore", invalid="ignore"):
        scales = np.where(q0 != 0, edge / np.where(q0 == 0, 1, q0), scales).astype(np.float32)
    biases = np.where(q0 == 0, np.float32(0), edge).astype(np.float32)
    codes = np.clip(np.rint((g - biases) / scales), 0, n_bins)
    return codes, round_to(scales, dtype), round_to(biases, dtype)


def quantize(
    w: NDArray[np.floating], group_size: int, bits: int, dtype: FloatName = "float32"
) -> tuple[NDArray[np.uint32], NDArray[np.float32], NDArray[np.float32]]:
    """(packed codes, scales, biases) as ``mx.quantize`` gives them for ``w`` in ``dtype``."""
    codes, scales, biases = _quantize_groups(w, group_size, bits, dtype)
    rows = codes.shape[0]
    return pack(codes.reshape(rows, -1).astype(np.uint8), bits), scales[..., 0], biases[..., 0]


def requantize(
    w: NDArray[np.floating], group_size: int, bits: int, dtype: FloatName = "float32"
) -> NDArray[np.float32]:
    """``dequantize(quantize(w))`` without packing: what an export stored for ``w``."""
    codes, scales, biases = _quantize_groups(w, group_size, bits, dtype)
    return _affine(codes, scales, biases, dtype).reshape(np.shape(w))
