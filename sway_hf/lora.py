"""View mechanics on a PEFT LoRA model: base, fine-tuned, λ-scaled and seeded null adapters.

The resting state of the model is the fine-tuned one. Each ``install_*`` function
changes the one loaded model in place and returns the function that undoes it exactly:

- base: PEFT's own adapter switch (``disable_adapter``), so DoRA layers fall back to
  the true base weights, not to "scale 0";
- scaled(λ): every LoRA layer's ``scaling[adapter]`` multiplied by λ; the old floats
  are put back on exit rather than divided out;
- null: ``lora_A`` / ``lora_B`` overwritten with seeded Gaussians; the real tensors
  are cloned first and copied back bit-for-bit on exit, also after an exception.

Factors use PEFT's layout: ``a`` is ``(r, in)``, ``b`` is ``(out, r)``, ΔW = scale·B·A.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from sway_common.backend.base import ViewSpec
from sway_common.protocols import NullMode
from sway_common.backend.scoring import text_hash

Restore = Callable[[], None]

# PEFT prefixes every wrapped module with this; without it the paths are the ones the
# adapter files and the MLX backend use ("model.layers.0.self_attn.q_proj").
_PEFT_PREFIX = "base_model.model."


@dataclass(eq=False)
class LoraSlot:
    """One module carrying the active adapter, with references to its live tensors."""

    path: str
    layer: LoraLayer
    a: torch.nn.Parameter
    b: torch.nn.Parameter
    magnitude: torch.nn.Parameter | None
    """DoRA's per-row magnitude; ``None`` for plain LoRA."""
    extra: tuple[torch.nn.Parameter, ...]
    """Other trained tensors of the module (a LoRA bias): zeroed in a null."""
    scale: float
    """The trained ``scaling[adapter]`` (alpha / r, or alpha / sqrt(r) for rsLoRA)."""
    norm: float
    """Frobenius norm of the trained ``ΔW = scale · B·A``."""

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
        out.update({f"lora_B.extra{i}": p for i, p in enumerate(self.extra)})
        return out


