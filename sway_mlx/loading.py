"""Loading an mlx-lm model for the MLX backend: dtype, memory, and the trunk/head split
that lets the LM head run only where a caller needs logits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from sway_common.models import HALF_PRECISION, parse_dtype

# What mx.device_info() calls the memory a GPU may use, most specific first.
_MEMORY_KEYS = ("max_recommended_working_set_size", "memory_size", "total_memory")


def pick_dtype(dtype: str, config: dict[str, Any]) -> str:
    """``auto``: float32 on CPU (half precision matmuls are far slower there), the
    model's own half precision on a GPU (Metal, CUDA)."""
    chosen = parse_dtype(dtype)
    if chosen != "auto":
        return chosen
    if mx.default_device().type != mx.DeviceType.gpu:
        return "float32"
    own = str(config.get("torch_dtype") or config.get("dtype") or "")
    return own if own in HALF_PRECISION else "bfloat16"


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
