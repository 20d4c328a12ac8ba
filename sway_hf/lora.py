"""View mechanics on a PEFT LoRA model: adapter layers found, switched, scaled or refilled.

Same functions, same signatures as ``sway_mlx/lora.py``; which one runs for which view
is decided once, in :meth:`sway_common.backend.base.DifferentialBackendBase._activate`.

PEFT injects the LoRA layers when the backend loads an adapter dir; :func:`attach`
records the active adapter's layers in :class:`LoraSlot` objects. The resting state of
the model is the fine-tuned one. Each ``install_*`` function changes it in place and
returns the function that undoes it exactly; if it raises, the model is left in the
fine-tuned state:

- base: each layer's own adapter switch (what ``PeftModel.disable_adapter`` flips for
  every layer), so DoRA layers fall back to the true base weights, not to "scale 0";
- scaled(λ): every layer's ``scaling[adapter]`` multiplied by λ; the old floats are put
  back on exit rather than divided out;
- null: ``lora_A`` / ``lora_B`` pointed at the null's tensors (placed on the device
  once per draw by :func:`null_arrays`) and back at the trained ones on exit, also
  after an exception.

Stacked views live in :mod:`sway_hf.stacked`.

While attached, a plain LoRA layer runs :mod:`sway_hf.platform_fixes`'s lean forward (PEFT's
arithmetic on the same live tensors and switches; ``SWAY_MLX_NO_FAST_PATHS=1``: PEFT's).

Factors use PEFT's layout: ``a`` is ``(r, in)``, ``b`` is ``(out, r)``, ΔW = scale·B·A.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.dora import DoraLinearLayer

from sway_common.adapters.weights import AdapterWeights
from sway_common.backend.limits import misfit, missing_module
from sway_common.backend.nulls import NullFactors, PlacedFactors, PlacedNull
from sway_common.backend.views import Restore, guarded
from sway_hf import platform_fixes

# PEFT prefixes every wrapped module with this; without it the paths are the ones the
# adapter files and the MLX backend use ("model.layers.0.self_attn.q_proj").
_PEFT_PREFIX = "base_model.model."


@dataclass(eq=False)
class LoraSlot:
    """One module carrying the adapter, with references to its live tensors."""

    path: str
    layer: LoraLayer
    adapter: str
    """PEFT's name for the adapter: the key of every per-adapter dict on ``layer``."""
    a: torch.nn.Parameter
    b: torch.nn.Parameter
    magnitude: torch.nn.Parameter | None
    """DoRA's per-row magnitude; ``None`` for plain LoRA."""
    scale: float
    """The trained ``scaling[adapter]`` (alpha / r, or alpha / sqrt(r) for rsLoRA)."""
    lean: Callable[..., torch.Tensor] | None = None
    """The layer's lean forward (:mod:`sway_hf.platform_fixes`) while attached; None where
    PEFT's forward runs."""

    @property
    def dora(self) -> bool:
        return self.magnitude is not None

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def tensors(self) -> dict[str, torch.nn.Parameter]:
        out = {"lora_A": self.a, "lora_B": self.b}
        if self.magnitude is not None:
            out["lora_magnitude_vector"] = self.magnitude
        return out


# ------------------------------------------------------------------ attaching
def attach(model: PeftModel, weights: AdapterWeights) -> list[LoraSlot]:
    """The layers of ``model``'s active adapter, which PEFT loaded from ``weights``' files.

    They must be exactly the modules of ``weights``: a null is drawn for each of those,
    and the MLX backend wraps those and no others.
    """
    adapter = model.active_adapter
    slots: list[LoraSlot] = []
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            continue
        magnitude = None
        if adapter in layer.lora_magnitude_vector:
            magnitude = platform_fixes.weight_of(layer.lora_magnitude_vector[adapter])
        slots.append(
            LoraSlot(
                path=name.removeprefix(_PEFT_PREFIX),
                layer=layer,
                adapter=adapter,
                a=platform_fixes.weight_of(layer.lora_A[adapter]),
                b=platform_fixes.weight_of(layer.lora_B[adapter]),
                magnitude=magnitude,
                scale=float(layer.scaling[adapter]),
            )
        )
    found, wanted = {s.path for s in slots}, set(weights.modules)
    if found != wanted:
        missing = sorted(wanted - found)[:3] or "none"
        extra = sorted(found - wanted)[:3] or "none"
        raise ValueError(
            f"PEFT's LoRA layers are not the adapter's modules (missing: {missing}, "
            f"extra: {extra}); was the adapter trained on another base model?"
        )
    for slot in slots:
        slot.lean = platform_fixes.install(slot.layer, slot.adapter)
    return sorted(slots, key=lambda s: s.path)


