"""Control adapters: what a verdict must not PASS, built from a real adapter's shape.

A random adapter with the same modules, ranks and scales (at the real adapter's
per-module norm, or at a fixed init scale) and the real adapter with B shrunk toward
zero. The false-positive benchmark and the verdict tests feed these in as "the adapter".
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from sway_common.adapters.weights import AdapterWeights, LoraModule

# Far from the seeds null calibration draws (seed_base 1000 + k), so a control is never a null.
CONTROL_SEED_BASE = 50_000


def random_like(w: AdapterWeights, seed: int, *, init_scale: float | None = None) -> AdapterWeights:
    """Gaussian factors of ``w``'s shape; at ``w``'s per-module ΔW norm unless ``init_scale``."""
    rng = np.random.default_rng([CONTROL_SEED_BASE, seed])
    modules = {}
    for name, m in sorted(w.modules.items()):
        std = init_scale or 1.0
        a = rng.normal(0.0, std, m.a.shape).astype(np.float32)
        b = rng.normal(0.0, std, m.b.shape).astype(np.float32)
        drawn = LoraModule(a=a, b=b, scale=m.scale)
        if init_scale is None:
            b *= np.float32(m.frobenius_norm() / max(drawn.frobenius_norm(), 1e-30))
        modules[name] = LoraModule(a=a, b=b, scale=m.scale)
    return AdapterWeights(fmt="peft", dora=False, modules=modules, config=dict(w.config))


def shrink_b(w: AdapterWeights, factor: float = 1e-4) -> AdapterWeights:
    """``w`` with every B multiplied by ``factor``: the learned direction, almost no effect."""
    modules = {
        n: replace(m, b=(m.b * np.float32(factor)).astype(np.float32)) for n, m in w.modules.items()
    }
    return AdapterWeights(fmt=w.fmt, dora=w.dora, modules=modules, config=dict(w.config))