def delta_norm(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """``‖scale · B·A‖_F`` through the two r×r Gram matrices, never forming ΔW."""
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    squared = float(torch.sum((b64.T @ b64) * (a64 @ a64.T)))
    return abs(scale) * math.sqrt(max(squared, 0.0))


def find_slots(model: PeftModel, adapter: str) -> list[LoraSlot]:
    """Every LoRA module that carries ``adapter``, in module order."""
    slots: list[LoraSlot] = []
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        if adapter in layer.lora_A:
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            extra = tuple(p for n, p in layer.lora_B[adapter].named_parameters() if n != "weight")
        elif adapter in getattr(layer, "lora_embedding_A", {}):
            a, b = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
            extra = ()
        else:
            continue
        magnitude = None
        if adapter in layer.lora_magnitude_vector:
            magnitude = layer.lora_magnitude_vector[adapter].weight
        scale = float(layer.scaling[adapter])
        slots.append(
            LoraSlot(
                path=name.removeprefix(_PEFT_PREFIX),
                layer=layer,
                a=a,
                b=b,
                magnitude=magnitude,
                extra=extra,
                scale=scale,
                norm=delta_norm(a, b, scale),
            )
        )
    return slots


def base_row_norms(slot: LoraSlot) -> torch.Tensor:
    """Row norms of the base weight: the magnitude of an untrained DoRA adapter."""
    weight = slot.layer.get_base_layer().weight.detach()
    if getattr(slot.layer, "fan_in_fan_out", False):
        weight = weight.T
    if slot.magnitude is not None and weight.shape[0] != slot.magnitude.numel():
        raise ValueError(f"DoRA views support Linear layers only; {slot.path} is not one")
    return torch.linalg.norm(weight.to(torch.float32), dim=1)


def module_seed(seed: int, path: str) -> int:
    """A 63-bit seed for one module's null draw, stable across processes and devices."""
    return int(text_hash(f"null-seed:{int(seed)}", path)[:16], 16) & ((1 << 63) - 1)


def null_factors(
    slots: Sequence[LoraSlot],
    seed: int,
    *,
    init_scale: float,
    rank_scale: float,
    mode: NullMode,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seeded Gaussian ``(a, b)`` per slot, float32 on the CPU.

    Each module draws from its own CPU generator seeded by (seed, module path), so a
    seed gives the same null on any device and whatever other modules exist. A has std
    ``init_scale``, B has std ``init_scale · sqrt(rank_scale)``: only one factor grows,
    so Var(ΔW) = r·σ_A²·σ_B² is linear in ``rank_scale``, like a null of rank
    ``r · rank_scale``. ``norm_matched`` rescales B so each ``‖ΔW‖_F`` equals the
    trained module's (zero stays zero: an untrained module gets no noise).
    """
    if not rank_scale > 0:
        raise ValueError(f"rank_scale must be > 0, got {rank_scale}")
    b_std = init_scale * math.sqrt(rank_scale)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for slot in slots:
        gen = torch.Generator(device="cpu").manual_seed(module_seed(seed, slot.path))
        a = torch.randn(tuple(slot.a.shape), generator=gen, dtype=torch.float32) * init_scale
        b = torch.randn(tuple(slot.b.shape), generator=gen, dtype=torch.float32) * b_std
        if mode == "norm_matched":
            drawn = delta_norm(a, b, slot.scale)
            b = b * (slot.norm / drawn) if drawn > 0 else torch.zeros_like(b)
        out.append((a, b))
    return out


def _clear_dora_cache(slots: Sequence[LoraSlot], adapter: str) -> None:
    # PEFT's DoRA can cache B·A and the weight norm per adapter name; a cached value
    # would outlive an in-place change of the factors, the magnitude or the scaling.
    for slot in slots:
        if slot.dora:
            slot.layer.lora_magnitude_vector[adapter]._cache_clear()


def _snapshot(slots: Sequence[LoraSlot], adapter: str, keys: tuple[str, ...] | None) -> Restore:
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
        _clear_dora_cache(slots, adapter)

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


def install_base(model: PeftModel) -> Restore:
    ctx = model.disable_adapter()
    ctx.__enter__()
    return lambda: ctx.__exit__(None, None, None)


def install_scaled(slots: Sequence[LoraSlot], adapter: str, lam: float) -> Restore:
    """Scale each module's change by ``lam``: 1 is the fine-tune, 1.25 an overshoot.

    DoRA: the magnitude also moves from the base row norms towards the trained ones by
    ``lam`` (what the MLX backend does), so the curve runs continuously to the base.
    """
    before = [slot.layer.scaling[adapter] for slot in slots]
    undo_tensors = _snapshot(slots, adapter, ("lora_magnitude_vector",))

    def undo_scaling() -> None:
        for slot, old in zip(slots, before, strict=True):
            slot.layer.scaling[adapter] = old
        _clear_dora_cache(slots, adapter)

    restore = _undo_all(undo_scaling, undo_tensors)
    try:
        with torch.no_grad():
            for slot, old in zip(slots, before, strict=True):
                slot.layer.scaling[adapter] = old * lam
                if slot.magnitude is not None:
                    init = base_row_norms(slot).to(slot.magnitude.device)
                    trained = slot.magnitude.detach().to(torch.float32)
                    slot.magnitude.copy_(init + lam * (trained - init))
        _clear_dora_cache(slots, adapter)
    except BaseException:
        restore()
        raise
    return restore


def install_null(
    slots: Sequence[LoraSlot],
    adapter: str,
    seed: int,
    *,
    init_scale: float,
    rank_scale: float,
    mode: NullMode,
) -> Restore:
    """A random adapter of the trained one's structure (rank, scale, targets).

    Factors are drawn before anything is written, so a failing draw leaves the model
    untouched. A DoRA null keeps the base row norms as magnitude, as an untrained DoRA
    adapter does, so the trained magnitudes cannot leak into the null.
    """
    factors = null_factors(slots, seed, init_scale=init_scale, rank_scale=rank_scale, mode=mode)
    restore = _snapshot(slots, adapter, None)
    try:
        with torch.no_grad():
            for slot, (a, b) in zip(slots, factors, strict=True):
                slot.a.copy_(a)
                slot.b.copy_(b)
                for p in slot.extra:
                    p.zero_()
                if slot.magnitude is not None:
                    slot.magnitude.copy_(base_row_norms(slot))
        _clear_dora_cache(slots, adapter)
    except BaseException:
        restore()
        raise
    return restore


def activate(model: PeftModel, slots: Sequence[LoraSlot], adapter: str, view: ViewSpec) -> Restore:
    """Put ``model`` into ``view``; the returned function brings back the fine-tuned state."""
    # λ = 0 goes through the adapter switch: bit-exact for DoRA too (interpolated
    # magnitudes would only round to the base), and it skips the LoRA matmuls.
    if view.kind == "base" or (view.kind == "scaled" and view.lam == 0.0):
        return install_base(model)
    if view.kind == "scaled":
        return install_scaled(slots, adapter, view.lam)
    if view.kind == "null":
        return install_null(
            slots, adapter, view.seed,
            init_scale=view.init_scale, rank_scale=view.rank_scale, mode=view.mode,
        )
    return lambda: None


def nonfinite(slots: Sequence[LoraSlot]) -> list[str]:
    """Names of adapter tensors holding NaN or Inf."""
    bad: list[str] = []
    with torch.no_grad():
        for slot in slots:
            for key, value in slot.tensors().items():
                if not bool(torch.isfinite(value).all()):
                    bad.append(f"{slot.path}.{key}")
    return bad
