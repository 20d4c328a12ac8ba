"""Adapted modules' weights replaced in place, on one torch model: a model built from another.

Same functions, same signatures as ``sway_mlx/weight_swap.py``. export-check uses it to
turn the loaded export into the noise floor's model: the export's own weights
everywhere except the adapted modules, which get ``W_B + ΔN`` stored the export's way
(:mod:`sway_common.suite.export_floor`). The undo copies the saved weights back.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from numpy.typing import NDArray

from sway_common.backend.limits import missing_module
from sway_common.backend.views import Restore, guarded

_PEFT_PREFIX = "base_model.model."


def _linear(model: torch.nn.Module, path: str) -> torch.nn.Linear:
    layers = dict(model.named_modules())
    layer = layers.get(path, layers.get(_PEFT_PREFIX + path))
    if layer is None:
        raise ValueError(missing_module(path))
    inner = getattr(layer, "base_layer", layer)  # inside a PEFT LoRA layer
    # Exactly torch's Linear: a quantized subclass (bitsandbytes) keeps no float weight.
    if type(inner) is not torch.nn.Linear:
        raise ValueError(f"{path!r} is a {type(inner).__name__}, not a float Linear layer")
    return inner


def install_weights(model: torch.nn.Module, weights: Mapping[str, NDArray[np.float32]]) -> Restore:
    """Give each named Linear (adapter module paths) the float weight ``weights[path]``,
    ``(out, in)``, cast to the layer's dtype and device. Returns the undo; if it raises,
    nothing is changed."""
    layers = [(_linear(model, path), w) for path, w in weights.items()]
    for layer, w in layers:
        if tuple(layer.weight.shape) != tuple(np.shape(w)):
            raise ValueError(
                f"a weight of shape {np.shape(w)} for a {tuple(layer.weight.shape)} layer"
            )
    saved = [(layer, layer.weight.detach().clone()) for layer, _ in layers]

    def restore() -> None:
        with torch.no_grad():
            for layer, value in saved:
                layer.weight.copy_(value)

    def change() -> None:
        with torch.no_grad():
            for layer, w in layers:
                layer.weight.copy_(torch.from_numpy(np.asarray(w, dtype=np.float32)))

    return guarded(restore, change)
