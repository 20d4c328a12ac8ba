"""View mechanics on one MLX model: LoRA layers attached, swapped, scaled or refilled.

Same functions, same signatures as ``sway_hf/lora.py``; which one runs for which view
is decided once, in :meth:`sway_common.backend.switch.ViewSwitch._install`.

Each targeted ``nn.Linear`` is wrapped once with a :class:`ViewLoRALinear` (DoRA:
mlx-lm's ``DoRALinear``) and recorded in a :class:`LoraSlot` with the trained arrays:
the model's resting, fine-tuned state. Each ``install_*`` function changes it in place
and returns the function that undoes it; if it raises, the model is left fine-tuned.
MLX arrays are immutable references, so undoing puts the very same arrays back.
Stacked views live in :mod:`sway_mlx.stacked`.

Factors use mlx-lm's layout: ``lora_a`` is ``(in, r)``, ``lora_b`` ``(r, out)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from sway_common.adapters.weights import AdapterWeights, LoraModule
from sway_common.backend.limits import misfit, missing_module
from sway_common.backend.nulls import NullFactors, PlacedFactors, PlacedNull
from sway_common.backend.views import Restore, guarded

_WRAPPABLE = (nn.Linear, nn.QuantizedLinear)


@dataclass(eq=False)
class LoraSlot:
    """One adapted module: where it sits, its plain base module and its trained arrays."""

    path: str
    parent: Any
    """The module (or list) holding the adapted module under ``key``."""
    key: str | int
    base: nn.Module
    layer: nn.Module
    a: mx.array
    b: mx.array
    scale: mx.array
    """0-d float32 array: scaled views multiply it without leaving MLX."""
    folded: tuple[mx.array, mx.array] | None
    """LoRA only: the trained factors as :class:`ViewLoRALinear` computes with them."""
    magnitude: mx.array | None
    """DoRA's trained per-row magnitude; ``None`` for plain LoRA."""
    init_magnitude: mx.array | None
    """DoRA only: the base weight's row norms, i.e. the magnitude of an untrained adapter."""

    @property
    def dora(self) -> bool:
        return self.magnitude is not None

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])


# ------------------------------------------------------------------ attaching
def attach(model: nn.Module, weights: AdapterWeights) -> list[LoraSlot]:
    """Wrap every module of ``weights`` with a LoRA/DoRA layer holding the trained arrays.

    Wrapping goes by module path rather than mlx-lm's "last N layers" rule, so adapters
    on any layer subset and with per-module ranks load as they were trained. On failure
    nothing stays wrapped.
    """
    check_fits(model, weights)
    slots: list[LoraSlot] = []
    try:
        for path in sorted(weights.modules):
            slots.append(_wrap(model, path, weights.modules[path]))
    except Exception:
        detach(model, slots)
        raise
    return slots


def detach(model: nn.Module, slots: Sequence[LoraSlot]) -> None:
    """Take the adapter out for good: the plain base modules go back where it sat."""
    for slot in slots:
        parent, key, node = _resolve(model, slot.path)
        # Only a slot's own layer is replaced: detaching twice is harmless.
        if node is slot.layer:
            _put(parent, key, slot.base)


def _resolve(model: nn.Module, path: str) -> tuple[Any, str | int, Any]:
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
    # _resolve gives list items an int key and attributes a str one.
    if isinstance(parent, list):
        assert isinstance(key, int)
        parent[key] = module
    else:
        assert isinstance(key, str)
        setattr(parent, key, module)


def check_fits(model: nn.Module, weights: AdapterWeights) -> None:
    """Raise one clear ValueError if an adapter module has no layer here, or the wrong shape.

    Checked for every module before anything is wrapped: an adapter of another base
    model is named as such, with the module and both shapes.
    """
    for path, module in sorted(weights.modules.items()):
        _fitting_base(model, path, module)


def _fitting_base(model: nn.Module, path: str, module: LoraModule) -> tuple[Any, str | int, Any]:
    try:
        parent, key, base = _resolve(model, path)
    except KeyError:
        raise ValueError(missing_module(path)) from None
    # A layer wrapped for the adapter being replaced is checked by the Linear inside it.
    inner = base.linear if isinstance(base, LoRALinear | DoRALinear | ViewLoRALinear) else base
    if not isinstance(inner, _WRAPPABLE):
        raise ValueError(
            f"adapter targets {path!r}, a {type(base).__name__}; only Linear layers are supported"
        )
    out_dims, in_dims = inner.weight.shape
    if isinstance(inner, nn.QuantizedLinear):  # packed: 32 // bits values per uint32
        in_dims = in_dims * 32 // inner.bits
    problem = misfit(path, module.a.shape, module.b.shape, (out_dims, in_dims))
    if problem:
        raise ValueError(problem)
    return parent, key, base


def _wrap(model: nn.Module, path: str, module: LoraModule) -> LoraSlot:
    parent, key, base = _fitting_base(model, path, module)
    if not isinstance(base, _WRAPPABLE):  # detach() takes ours out first: this is foreign
        raise ValueError(f"adapter targets {path!r}, which already carries a LoRA layer")
    a = mx.array(module.a, dtype=mx.float32).T  # (r, in) -> (in, r)
    b = mx.array(module.b, dtype=mx.float32).T  # (out, r) -> (r, out)
    scale = mx.array(float(module.scale), dtype=mx.float32)
    magnitude = init_magnitude = folded = None
    if module.magnitude is not None:
        # from_base is annotated for nn.Linear but reads QuantizedLinear's packing too.
        layer: nn.Module = DoRALinear.from_base(cast(nn.Linear, base), r=module.rank, dropout=0.0)
        magnitude = mx.array(module.magnitude, dtype=mx.float32).reshape(-1)
        init_magnitude = layer.m
    else:
        layer = ViewLoRALinear(base)
        folded = _fold(base, a, b, scale)
        mx.eval(folded)
    slot = LoraSlot(
        path=path,
        parent=parent,
        key=key,
        base=base,
        layer=layer,
        a=a,
        b=b,
        scale=scale,
        folded=folded,
        magnitude=magnitude,
        init_magnitude=init_magnitude,
    )
    _fill(slot, a, b, scale, magnitude, folded)
    _put(parent, key, layer)
    return slot


