"""The canonical in-memory form of a LoRA / DoRA adapter, whatever format it came from.

``a`` is ``(r, in)``, ``b`` is ``(out, r)`` and the update is ``ΔW = scale · b @ a``,
added to ``W`` where ``y = x @ W.T`` (PEFT's orientation). Module names are the causal-LM
paths that both transformers and mlx-lm use (``model.layers.3.self_attn.q_proj``).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from sway_common.adapters.files import AdapterFormatError

AdapterFormat = Literal["peft", "mlx"]

PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"
MLX_WEIGHTS = "adapters.safetensors"
CONFIG_NAME = "adapter_config.json"
# Our own field in an mlx-lm adapter_config.json; mlx-lm ignores keys it does not know.
SWAY_FIELD = "sway_lora"
_LAYER_RE = re.compile(r"^(?P<prefix>.*?\blayers)\.(?P<idx>\d+)\.(?P<suffix>.+)$")


@dataclass
class LoraModule:
    """One LoRA-wrapped Linear: ``ΔW = scale · b @ a`` in PEFT orientation."""

    a: NDArray[np.float32]
    """(r, in)"""
    b: NDArray[np.float32]
    """(out, r)"""
    scale: float
    magnitude: NDArray[np.float32] | None = None
    """DoRA: the learned norm of each output row of the adapted weight, (out,)."""

    def __post_init__(self) -> None:
        if self.a.ndim != 2 or self.b.ndim != 2 or self.a.shape[0] != self.b.shape[1]:
            raise AdapterFormatError(
                f"LoRA factors do not chain: a {self.a.shape} (r, in), b {self.b.shape} (out, r)"
            )
        if self.magnitude is not None and self.magnitude.shape != (self.b.shape[0],):
            raise AdapterFormatError(
                f"DoRA magnitude has shape {self.magnitude.shape}, expected ({self.b.shape[0]},)"
            )

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the wrapped weight."""
        return int(self.b.shape[0]), int(self.a.shape[1])

    def delta(self) -> NDArray[np.float32]:
        """The low-rank update ``scale · b @ a``, (out, in).

        For DoRA this is only the direction update; the adapted weight also rescales
        each row to ``magnitude`` (see :meth:`merged`).
        """
        return (np.float32(self.scale) * (self.b @ self.a)).astype(np.float32)

    def merged(self, base: NDArray[np.floating]) -> NDArray[np.float32]:
        """The adapted weight for base weight ``base`` (out, in), as PEFT and mlx-lm merge it."""
        w = np.asarray(base, dtype=np.float32) + self.delta()
        if self.magnitude is None:
            return w
        norms = np.linalg.norm(w, axis=1)
        return (self.magnitude / norms)[:, None].astype(np.float32) * w

    def frobenius_norm(self) -> float:
        """``‖scale · b @ a‖_F`` without forming the (out, in) matrix."""
        return lowrank_norm(self.a, self.b, self.scale)


def lowrank_norm(a: NDArray[np.floating], b: NDArray[np.floating], scale: float) -> float:
    """``‖scale · b @ a‖_F`` in float64 through an r×r product: ‖BA‖²_F = tr((BᵀB)(AAᵀ))."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    sq = float(np.sum((b64.T @ b64) * (a64 @ a64.T)))
    return abs(scale) * math.sqrt(max(sq, 0.0))


def content_hash(modules: dict[str, LoraModule], dora: bool) -> str:
    """Hash of what the adapter computes: names, shapes, factor bytes, scales; not its path.

    The form is canonical (float32, PEFT orientation), so the same adapter hashes the
    same whether it was read from PEFT or mlx-lm files.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(b"dora" if dora else b"lora")
    for name in sorted(modules):
        m = modules[name]
        h.update(name.encode("utf-8") + b"\x00")
        h.update(repr(float(m.scale)).encode() + b"\x00")
        tensors = [m.a, m.b] + ([m.magnitude] if m.magnitude is not None else [])
        for t in tensors:
            t32 = np.ascontiguousarray(t, dtype=np.float32)
            h.update(repr(t32.shape).encode())
            h.update(t32.tobytes())
    return h.hexdigest()


def structure_hash(modules: dict[str, LoraModule], dora: bool) -> str:
    """Hash of the adapter's shape alone: names, factor shapes, scales; not the weights.

    Two adapters with the same structure get the same ``fixed``-mode null draws (a null's
    factors depend on its module's path, shapes and scale, never on the trained values),
    so measurements under those nulls can be shared between them.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(b"dora" if dora else b"lora")
    for name in sorted(modules):
        m = modules[name]
        h.update(name.encode("utf-8") + b"\x00")
        h.update(repr((float(m.scale), m.a.shape, m.b.shape)).encode() + b"\x00")
    return h.hexdigest()


@dataclass
class AdapterWeights:
    """A LoRA / DoRA adapter in canonical form, whatever format it came from."""

    fmt: AdapterFormat
    dora: bool
    modules: dict[str, LoraModule]
    config: dict[str, Any] = field(default_factory=dict)
    """The source adapter_config.json, as read."""
    content_hash: str = ""
    path: Path | None = None
    """Where it was read from (informational; not part of the hash)."""

    def __post_init__(self) -> None:
        if not self.modules:
            raise AdapterFormatError("the adapter holds no LoRA modules")
        if self.dora and any(m.magnitude is None for m in self.modules.values()):
            raise AdapterFormatError("a DoRA adapter needs a magnitude vector on every module")
        if not self.content_hash:
            self.content_hash = content_hash(self.modules, self.dora)

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def target_keys(self) -> list[str]:
        """Module names relative to their transformer block (``self_attn.q_proj``)."""
        return sorted({split_layer_name(n)[2] for n in self.modules})

    @property
    def layers(self) -> list[int]:
        """Indices of the transformer blocks holding at least one LoRA module."""
        return sorted({i for n in self.modules if (i := split_layer_name(n)[1]) is not None})

    @property
    def scales(self) -> dict[str, float]:
        return {n: m.scale for n, m in self.modules.items()}

    def nonfinite_tensors(self) -> list[str]:
        """Names of factors holding NaN or Inf (a diverged run): such an adapter is no answer."""
        bad = []
        for name, m in sorted(self.modules.items()):
            parts = {"lora_A": m.a, "lora_B": m.b, "magnitude": m.magnitude}
            bad += [
                f"{name}.{k}"
                for k, t in parts.items()
                if t is not None and not np.isfinite(t).all()
            ]
        return bad

    def frobenius_norms(self) -> dict[str, float]:
        """``‖ΔW‖_F`` of each module's low-rank update (DoRA: the direction update)."""
        return {n: m.frobenius_norm() for n, m in sorted(self.modules.items())}


def split_layer_name(name: str) -> tuple[str, int | None, str]:
    """``model.layers.3.self_attn.q_proj`` -> (``model.layers``, 3, ``self_attn.q_proj``)."""
    m = _LAYER_RE.match(name)
    if m is None:
        return "", None, name
    return m["prefix"], int(m["idx"]), m["suffix"]