def check_fits(model: torch.nn.Module, weights: AdapterWeights) -> None:
    """Raise one clear ValueError if an adapter module has no layer here, or the wrong shape.

    Run before PEFT loads the adapter: PEFT's own error for an adapter of another base
    model is torch's "size mismatch" list, which names neither the cause nor the fix.
    """
    layers = dict(model.named_modules())
    for path, module in sorted(weights.modules.items()):
        layer = layers.get(path, layers.get(_PEFT_PREFIX + path))
        if layer is None:
            raise ValueError(missing_module(path))
        out_dims, in_dims = _linear_shape(layer)
        if out_dims is None or in_dims is None:
            raise ValueError(
                f"adapter targets {path!r}, a {type(layer).__name__}; only Linear layers are supported"
            )
        problem = misfit(path, module.a.shape, module.b.shape, (out_dims, in_dims))
        if problem:
            raise ValueError(problem)


def _linear_shape(layer: torch.nn.Module) -> tuple[int | None, int | None]:
    """(out, in) of a Linear, of transformers' Conv1D (GPT-2: ``nf``, ``nx``) or of a PEFT
    layer already wrapping one; (None, None) for anything else."""
    for out_name, in_name in (("out_features", "in_features"), ("nf", "nx")):
        out_dims, in_dims = getattr(layer, out_name, None), getattr(layer, in_name, None)
        if isinstance(out_dims, int) and isinstance(in_dims, int):
            return out_dims, in_dims
    return None, None


def detach(model: PeftModel, slots: Sequence[LoraSlot]) -> None:
    """Take the adapter out for good (PEFT deletes its layers' weights and config)."""
    for slot in slots:
        # A later adapter's attach may already have put its own forward on the layer.
        platform_fixes.uninstall(slot.layer, slot.lean)
    for adapter in {s.adapter for s in slots}:
        model.delete_adapter(adapter)


# ---------------------------------------------------------------------- views
def _clear_dora_cache(slots: Sequence[LoraSlot]) -> None:
    # PEFT's DoRA can cache B·A and the weight norm per adapter name; a cached value
    # would outlive an in-place change of the factors, the magnitude or the scaling.
    for slot in slots:
        if slot.dora:
            dora = slot.layer.lora_magnitude_vector[slot.adapter]
            assert isinstance(dora, DoraLinearLayer)  # PEFT's DoRA keeps its cache here
            dora._cache_clear()


def _snapshot(slots: Sequence[LoraSlot], keys: tuple[str, ...] | None) -> Restore:
    """Clone the named tensors of every slot (all when ``keys`` is None); undo copies them back."""
    saved = [
        {k: p.detach().clone() for k, p in s.tensors().items() if keys is None or k in keys}
        for s in slots
    ]

    def restore() -> None:
        with torch.no_grad():
            for slot, tensors in zip(slots, saved, strict=True):
                live = slot.tensors()
                for key, value in tensors.items():
                    live[key].copy_(value)
        _clear_dora_cache(slots)

    return restore


def _undo_all(*undos: Restore) -> Restore:
    def restore() -> None:
        # Every undo runs even if an earlier one raised; the first error is re-raised.
        error: BaseException | None = None
        for undo in undos:
            try:
                undo()
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error

    return restore


def _base_row_norms(slot: LoraSlot) -> torch.Tensor:
    """Row norms of the base weight: the magnitude of an untrained DoRA adapter."""
    base_weight = slot.layer.get_base_layer().weight
    assert isinstance(base_weight, torch.Tensor)  # a Linear's (or Conv1D's) Parameter
    weight = base_weight.detach()
    if getattr(slot.layer, "fan_in_fan_out", False):
        weight = weight.T
    if slot.magnitude is not None and weight.shape[0] != slot.magnitude.numel():
        raise ValueError(f"DoRA views support Linear layers only; {slot.path} is not one")
    return torch.linalg.norm(weight.to(torch.float32), dim=1)


