"""Loading an mlx-lm model for the MLX backend: dtype, memory, the trunk/head split
that lets the LM head run only where a caller needs logits, and a SwiGLU for the CPU."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import activations

from sway_common.models import parse_dtype

# What mx.device_info() calls the memory a GPU may use, most specific first.
_MEMORY_KEYS = ("max_recommended_working_set_size", "memory_size", "total_memory")


def pick_dtype(dtype: str, config: dict[str, Any]) -> str:
    """``auto``: float32 on CPU (half precision matmuls are ~40× slower there), the
    model's own half precision on a GPU (Metal, CUDA)."""
    chosen = parse_dtype(dtype)
    if chosen != "auto":
        return chosen
    if mx.default_device().type != mx.DeviceType.gpu:
        return "float32"
    own = str(config.get("torch_dtype") or config.get("dtype") or "")
    return own if own in ("float16", "bfloat16") else "bfloat16"


def free_memory() -> int | None:
    """GPU memory (Metal, CUDA) not yet taken by this process; None on the CPU."""
    if mx.default_device().type != mx.DeviceType.gpu:
        return None
    info = mx.device_info()
    total = next((info.get(k) for k in _MEMORY_KEYS if info.get(k)), None)
    return max(0, int(total) - int(mx.get_active_memory())) if total else None


def split_forward(
    model: nn.Module,
) -> tuple[Callable[[mx.array], mx.array], Callable[[mx.array], mx.array]]:
    """(trunk, head) so the LM head runs only at the positions a caller needs.

    Works for mlx-lm models shaped ``Model.model`` + ``lm_head`` or tied embeddings.
    A short forward checks the split against the full model; architectures that do
    more after the trunk (logit soft-capping, scaling) fall back to full logits.
    """

    def head(h: mx.array) -> mx.array:
        # Looked up per call: an adapter may wrap lm_head after this was built.
        if "lm_head" in model:
            return model.lm_head(h)
        return model.model.embed_tokens.as_linear(h)

    def full(ids: mx.array) -> mx.array:
        return model(ids)

    inner = model.get("model") if isinstance(model, nn.Module) else None
    has_head = "lm_head" in model or (
        inner is not None and hasattr(inner.get("embed_tokens"), "as_linear")
    )
    if inner is None or not has_head:
        return full, lambda logits: logits
    probe = mx.array([[1, 2, 3, 4]])
    try:
        split, reference = head(inner(probe)), model(probe)
        same = split.shape == reference.shape and bool(
            mx.allclose(split, reference, rtol=1e-4, atol=1e-4)
        )
    except (TypeError, AttributeError, ValueError, IndexError):
        same = False
    if not same:
        return full, lambda logits: logits
    return (lambda ids: model.model(ids)), head


# ------------------------------------------------------------------ CPU SwiGLU
# Cody-Waite split of ln 2: n·_LN2_HI is exact in float32 for the n an exp can take.
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4


@partial(mx.compile, shapeless=True)
def _exp_parts(x: mx.array) -> tuple[mx.array, mx.array]:
    """``(e**r, bits of 2**n)`` with ``exp(x) = e**r · 2**n``, ``|r| <= ln2/2``, ``e**r``
    by its Taylor series to ``r**7`` (truncation < 1e-8 relative): multiplies and adds."""
    x = mx.clip(x.astype(mx.float32), -87.0, 88.0)
    n = mx.floor(x * (1 / math.log(2)) + 0.5)
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = 1 + r * (
        1 + r * (1 / 2 + r * (1 / 6 + r * (1 / 24 + r * (1 / 120 + r * (1 / 720 + r / 5040)))))
    )
    # 2**n as a float32's exponent bits; clipped as integers (NaN has no integer value).
    return p, mx.left_shift(mx.clip(n.astype(mx.int32) + 127, 0, 255), 23)


def _sigmoid(x: mx.array) -> mx.array:
    # The bits are read as float32 outside mx.compile: a shapeless graph cannot hold a view.
    p, bits = _exp_parts(-x)
    return 1 / (1 + p * bits.view(mx.float32))


@partial(mx.compile, shapeless=True)
def _swiglu_from(gate: mx.array, x: mx.array, p: mx.array, two_n: mx.array) -> mx.array:
    g = gate.astype(mx.float32)
    return (g * x.astype(mx.float32) / (1 + p * two_n)).astype(x.dtype)


@mx.custom_function
def cpu_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """mlx-lm's ``swiglu`` (``silu(gate) · x``) to float32 rounding, for the CPU."""
    p, bits = _exp_parts(-gate)
    return _swiglu_from(gate, x, p, bits.view(mx.float32))


@cpu_swiglu.vjp
def _cpu_swiglu_vjp(
    primals: tuple[mx.array, mx.array], cotangent: mx.array, output: mx.array
) -> tuple[mx.array, mx.array]:
    # The exponent bits have no derivative; silu's is written out.
    gate, x = primals
    s = _sigmoid(gate).astype(gate.dtype)
    return cotangent * x * s * (1 + gate * (1 - s)), cotangent * gate * s


def use_cpu_swiglu(model: nn.Module) -> bool:
    """On the CPU, run the SwiGLU of ``model``'s architecture with :func:`cpu_swiglu`.

    MLX's CPU ``exp`` (behind ``sigmoid`` and ``silu``) took 28 times a multiply on
    this project's 2-core box: one SmolLM2 MLP activation of 32 × 15 tokens took
    12–13 ms with it and 3.4–3.8 ms with :func:`cpu_swiglu` (fused by ``mx.compile``),
    and the whole forward of those rows went from 948 to 790 ms. The architecture's
    module (``mlx_lm.models.llama`` and the others that import mlx-lm's ``swiglu``) gets it
    for the process; returns whether it did.
    """
    if mx.default_device().type != mx.DeviceType.cpu:
        return False
    module = sys.modules.get(type(model).__module__)
    if module is None or getattr(module, "swiglu", None) not in (activations.swiglu, cpu_swiglu):
        return False
    module.swiglu = cpu_swiglu
    return True
