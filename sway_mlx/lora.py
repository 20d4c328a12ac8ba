"""View mechanics on one MLX model: LoRA layers swapped, scaled or refilled in place.

Each targeted ``nn.Linear`` is wrapped once with mlx-lm's ``LoRALinear`` (or
``DoRALinear``) and recorded in a :class:`LoraSlot` together with the trained arrays.
A view installs something else (the plain base module, a scaled ``scale``, random
factors) and :func:`install_real` puts the trained state back. MLX arrays are
immutable references, so "snapshot" means keeping the old array objects: restoring
them is free and exact.

The resting state of the model is the fine-tuned one (LoRA layers, trained arrays).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from sway_common.protocols import NullMode

_WRAPPABLE = (nn.Linear, nn.QuantizedLinear)


@dataclass(eq=False)
class LoraSlot:
    """One adapted module: where it sits, its plain base module and its trained arrays.

    Factors use mlx-lm's layout: ``a`` is ``(in, r)``, ``b`` is ``(r, out)``, so the
    module computes ``base(x) + scale · (x @ a) @ b``.
    """

    path: str
    parent: Any
    """The module (or list) holding the adapted module under ``key``."""
    key: str | int
    base: nn.Module
    layer: nn.Module
    a: mx.array
    b: mx.array
    scale: mx.array
    """0-d float32 array, not a Python float: an ``mx.compile``'d forward then reads the
    current value instead of a constant baked in at trace time."""
    magnitude: mx.array | None
    """DoRA's trained per-row magnitude; ``None`` for plain LoRA."""
    init_magnitude: mx.array | None
    """DoRA only: the base weight's row norms, i.e. the magnitude of an untrained adapter."""
    norm: float
    """Frobenius norm of the trained ``ΔW = scale · B·A``."""

    @property
    def dora(self) -> bool:
        return self.magnitude is not None

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])


def resolve(model: nn.Module, path: str) -> tuple[Any, str | int, Any]:
    """Walk a dotted module path (list items by index); return (parent, key, module)."""
    parent: Any = None
    key: str | int = ""
    node: Any = model
    for part in path.split("."):
        parent = node
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise KeyError(path)
            key = int(part)
            node = node[key]
        elif isinstance(node, dict) and part in node:
            key = part
            node = node[part]
        else:
            raise KeyError(path)
    return parent, key, node


def _put(parent: Any, key: str | int, module: nn.Module) -> None:
    if isinstance(parent, list):
        parent[key] = module
    else:
        setattr(parent, key, module)


def delta_norm(a: mx.array, b: mx.array, scale: mx.array | float) -> float:
    """``‖scale · B·A‖_F`` through the two r×r Gram matrices, never forming the full ΔW."""
    a32, b32 = a.astype(mx.float32), b.astype(mx.float32)
    squared = mx.sum((a32.T @ a32) * (b32 @ b32.T))
    return float(mx.sqrt(mx.maximum(squared, 0.0)) * mx.abs(mx.array(scale, mx.float32)))


def attach(model: nn.Module, modules: dict[str, Any]) -> list[LoraSlot]:
    """Wrap every module named in ``modules`` (path -> LoraModule) with a LoRA/DoRA layer.

    Wrapping goes by module path rather than mlx-lm's "last N layers" rule, so adapters
    on any layer subset and with per-module ranks load as they were trained. The trained
    arrays are installed; the model is left in the fine-tuned state.
    """
    slots: list[LoraSlot] = []
    try:
        for path in sorted(modules):
            slots.append(_wrap(model, path, modules[path]))
    except Exception:
        detach(slots)
        raise
    return slots


def _wrap(model: nn.Module, path: str, module: Any) -> LoraSlot:
    try:
        parent, key, base = resolve(model, path)
    except KeyError:
        raise ValueError(
            f"adapter targets {path!r}, which this model does not have "
            "(was the adapter trained on another base model?)"
        ) from None
    if not isinstance(base, _WRAPPABLE):
        raise ValueError(
            f"adapter targets {path!r}, a {type(base).__name__}; only Linear layers are supported"
        )
    a = mx.array(module.a, dtype=mx.float32).T  # (r, in) -> (in, r)
    b = mx.array(module.b, dtype=mx.float32).T  # (out, r) -> (r, out)
    rank = int(a.shape[1])
    cls = DoRALinear if module.magnitude is not None else LoRALinear
    layer = cls.from_base(base, r=rank, dropout=0.0, scale=float(module.scale))
    if tuple(layer.lora_a.shape) != tuple(a.shape) or tuple(layer.lora_b.shape) != tuple(b.shape):
        raise ValueError(
            f"adapter factors for {path!r} have shapes A{tuple(module.a.shape)} "
            f"B{tuple(module.b.shape)}, which do not fit a layer of weight "
            f"{tuple(base.weight.shape)}"
        )
    scale = mx.array(float(module.scale), dtype=mx.float32)
    magnitude = None
    init_magnitude = None
    if module.magnitude is not None:
        magnitude = mx.array(module.magnitude, dtype=mx.float32).reshape(-1)
        init_magnitude = layer.m
    slot = LoraSlot(
        path=path,
        parent=parent,
        key=key,
        base=base,
        layer=layer,
        a=a,
        b=b,
        scale=scale,
        magnitude=magnitude,
        init_magnitude=init_magnitude,
        norm=delta_norm(a, b, scale),
    )
    _fill(slot, a, b, scale, magnitude)
    _put(parent, key, layer)
    return slot


