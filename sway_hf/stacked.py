"""Stacked views on torch: the rows of one batch run with different LoRA factors, one per view.

Same functions, same signatures as ``sway_mlx/stacked.py``. Each PEFT layer's own adapter
is switched off and a forward hook adds each view's delta to its rows; with ``tile_at``
the first adapted block repeats each prompt's rows per view, so the blocks below it run
once per prompt. The backend-neutral plan is :mod:`sway_common.backend.stacking`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch

from sway_common.backend.stacking import StackedView
from sway_common.backend.views import Restore, guarded
from sway_hf.lora import LoraSlot

# Arguments of a transformers decoder block that hold one row per sequence: repeated
# per view together with the hidden states. Anything else (cache_position, flags) has
# no row dimension and passes through.
_PER_ROW = ("hidden_states", "attention_mask", "position_ids", "position_embeddings")


def install_stacked(
    model: torch.nn.Module,
    slots: Sequence[LoraSlot],
    stack: Sequence[StackedView],
    tile_at: str | None,
) -> Restore:
    """Every view of ``stack`` at once: row group ``v`` runs with ``stack[v]``.

    Each layer's own adapter is switched off (the base path, as in :func:`install_base`)
    and a forward hook adds ``scale_v · B_v (A_v x)`` to each view's rows, with PEFT's
    arithmetic, so a stacked row matches its one-view row. With ``tile_at`` (a block
    path under ``model``) the blocks below it run on each prompt once and the rows are
    repeated per view from that block on. DoRA has no such form (its magnitude
    renormalises whole weight rows per view): the backend keeps it on the one-view path.
    """
    if any(slot.dora for slot in slots):
        raise ValueError("DoRA adapters have no stacked views; open the views one at a time")
    factors = [_stacked_factors(slot, stack) for slot in slots]  # built before anything changes
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def restore() -> None:
        for handle in handles:
            handle.remove()
        for slot in slots:
            slot.layer.enable_adapters(True)

    def change() -> None:
        for slot, (a, b, scale) in zip(slots, factors, strict=True):
            layer = slot.layer
            assert isinstance(layer, torch.nn.Module)  # PEFT's LoRA layers are modules too
            layer.enable_adapters(False)
            handles.append(layer.register_forward_hook(_stacked_delta(a, b, scale)))
        if tile_at is not None and len(stack) > 1:
            handles.extend(_tile_rows(model, tile_at, len(stack)))

    return guarded(restore, change)


def _stacked_factors(
    slot: LoraSlot, stack: Sequence[StackedView]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A (V, in, r), B (V, r, out), scale (V, 1, 1)) in the slot's dtype and device."""
    like: dict[str, Any] = {"dtype": slot.a.dtype, "device": slot.a.device}

    def pick(view: StackedView) -> tuple[torch.Tensor, torch.Tensor]:
        if view.factors is None:
            return slot.a.detach(), slot.b.detach()
        placed = view.factors[slot.path]  # by null_arrays
        return placed.a, placed.b

    picked = [pick(view) for view in stack]
    a = torch.stack([a for a, _ in picked]).transpose(1, 2).contiguous()
    b = torch.stack([b for _, b in picked]).transpose(1, 2).contiguous()
    scale = torch.tensor([slot.scale * v.scale_of(slot.path) for v in stack], **like).view(-1, 1, 1)
    return a, b, scale


def _stacked_delta(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> Callable[..., Any]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
        x = args[0]
        grouped = x.reshape(a.shape[0], -1, x.shape[-1]).to(a.dtype)
        delta = torch.bmm(torch.bmm(grouped, a), b) * scale
        # PEFT adds in the adapter's dtype, then casts back to the layer's.
        return (output + delta.reshape(output.shape)).to(output.dtype)

    return hook


def _tile_rows(
    model: torch.nn.Module, path: str, copies: int
) -> list[torch.utils.hooks.RemovableHandle]:
    """Pre-hooks that repeat the per-row inputs of block ``path`` and the blocks after it.

    The first block sees each prompt once (``rows``) and repeats its hidden states; the
    decoder hands every block the same mask and rotary tensors of ``rows`` rows, so
    each is repeated once per forward and reused by the later blocks.
    """
    blocks_path, first = path.rsplit(".", 1)
    # A decoder's blocks: an nn.ModuleList (get_submodule types any module).
    blocks = cast(torch.nn.ModuleList, model.get_submodule(blocks_path))
    state: dict[str, Any] = {"rows": 0, "done": []}

    def tiled(value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(tiled(v) for v in value)
        if not isinstance(value, torch.Tensor) or value.ndim < 2:
            return value
        if value.shape[0] != state["rows"]:
            return value
        for original, copy in state["done"]:
            if original is value:
                return copy
        copy = value.repeat(copies, *([1] * (value.ndim - 1)))
        state["done"].append((value, copy))
        return copy

    def later(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        args = (tiled(args[0]), *args[1:]) if args else args
        return args, {k: tiled(v) if k in _PER_ROW else v for k, v in kwargs.items()}

    def start(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        state["rows"], state["done"] = hidden.shape[0], []
        return later(module, args, kwargs)

    return [
        blocks[i].register_forward_pre_hook(start if i == int(first) else later, with_kwargs=True)
        for i in range(int(first), len(blocks))
    ]
