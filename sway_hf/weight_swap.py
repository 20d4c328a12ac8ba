"""Adapted modules' weights replaced in place, on one torch model: a model built from another.

Same functions, same signatures as ``sway_mlx/weight_swap.py``. export-check uses it to
turn the loaded export into the noise floor's model: the export's own weights
everywhere except the adapted modules, which get ``W_B + ΔN`` stored the export's way
(:mod:`sway_common.suite.export_floor`). A float Linear takes the values in its dtype
and the undo copies the saved weights back. A bitsandbytes layer (a quantized export) is
swapped for a new layer of its own class and settings holding the values, quantized by
bitsandbytes (the values come stored that way already: re-quantizing them gives them
back, as tests/test_export_bnb_e2e.py checks), so the floor runs the export's
own kernels (LLM.int8 quantizes the activations too). The undo puts the original back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from sway_common.backend.limits import missing_module
from sway_common.backend.views import Restore, guarded

_PEFT_PREFIX = "base_model.model."


_BNB = ("Linear4bit", "Linear8bitLt")
"""bitsandbytes' quantized Linear classes, the ones transformers' quantizer puts in."""


def _is_bnb(layer: torch.nn.Module) -> bool:
    kind = type(layer)
    return kind.__module__.startswith("bitsandbytes.") and kind.__name__ in _BNB


def _place(model: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str, torch.nn.Linear]:
    """(holder, attribute, Linear) of a module path; the Linear inside a PEFT LoRA layer."""
    for full in (path, _PEFT_PREFIX + path):
        try:
            layer = model.get_submodule(full)
        except AttributeError:
            continue
        parent, _, name = full.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        break
    else:
        raise ValueError(missing_module(path))
    inner = getattr(layer, "base_layer", None)
    if isinstance(inner, torch.nn.Module):  # a PEFT LoRA layer
        holder, name, layer = layer, "base_layer", inner
    # Exactly torch's Linear, or bitsandbytes' own: another subclass may keep no float weight.
    if not isinstance(layer, torch.nn.Linear) or (
        type(layer) is not torch.nn.Linear and not _is_bnb(layer)
    ):
        raise ValueError(f"{path!r} is a {type(layer).__name__}, not a Linear layer")
    return holder, name, layer


def _requantized(layer: Any, w: NDArray[np.float32]) -> torch.nn.Module:
    """A bitsandbytes layer like ``layer`` (class, settings, bias, device) holding ``w``,
    quantized by bitsandbytes as it quantizes a float weight on loading."""
    import bitsandbytes as bnb

    device = layer.weight.device
    values = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    dims = (layer.in_features, layer.out_features)
    if isinstance(layer, bnb.nn.Linear8bitLt):
        new: Any = bnb.nn.Linear8bitLt(
            *dims,
            bias=False,
            has_fp16_weights=False,
            threshold=layer.state.threshold,
            device="meta",
        )
        params: Any = bnb.nn.Int8Params(
            values.to(torch.float16), requires_grad=False, has_fp16_weights=False
        )
    else:
        old = layer.weight
        state = old.quant_state
        dtype = getattr(state, "original_dtype", state.dtype)  # CPU repacking renames it
        new = bnb.nn.Linear4bit(  # on the meta device: no weight drawn only to be replaced
            *dims,
            bias=False,
            device="meta",
            compute_dtype=layer.compute_dtype,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
        )
        params = bnb.nn.Params4bit(
            values.to(dtype),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=new,
        )
        new.compute_type_is_set = layer.compute_type_is_set
    new.weight = params.to(device)  # bitsandbytes quantizes here
    new.bias = layer.bias
    return new.train(layer.training)


def install_weights(model: torch.nn.Module, weights: Mapping[str, NDArray[np.float32]]) -> Restore:
    """Give each named Linear (adapter module paths) the weight ``weights[path]``, float
    ``(out, in)`` values as stored: cast to a float layer's dtype and device, or held by
    a new bitsandbytes layer in a quantized one's place. Returns the undo; if it raises,
    nothing is changed."""
    places = [(*_place(model, path), w) for path, w in weights.items()]
    for _, _, layer, w in places:
        shape = (layer.out_features, layer.in_features)
        if shape != tuple(np.shape(w)):
            raise ValueError(f"a weight of shape {np.shape(w)} for a {shape} layer")
    floats = [(layer, w) for _, _, layer, w in places if not _is_bnb(layer)]
    saved = [(layer, layer.weight.detach().clone()) for layer, _ in floats]

    def restore() -> None:
        for holder, name, layer, _ in places:
            setattr(holder, name, layer)
        with torch.no_grad():
            for layer, value in saved:
                layer.weight.copy_(value)

    def change() -> None:
        for holder, name, layer, w in places:
            if _is_bnb(layer):
                setattr(holder, name, _requantized(layer, w))
        with torch.no_grad():
            for layer, w in floats:
                layer.weight.copy_(torch.from_numpy(np.asarray(w, dtype=np.float32)))

    return guarded(restore, change)
