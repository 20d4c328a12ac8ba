"""bitsandbytes' quantization, through bitsandbytes itself: read what transformers saved
with ``load_in_4bit`` / ``load_in_8bit`` and ``save_pretrained``, and redo it.

Nothing here reimplements a format: the values come from ``bitsandbytes.functional``
(``dequantize_4bit`` with the quant state saved beside the weight,
``int8_vectorwise_dequant`` with its row scales), and re-quantizing runs its own
``quantize_4bit`` / ``int8_vectorwise_quant`` the way its layers do (``Params4bit``
quantizes the weight in the model's dtype; ``Int8Params`` casts it to float16 first).
Both run on a CPU (bitsandbytes ≥ 0.50). torch and bitsandbytes are imported only when
a quantized weight is met, so the weight check still runs where only numpy is.

A 4-bit Linear's tensors, for ``<module>.weight``: the packed codes (two per byte, any
``bnb_4bit_quant_storage``), ``.absmax``, ``.quant_map``, with double quantization
``.nested_absmax`` and ``.nested_quant_map``, and ``.quant_state.bitsandbytes__nf4`` (or
``__fp4``): the rest of the state (block size, dtype, shape) as packed JSON. An 8-bit
one: ``<module>.weight`` (int8 codes, out × in), ``<module>.SCB`` (one scale per row)
and ``<module>.weight_format`` (0: row-major, the only layout saved since 0.45).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from types import ModuleType
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray

from sway_common.affine_quant import FloatName

QUANT_STATE = "quant_state.bitsandbytes__"
"""The prefix of a 4-bit weight's packed quant state (``nf4`` or ``fp4`` follows)."""
STATE_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
INSTALL = "pip install bitsandbytes (the hf extra installs it on Linux and Windows)"
MISSING = f"reading a bitsandbytes-quantized model needs bitsandbytes: {INSTALL}"


@dataclass(frozen=True)
class BnbFormat:
    """How bitsandbytes stored one weight: ``nf4``/``fp4`` in blocks, or ``int8`` rows."""

    qtype: str
    blocksize: int = 0
    nested: bool = False
    """4-bit: the block scales quantized again (``bnb_4bit_use_double_quant``)."""
    dtype: FloatName = "float16"
    """The float dtype the weight was quantized from (int8: always float16)."""


def available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _functional() -> tuple[ModuleType, ModuleType]:
    """(torch, bitsandbytes.functional); ImportError with the install line when missing."""
    if not available():
        raise ImportError(MISSING)
    import bitsandbytes.functional as bnbf
    import torch

    return torch, bnbf


def _numpy(t: Any) -> NDArray[np.float32]:
    return cast(NDArray[np.float32], t.float().cpu().numpy())


def dequantize_4bit(
    packed: NDArray[np.uint8], state: dict[str, NDArray[Any]]
) -> tuple[NDArray[np.float32], BnbFormat]:
    """A 4-bit weight's values (float32, out × in) and format, from its packed bytes and
    saved state (``STATE_KEYS`` and the ``QUANT_STATE`` entry, names without the
    ``<module>.weight.`` prefix). ValueError for a state bitsandbytes cannot read."""
    torch, bnbf = _functional()
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    try:
        qs = bnbf.QuantState.from_dict(tensors, device=torch.device("cpu"))
        codes = torch.from_numpy(np.ascontiguousarray(packed).reshape(-1, 1))
        values = bnbf.dequantize_4bit(codes, qs)
    except (AssertionError, KeyError, RuntimeError, ValueError) as e:
        raise ValueError(f"bitsandbytes cannot read its 4-bit state: {e}") from None
    dtype = str(qs.dtype).removeprefix("torch.")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"a 4-bit weight quantized from {dtype}")
    fmt = BnbFormat(qs.quant_type, int(qs.blocksize), bool(qs.nested), cast(FloatName, dtype))
    return _numpy(values).reshape(tuple(qs.shape)), fmt


def dequantize_int8(codes: NDArray[np.int8], scales: NDArray[np.float32]) -> NDArray[np.float32]:
    """An 8-bit (LLM.int8) weight's values: each row's codes times its scale / 127."""
    torch, bnbf = _functional()
    values = bnbf.int8_vectorwise_dequant(
        torch.from_numpy(np.ascontiguousarray(codes)),
        torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32)),
    )
    return _numpy(values)


def requantize(w: NDArray[np.floating], fmt: BnbFormat) -> NDArray[np.float32]:
    """What storing ``w`` (out × in) in ``fmt`` keeps of it: bitsandbytes' quantizer,
    then its dequantizer, as its layers quantize a float weight."""
    torch, bnbf = _functional()
    t = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    if fmt.qtype == "int8":
        codes, scales, _ = bnbf.int8_vectorwise_quant(t.to(torch.float16))
        return _numpy(bnbf.int8_vectorwise_dequant(codes, scales))
    packed, qs = bnbf.quantize_4bit(
        t.to(getattr(torch, fmt.dtype)),
        blocksize=fmt.blocksize,
        compress_statistics=fmt.nested,
        quant_type=fmt.qtype,
    )
    return _numpy(bnbf.dequantize_4bit(packed, qs))