def _fill(
    slot: LoraSlot, a: mx.array, b: mx.array, scale: mx.array, magnitude: mx.array | None
) -> None:
    slot.layer.lora_a = a
    slot.layer.lora_b = b
    slot.layer.scale = scale
    if slot.dora:
        slot.layer.m = magnitude


def detach(slots: Sequence[LoraSlot]) -> None:
    """Put the plain base modules back for good (before loading another adapter)."""
    for slot in slots:
        _put(slot.parent, slot.key, slot.base)


def install_real(slots: Sequence[LoraSlot]) -> None:
    """The fine-tuned state: LoRA layers in place, holding the trained arrays."""
    for slot in slots:
        _fill(slot, slot.a, slot.b, slot.scale, slot.magnitude)
        _put(slot.parent, slot.key, slot.layer)


def install_base(slots: Sequence[LoraSlot]) -> None:
    """The base model, by swapping modules: for DoRA a zero scale is not the base model
    (the magnitude still rescales every row), and swapping also skips the LoRA matmuls."""
    detach(slots)


def install_scaled(slots: Sequence[LoraSlot], lam: float) -> None:
    """Scale each adapter's change by ``lam``: 0 is the base model, 1 the fine-tune.

    LoRA: ``scale · lam``. DoRA: the same on the low-rank term, and the magnitude moves
    from the base row norms towards the trained ones by the same ``lam``, so that
    ``lam = 0`` really is the base model for DoRA too.
    """
    lam_arr = mx.array(float(lam), dtype=mx.float32)
    for slot in slots:
        magnitude = None
        if slot.dora:
            magnitude = slot.init_magnitude + lam_arr * (slot.magnitude - slot.init_magnitude)
        _fill(slot, slot.a, slot.b, slot.scale * lam_arr, magnitude)
        _put(slot.parent, slot.key, slot.layer)


def null_factors(
    slots: Sequence[LoraSlot],
    seed: int,
    *,
    init_scale: float,
    rank_scale: float,
    mode: NullMode,
) -> list[tuple[mx.array, mx.array]]:
    """Seeded Gaussian ``(a, b)`` per slot, in slot (sorted path) order.

    One key per module comes from splitting ``mx.random.key(seed)``, so a draw does not
    depend on process state or Python's salted ``hash()``. A has std ``init_scale``, B
    has std ``init_scale · sqrt(rank_scale)``: only one factor grows, so the variance of
    ``ΔW = B·A`` is linear in ``rank_scale`` (a null of rank ``r · rank_scale``).
    ``norm_matched`` then rescales B so each module's ``‖ΔW‖_F`` equals the trained one.
    """
    if not rank_scale > 0:
        raise ValueError(f"rank_scale must be > 0, got {rank_scale}")
    if not slots:
        return []
    root = mx.random.key(int(seed) % (1 << 64))
    keys = mx.random.split(root, len(slots))
    b_std = init_scale * math.sqrt(rank_scale)
    out: list[tuple[mx.array, mx.array]] = []
    for i, slot in enumerate(slots):
        key_a, key_b = mx.random.split(keys[i])
        a = init_scale * mx.random.normal(slot.a.shape, dtype=mx.float32, key=key_a)
        b = b_std * mx.random.normal(slot.b.shape, dtype=mx.float32, key=key_b)
        if mode == "norm_matched":
            drawn = delta_norm(a, b, slot.scale)
            b = b * (slot.norm / drawn if drawn > 0 else 0.0)
        out.append((a, b))
    mx.eval(out)
    return out


def install_null(
    slots: Sequence[LoraSlot],
    seed: int,
    *,
    init_scale: float,
    rank_scale: float,
    mode: NullMode,
) -> None:
    """A random adapter of the trained one's structure (rank, scale, targets).

    Factors are all drawn before any is installed, so a failing draw leaves the model
    untouched. A DoRA null starts from the base row norms, as an untrained DoRA adapter
    does, so the trained magnitude cannot leak into the null.
    """
    factors = null_factors(slots, seed, init_scale=init_scale, rank_scale=rank_scale, mode=mode)
    for slot, (a, b) in zip(slots, factors, strict=True):
        _fill(slot, a, b, slot.scale, slot.init_magnitude)
        _put(slot.parent, slot.key, slot.layer)


def nonfinite(slots: Sequence[LoraSlot]) -> list[str]:
    """Names of trained adapter tensors holding NaN or Inf."""
    bad: list[str] = []
    for slot in slots:
        tensors = {"lora_a": slot.a, "lora_b": slot.b, "scale": slot.scale}
        if slot.magnitude is not None:
            tensors["m"] = slot.magnitude
        for name, value in tensors.items():
            if not bool(mx.all(mx.isfinite(value))):
                bad.append(f"{slot.path}.{name}")
    return bad
