"""Copies of a trained PEFT adapter that a verdict must not mistake for a trained one.

- ``random_at_norm``: Gaussian A and B rescaled so each module's ΔW = B·A has the trained
  adapter's Frobenius norm: same size, no learned direction.
- ``b_scaled``: B multiplied by a tiny factor (B ≈ 0): the adapter barely exists.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

WEIGHTS = "adapter_model.safetensors"


def edited_peft(src: Path, dst: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(dst / WEIGHTS))
    return dst


def random_at_norm(src: Path, dst: Path, seed: int = 7) -> Path:
    def edit(t: dict[str, np.ndarray]) -> None:
        rng = np.random.default_rng(seed)
        for ka in sorted(k for k in t if "lora_A" in k):
            kb = ka.replace("lora_A", "lora_B")
            a, b = t[ka].astype(np.float64), t[kb].astype(np.float64)
            na, nb = rng.normal(size=a.shape), rng.normal(size=b.shape)
            # Split the rescale over both factors so neither is oddly small.
            s = np.sqrt(np.linalg.norm(b @ a) / np.linalg.norm(nb @ na))
            t[ka], t[kb] = (na * s).astype(t[ka].dtype), (nb * s).astype(t[kb].dtype)

    return edited_peft(src, dst, edit)


def b_scaled(src: Path, dst: Path, factor: float = 1e-4) -> Path:
    def edit(t: dict[str, np.ndarray]) -> None:
        for k in t:
            if "lora_B" in k:
                t[k] = (t[k] * factor).astype(t[k].dtype)

    return edited_peft(src, dst, edit)