# ---------------------------------------------------------------------- views
class ViewLoRALinear(nn.Module):
    """mlx-lm's ``LoRALinear`` sum, ``linear(x) + scale·(x A) B``, in three kernels.

    mlx-lm adds its float32 factors' product through separate scale, cast and add
    passes over the output. On MLX-CUDA each pass is a kernel launch, and a rank-8
    adapter on q and v doubled SmolLM2's forward. Here the factors are folded once per
    view (:func:`_fold`) and ``addmm`` adds their product to the base output in one
    kernel. ``lora_a``, ``lora_b`` and ``scale`` keep the float32 arrays the view set.
    """

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear

    def fill(
        self, a: mx.array, b: mx.array, scale: mx.array, folded: tuple[mx.array, mx.array]
    ) -> None:
        self.lora_a, self.lora_b, self.scale = a, b, scale
        self.down, self.up = folded

    def __call__(self, x: mx.array) -> mx.array:
        return mx.addmm(self.linear(x), x @ self.down, self.up)


def _fold(
    linear: nn.Module, a: mx.array, b: mx.array, scale: mx.array
) -> tuple[mx.array, mx.array]:
    """``(A, scale·B)`` in the dtype ``linear`` computes in (in bfloat16 the factors' own
    rounding stays below that of the output they are added to)."""
    dtype = linear.scales.dtype if isinstance(linear, nn.QuantizedLinear) else linear.weight.dtype
    return a.astype(dtype), (scale * b).astype(dtype)


def _fill(
    slot: LoraSlot,
    a: mx.array,
    b: mx.array,
    scale: mx.array,
    magnitude: mx.array | None,
    folded: tuple[mx.array, mx.array] | None = None,
) -> None:
    if not slot.dora:
        slot.layer.fill(a, b, scale, folded or _fold(slot.base, a, b, scale))
        return
    slot.layer.lora_a = a
    slot.layer.lora_b = b
    slot.layer.scale = scale
    slot.layer.m = magnitude


def _install_real(slots: Sequence[LoraSlot]) -> None:
    """The resting, fine-tuned state: LoRA layers in place, holding the trained arrays."""
    for slot in slots:
        _fill(slot, slot.a, slot.b, slot.scale, slot.magnitude, slot.folded)
        _put(slot.parent, slot.key, slot.layer)


def install_base(slots: Sequence[LoraSlot]) -> Restore:
    """The base model, by swapping the plain modules back in.

    For DoRA a zero scale is not the base model (the magnitude still rescales every
    row); swapping is exact and also skips the LoRA matmuls.
    """

    def change() -> None:
        for slot in slots:
            _put(slot.parent, slot.key, slot.base)

    return guarded(lambda: _install_real(slots), change)


def install_scaled(slots: Sequence[LoraSlot], lam: float) -> Restore:
    """Scale each adapter's change by ``lam``: 1 is the fine-tune, 1.25 an overshoot.

    LoRA: ``scale · lam``. DoRA: the same on the low-rank term, and the magnitude moves
    from the base row norms towards the trained ones by the same ``lam``, so the curve
    runs continuously to the base model at ``lam = 0``.
    """
    lam_arr = mx.array(float(lam), dtype=mx.float32)

    def change() -> None:
        for slot in slots:
            magnitude = None
            if slot.dora:
                # A DoRA slot has both magnitudes (see _wrap).
                trained, init = slot.magnitude, slot.init_magnitude
                assert trained is not None and init is not None
                magnitude = init + lam_arr * (trained - init)
            _fill(slot, slot.a, slot.b, slot.scale * lam_arr, magnitude)

    return guarded(lambda: _install_real(slots), change)


def null_arrays(
    slots: Sequence[LoraSlot], factors: Mapping[str, NullFactors]
) -> dict[str, PlacedFactors[mx.array]]:
    """A drawn null's factors (by module path, PEFT orientation) as MLX arrays in mlx-lm's
    layout, with, for LoRA, the pair :class:`ViewLoRALinear` computes with: converted,
    folded and evaluated once per draw, so that opening the null again does no work."""
    out = {}
    for slot in slots:
        a, b = (mx.array(f.T) for f in factors[slot.path])
        folded = None if slot.dora else _fold(slot.base, a, b, slot.scale)
        out[slot.path] = PlacedFactors(a, b, folded)
    mx.eval([(f.a, f.b, *(f.folded or ())) for f in out.values()])
    return out


def install_null(slots: Sequence[LoraSlot], placed: PlacedNull) -> Restore:
    """A null's factors (as :func:`null_arrays` placed them) in place of the trained ones.

    The trained scale is kept. A DoRA null starts from the base row norms, as an
    untrained DoRA adapter does, so the trained magnitude cannot leak into the null.
    """
    # Looked up before anything is installed: a missing module leaves the model untouched.
    arrays = [placed[slot.path] for slot in slots]

    def change() -> None:
        for slot, null in zip(slots, arrays, strict=True):
            _fill(slot, null.a, null.b, slot.scale, slot.init_magnitude, null.folded)

    return guarded(lambda: _install_real(slots), change)


# --------------------------------------------------------------------- checks
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