def install_base(slots: Sequence[LoraSlot]) -> Restore:
    """The base model, through each layer's adapter switch.

    This is the switch ``PeftModel.disable_adapter`` flips on every layer; the adapter
    reader refuses anything but LoRA on Linear layers, so the slots are all of them.
    """

    def restore() -> None:
        for slot in slots:
            slot.layer.enable_adapters(True)

    def change() -> None:
        for slot in slots:
            slot.layer.enable_adapters(False)

    return guarded(restore, change)


def install_scaled(slots: Sequence[LoraSlot], lam: float) -> Restore:
    """Scale each module's change by ``lam``: 1 is the fine-tune, 1.25 an overshoot.

    LoRA: ``scaling · lam``. DoRA: the magnitude also moves from the base row norms
    towards the trained ones by ``lam`` (what the MLX backend does), so the curve runs
    continuously to the base model at ``lam = 0``.
    """
    before = [slot.layer.scaling[slot.adapter] for slot in slots]

    def undo_scaling() -> None:
        for slot, old in zip(slots, before, strict=True):
            slot.layer.scaling[slot.adapter] = old
        _clear_dora_cache(slots)

    def change() -> None:
        with torch.no_grad():
            for slot, old in zip(slots, before, strict=True):
                slot.layer.scaling[slot.adapter] = old * lam
                if slot.magnitude is not None:
                    init = _base_row_norms(slot).to(slot.magnitude.device)
                    trained = slot.magnitude.detach().to(torch.float32)
                    slot.magnitude.copy_(init + lam * (trained - init))
        _clear_dora_cache(slots)

    restore = _undo_all(undo_scaling, _snapshot(slots, ("lora_magnitude_vector",)))
    return guarded(restore, change)


def null_arrays(
    slots: Sequence[LoraSlot], factors: Mapping[str, NullFactors]
) -> dict[str, PlacedFactors[torch.Tensor]]:
    """A drawn null's factors (by module path, PEFT orientation) as tensors in each
    slot's dtype and on its device: converted once per draw, so that opening the null
    again moves no data (it was two small host-to-device copies per adapted module)."""
    out = {}
    for slot in slots:
        like: dict[str, Any] = {"dtype": slot.a.dtype, "device": slot.a.device}
        a, b = (torch.from_numpy(np.ascontiguousarray(f)).to(**like) for f in factors[slot.path])
        out[slot.path] = PlacedFactors(a, b)
    return out


def install_null(slots: Sequence[LoraSlot], placed: PlacedNull) -> Restore:
    """A null's factors (as :func:`null_arrays` placed them) in place of the trained ones.

    The parameters are pointed at the null's tensors and back, so no data moves either
    way and the trained tensors return untouched. The trained scaling is kept. A DoRA
    null keeps the base row norms as magnitude, as an untrained DoRA adapter does, so
    the trained magnitudes cannot leak into the null.
    """
    # Looked up before anything is written: a missing module leaves the model untouched.
    drawn = [(placed[slot.path].a, placed[slot.path].b) for slot in slots]
    trained = [(slot.a.data, slot.b.data) for slot in slots]
    # Its restore also clears PEFT's DoRA cache, after the factors are back.
    magnitudes = _snapshot([s for s in slots if s.dora], ("lora_magnitude_vector",))

    def undo_factors() -> None:
        for slot, (a, b) in zip(slots, trained, strict=True):
            slot.a.data, slot.b.data = a, b

    def change() -> None:
        with torch.no_grad():
            for slot, (a, b) in zip(slots, drawn, strict=True):
                slot.a.data, slot.b.data = a, b
                if slot.magnitude is not None:
                    slot.magnitude.copy_(_base_row_norms(slot))
        _clear_dora_cache(slots)

    return guarded(_undo_all(undo_factors, magnitudes), change)


# --------------------------------------------------------------------- checks
def nonfinite(slots: Sequence[LoraSlot]) -> list[str]:
    """Names of adapter tensors holding NaN or Inf."""
    bad: list[str] = []
    with torch.no_grad():
        for slot in slots:
            for key, value in slot.tensors().items():
                if not bool(torch.isfinite(value).all()):
                    bad.append(f"{slot.path}.{key}")
    return bad
