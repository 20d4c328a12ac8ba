"""Stacked views on MLX: the rows of one batch run with different LoRA factors, one per view.

Same functions, same signatures as ``sway_hf/stacked.py``. Each slot's layer gives way to
a :class:`StackedLoRALinear` over the plain base module; with ``tile_at`` the first
adapted block repeats each prompt's rows per view, so the blocks below it run once per
prompt. The backend-neutral plan is :mod:`sway_common.backend.stacking`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from sway_common.backend.stacking import StackedView
from sway_common.backend.views import Restore, guarded
from sway_mlx.lora import LoraSlot, _fold, _install_real, _put, _resolve


class StackedLoRALinear(nn.Module):
    """A linear layer whose row groups run with different LoRA factors, one per view.

    ``down`` ``(V, in, r)`` and ``up`` ``(V, r, out)`` are folded as the one-view layer's.
    Rows are view-major (:mod:`sway_common.backend.stacking`): reshaped to ``(V, -1, in)``,
    each view's rows meet their own factors.
    """

    def __init__(self, linear: nn.Module, down: mx.array, up: mx.array) -> None:
        super().__init__()
        self.linear = linear
        self.down = down
        self.up = up

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        views = self.down.shape[0]
        z = x.reshape(views, -1, x.shape[-1]) @ self.down
        return mx.addmm(y.reshape(views, -1, y.shape[-1]), z, self.up).reshape(y.shape)


class _Tiled(nn.Module):
    """A decoder block that first repeats its input rows once per view (view-major)."""

    def __init__(self, block: nn.Module, copies: int) -> None:
        super().__init__()
        self.block = block
        self.copies = copies

    def __call__(self, h: mx.array, *args: Any, **kwargs: Any) -> Any:
        return self.block(mx.tile(h, (self.copies,) + (1,) * (h.ndim - 1)), *args, **kwargs)

    def __getattr__(self, key: str) -> Any:
        # The model's loop reads block attributes (llama: ``use_sliding``): the block's.
        if key in self:
            return self[key]
        block = dict.get(self, "block")
        if block is None:
            raise AttributeError(key)
        return getattr(block, key)


def install_stacked(
    model: nn.Module,
    slots: Sequence[LoraSlot],
    stack: Sequence[StackedView],
    tile_at: str | None,
) -> Restore:
    """Every view of ``stack`` at once: row group ``v`` runs with ``stack[v]``.

    Each slot's layer gives way to a :class:`StackedLoRALinear` over the plain base
    module; with ``tile_at`` the blocks below it run on each prompt once and that block
    repeats the rows per view. DoRA has no such form (its magnitude renormalises whole
    weight rows per view): the backend keeps DoRA adapters on the one-view path.
    """
    if any(slot.dora for slot in slots):
        raise ValueError("DoRA adapters have no stacked views; open the views one at a time")
    layers = [_stacked_layer(slot, stack) for slot in slots]  # built before anything changes
    tiled = None
    if tile_at is not None and len(stack) > 1:
        tiled = _resolve(model, tile_at)

    def change() -> None:
        for slot, layer in zip(slots, layers, strict=True):
            _put(slot.parent, slot.key, layer)
        if tiled is not None:
            _put(tiled[0], tiled[1], _Tiled(tiled[2], len(stack)))

    def restore() -> None:
        if tiled is not None:
            _put(tiled[0], tiled[1], tiled[2])
        _install_real(slots)

    return guarded(restore, change)


def _stacked_layer(slot: LoraSlot, stack: Sequence[StackedView]) -> StackedLoRALinear:
    folded = []
    for view in stack:
        if view.factors is None:
            folded.append(_fold(slot.base, slot.a, slot.b, slot.scale * view.scale_of(slot.path)))
            continue
        null = view.factors[slot.path]  # as null_arrays placed them
        if null.folded is not None and view.scale == 1.0:  # folded at the null's own scale
            folded.append(null.folded)
        else:
            folded.append(_fold(slot.base, null.a, null.b, slot.scale * view.scale))
    return StackedLoRALinear(
        slot.base, mx.stack([d for d, _ in folded]), mx.stack([u for _, u in folded])
    )
