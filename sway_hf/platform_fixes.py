"""A lean forward for PEFT's plain LoRA Linear; ``SWAY_MLX_NO_FAST_PATHS=1`` turns it off.

PEFT's forward calls four sub-modules and four kernels per layer (base, A, B, the
scaling, the add): on a small model, Python and kernel launches rather than the
arithmetic. The lean forward reads the same live state (the adapter switch,
``scaling``, ``lora_A``/``lora_B``), so every view the backend installs still applies,
and does the same arithmetic in three kernels: the base product, ``x·Aᵀ``, and one
``addmm`` adding ``scaling·(x·Aᵀ)·Bᵀ`` in the adapter's dtype, as PEFT adds it.
Anything it does not reproduce (DoRA and PEFT's other variants, a LoRA bias, another
base layer type, hooks; per call: dropout while training, merged weights, extra
arguments) runs PEFT's forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

from sway_common.fast_paths import fast_paths_enabled

LoraForward = Callable[..., torch.Tensor]


def weight_of(module: torch.nn.Module) -> torch.nn.Parameter:
    """``module.weight``, which torch types ``Tensor | Module``: on the adapter layers
    PEFT builds (``lora_A``/``lora_B``, DoRA's magnitude) it is always a Parameter."""
    weight = module.weight
    assert isinstance(weight, torch.nn.Parameter)
    return weight


def supported(layer: LoraLayer, adapter: str) -> bool:
    """Whether the lean forward gives PEFT's numbers for ``adapter`` on ``layer``."""
    base = layer.get_base_layer()
    plain = type(base) is torch.nn.Linear and not getattr(layer, "fan_in_fan_out", False)
    hooked = base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook")
    dora = adapter in layer.lora_magnitude_vector
    variant = adapter in getattr(layer, "lora_variant", {})  # DoRA and PEFT's other variants
    lora_bias = layer.lora_B[adapter].bias is not None
    return plain and not (hooked or dora or variant or lora_bias)


def lean_forward(layer: LoraLayer, adapter: str) -> LoraForward | None:
    """``layer``'s lean forward for ``adapter``; None where it is not :func:`supported`."""
    if not supported(layer, adapter):
        return None
    # PEFT's LoRA layers are modules too (lora.Linear is an nn.Module and a LoraLayer),
    # and supported() checked that the base layer is a plain nn.Linear.
    assert isinstance(layer, torch.nn.Module)
    base = layer.get_base_layer()
    assert isinstance(base, torch.nn.Linear)
    # The live parameters: a null view points their .data at its own tensors.
    a, b = weight_of(layer.lora_A[adapter]), weight_of(layer.lora_B[adapter])
    peft_forward = type(layer).forward.__get__(layer)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or layer.training or layer.merged or adapter not in layer.lora_A:
            return peft_forward(x, *args, **kwargs)
        out = F.linear(x, base.weight, base.bias)
        if layer.disable_adapters:
            return out
        h = F.linear(x.to(a.dtype), a).reshape(-1, a.shape[0])
        summed = torch.addmm(
            out.reshape(-1, out.shape[-1]).to(b.dtype), h, b.t(), alpha=layer.scaling[adapter]
        )
        return summed.view(out.shape).to(out.dtype)

    return forward


def install(layer: LoraLayer, adapter: str) -> LoraForward | None:
    """Make ``layer`` run its lean forward; returns it, or None where PEFT's runs
    (not :func:`supported`, or fast paths off)."""
    if not fast_paths_enabled():
        return None
    lean = lean_forward(layer, adapter)
    if lean is not None:
        assert isinstance(layer, torch.nn.Module)  # as lean_forward checked
        layer.forward = lean  # an instance attribute: nn.Module.__call__ calls it
    return lean


def uninstall(layer: LoraLayer, lean: LoraForward | None) -> None:
    """Give ``layer`` PEFT's forward back, unless another lean forward replaced ``lean``."""
    if lean is not None and layer.__dict__.get("forward") is lean:
        assert isinstance(layer, torch.nn.Module)  # install put it there
        del layer.forward
