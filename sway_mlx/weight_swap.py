"""Adapted modules' weights replaced in place, on one MLX model: a model built from another.

Same functions, same signatures as ``sway_hf/weight_swap.py``. export-check uses it to
turn the loaded export into the noise floor's model: the export's own weights
everywhere except the adapted modules, which get ``W_B + ΔN`` as the export stores it
(:mod:`sway_common.suite.export_floor`). A float Linear takes the values in its dtype;
a quantized one (no adapter on it) is swapped for a float Linear holding them (mlx's
affine quantization is not idempotent on its own grid: quantizing stored values again
would move some). The undo puts the very same arrays and modules back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from numpy.typing import NDArray

from sway_common.backend.limits import missing_module
from sway_common.backend.views import Restore, guarded


def _place(model: nn.Module, path: str) -> tuple[Any, str | int, nn.Module]:
    """(holder, key, Linear) of a module path; the Linear inside a LoRA wrapper."""
    holder: Any = None
    key: str | int = ""
    node: Any = model
    for part in path.split("."):
        holder = node
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            key = int(part)
        elif isinstance(node, dict) and part in node:
            key = part
        else:
            raise ValueError(missing_module(path))
        node = node[key]
    if "linear" in node and isinstance(node["linear"], nn.Module):  # a LoRA wrapper
        if isinstance(node["linear"], nn.QuantizedLinear):
            # The views swap the wrapper for the layer inside: a new module would not show.
            raise ValueError(f"{path!r} is quantized and carries an adapter; load it without")
        holder, key, node = node, "linear", node["linear"]
    if not isinstance(node, nn.Linear | nn.QuantizedLinear):
        raise ValueError(f"{path!r} is a {type(node).__name__}, not a Linear layer")
    return holder, key, node


def _shape(layer: nn.Module) -> tuple[int, int]:
    out, width = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):  # packed: 32 // bits values per uint32
        width = width * 32 // layer.bits
    return int(out), int(width)


def _float_linear(layer: nn.Module, w: NDArray[np.float32]) -> nn.Module:
    quantized = isinstance(layer, nn.QuantizedLinear)
    dtype = layer.scales.dtype if quantized else layer.weight.dtype
    linear = nn.Linear(1, 1, bias="bias" in layer)
    linear.weight = mx.array(np.asarray(w, dtype=np.float32)).astype(dtype)
    if "bias" in layer:
        linear.bias = layer.bias
    return linear


def install_weights(model: nn.Module, weights: Mapping[str, NDArray[np.float32]]) -> Restore:
    """Give each named Linear (adapter module paths) the weight ``weights[path]``, float
    ``(out, in)`` values as stored, in the layer's dtype (a quantized layer's scales'
    dtype). Returns the undo; if it raises, nothing is changed."""
    places = [(*_place(model, path), w) for path, w in weights.items()]
    for _, _, layer, w in places:
        if _shape(layer) != tuple(np.shape(w)):
            raise ValueError(f"a weight of shape {np.shape(w)} for a {_shape(layer)} layer")

    # A float Linear keeps its module (the views may hold it: a LoRA wrapper's base) and
    # takes new arrays; a quantized one is swapped for a float Linear.
    saved = [layer.weight for _, _, layer, _ in places]

    def restore() -> None:
        for (holder, key, layer, _), weight in zip(places, saved, strict=True):
            holder[key] = layer
            layer.weight = weight

    def change() -> None:
        for holder, key, layer, w in places:
            if isinstance(layer, nn.QuantizedLinear):
                holder[key] = _float_linear(layer, w)
            else:
                layer.weight = mx.array(np.asarray(w, np.float32)).astype(layer.weight.dtype)
        mx.eval([holder[key].parameters() for holder, key, _, _ in places])

    return guarded(restore, change)
