"""Each adapted module's base weight, as its top-k SVD: read once, kept on disk per base.

The weights are read through :class:`~sway_common.weight_reader.ModelWeights` (the
headers, then only the adapted modules' byte ranges; MLX-quantized weights
dequantized), the same reader as export-check's weight check. A module's randomized SVD
is kept as one ``.npz`` under ``<cache>/spectra/<model fingerprint>/``, named by the
hash of everything that decides it (module, k, sketch, seed, recipe); the fingerprint is
the null cache's (:func:`~sway_common.null_cache.model_fingerprint`: config, tokenizer,
weight files' names, sizes and times), so a changed model is read again, never matched.
A second run on the same base reads no base weight at all. Files are written whole or
not at all; one that cannot be read is recomputed and overwritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sway_common.null_cache import model_fingerprint
from sway_common.spectrum.svd import TopSVD, randomized_svd
from sway_common.weight_reader import ModelWeights, WeightReadError

# Part of every file name: change it whenever randomized_svd's output changes.
SPECTRUM_RECIPE = "rsvd-f32-qr/1"
CACHE_DIR = "spectra"


@dataclass(frozen=True)
class SketchSettings:
    """How a base weight's top-k SVD is drawn."""

    top_k: int = 32
    oversample: int = 8
    power_iters: int = 2
    seed: int = 0

    def key(self, module: str) -> str:
        text = f"{SPECTRUM_RECIPE}\0{module}\0{self.top_k}\0{self.oversample}"
        text += f"\0{self.power_iters}\0{self.seed}"
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class BaseSpectra:
    """The top-k SVDs of one model dir's weights, by module path, cached under ``cache``
    (None: computed every time)."""

    def __init__(
        self, model_dir: str | Path, cache: str | Path | None, settings: SketchSettings
    ) -> None:
        self.model_dir = Path(model_dir)
        self.settings = settings
        self.root = Path(cache) / CACHE_DIR / model_fingerprint(self.model_dir) if cache else None
        self._weights: ModelWeights | None = None
        self.computed = 0
        """How many SVDs this object drew (the others were read from the cache)."""

    @property
    def weights(self) -> ModelWeights:
        if self._weights is None:  # headers only, and only once a module is missing
            self._weights = ModelWeights(self.model_dir)
        return self._weights

    def get(self, module: str, shape: tuple[int, int]) -> TopSVD:
        """``module``'s top-k SVD; its weight must be ``shape`` (out, in), else
        :class:`WeightReadError`."""
        path = self.root / f"{self.settings.key(module)}.npz" if self.root else None
        cached = _load(path, shape) if path is not None else None
        if cached is not None:
            return cached
        w, _storage = self.weights.module_weight(module, shape)
        if tuple(w.shape) != tuple(shape):
            raise WeightReadError(
                f"{self.model_dir}: {module} is {tuple(w.shape)} but the adapter's factors "
                f"make {tuple(shape)}; the adapter was trained on another base model"
            )
        s = self.settings
        top = randomized_svd(
            w, s.top_k, oversample=s.oversample, power_iters=s.power_iters, seed=s.seed
        )
        self.computed += 1
        if path is not None:
            _save(path, top)
        return top


def _load(path: Path, shape: tuple[int, int]) -> TopSVD | None:
    try:
        with np.load(path) as data:
            top = TopSVD(
                data["u"].astype(np.float32),
                data["s"].astype(np.float64),
                data["v"].astype(np.float32),
                float(data["fro"]),
            )
    except (OSError, ValueError, KeyError, EOFError):
        return None  # missing or unreadable: recompute and overwrite
    if top.u.shape[0] != shape[0] or top.v.shape[0] != shape[1] or top.u.shape[1] != top.k:
        return None
    return top


def _save(path: Path, top: TopSVD) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with contextlib.suppress(OSError):  # a cache that cannot be written only costs time
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                np.savez(f, u=top.u, s=top.s, v=top.v, fro=np.float64(top.fro))
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
