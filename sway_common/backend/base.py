"""The shared half of every differential backend: views, caching, batching, scoring.

A concrete backend (MLX, HF, dummy) subclasses :class:`DifferentialBackendBase` and
supplies only the model-specific hooks (listed in :mod:`~sway_common.backend.dispatch`).
Everything a probe calls lives in the shared half once, so the backends cannot drift
apart on tokenisation boundaries, tail mass, cache keys, window plans or what a view
means. It is built in layers, one job each:

- :mod:`~sway_common.backend.views`: :class:`ViewSpec` (what a view is, its cache key)
  and :class:`BackendView` (what ``with backend.as_*()`` yields);
- :mod:`~sway_common.backend.dispatch`: the hooks, and the one place a view is mapped
  onto them (``_activate``, the ``as_*`` context managers, the null draw);
- :mod:`~sway_common.backend.batched`: one view's scoring ops, batched and cached;
- :mod:`~sway_common.backend.multiview`: several views' rows in shared batches;
- here: the class backends subclass, its preflight checks, ``close`` and ``describe``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

import numpy as np
from numpy.typing import NDArray

from sway_common.backend.multiview import StackedScoring
from sway_common.backend.views import (
    PREFLIGHT_PROMPT,
    BackendView,
    Encoding,
    Restore,
    ViewKind,
    ViewSpec,
)

__all__ = [
    "PREFLIGHT_PROMPT",
    "BackendView",
    "DifferentialBackendBase",
    "Encoding",
    "Restore",
    "ViewKind",
    "ViewSpec",
    "describe",
]


def framework_versions(dists: Sequence[str]) -> dict[str, str | None]:
    """Installed versions of the packages a backend computes with (None: not installed)."""
    out: dict[str, str | None] = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def describe(
    backend: DifferentialBackendBase,
    name: str,
    model: str,
    device: str,
    slots: Sequence[Any],
    **extra: Any,
) -> dict[str, Any]:
    """The ``info`` a backend reports: what is loaded and how the adapter is shaped.

    ``slots`` are the backend's adapted modules (anything with ``rank``, ``path``, ``dora``).
    """
    ranks = sorted({s.rank for s in slots})
    return {
        "backend": name,
        "frameworks": framework_versions(backend.frameworks),
        "model": model,
        "model_dir": str(getattr(backend, "model_dir", "")),
        "adapter": str(getattr(backend, "adapter_path", "")),
        "adapter_hash": backend.adapter_hash,
        "dtype": getattr(backend, "dtype", None),
        "device": device,
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "targets": sorted({s.path.rsplit(".", 1)[-1] for s in slots}),
        "modules": len(slots),
        "dora": any(s.dora for s in slots),
        "max_context": backend.max_context,
        "batch_size": backend.batch_size,
        **extra,
    }


class DifferentialBackendBase(StackedScoring):
    """One loaded model, many views. Subclasses set the attributes and supply the hooks
    of :class:`~sway_common.backend.dispatch.ViewDispatch`."""

    # ------------------------------------------------------------- preflight
    def preflight_finite_check(self) -> tuple[bool, str]:
        bad = self._nonfinite_adapter_tensors()
        if bad:
            shown = ", ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
            return False, f"adapter weights hold NaN/Inf in {len(bad)} tensor(s): {shown}"
        openers = (self.as_base, self.as_finetuned) if self.adapter_weights else (self.as_base,)
        for opener in openers:
            row, label = self._preflight_row(opener)
            if not np.all(np.isfinite(row)):
                return False, f"{label} view gives non-finite logits"
            if float(row.max() - row.min()) < 1e-6:
                return False, f"{label} view gives a uniform distribution (broken LM head?)"
        return True, "base and fine-tuned views give finite logits"

    def _preflight_row(self, opener: Callable[[], Any]) -> tuple[NDArray[np.float32], str]:
        """The preflight prompt's next-token row in one view, and the view's label: run
        once per view and adapter, since both preflight checks read the same rows (on a
        CPU they were a quarter of a warm run's probe phase)."""
        with opener() as view:
            key = (view.spec.key(self.adapter_hash), "preflight")
            row = self._cache.get(key)
            if row is None:
                row = self._last_logprobs([self._encode(PREFLIGHT_PROMPT)[0]])[0]
                self._cache.put(key, row)
            return row, view.spec.label()

    def preflight_noop_check(self) -> tuple[bool, str]:
        """Does the adapter change the model at all? ``(ok, reason)``.

        A zero ΔW in every module (B = 0: an untrained adapter, a step-0 checkpoint, scale
        0) or fine-tuned logits bit-identical to the base model's on the preflight prompt
        (an adapter attached where it changes nothing, or a change lost to the dtype's
        rounding) is a no-op. Reported before any probe: a probe would only find it as a
        quiet FAIL. DoRA skips the ΔW test (a moved magnitude alone changes the model).
        """
        weights = self.adapter_weights
        if weights is None:
            return True, "no adapter is loaded"
        norms = weights.frobenius_norms()
        where = f"{len(norms)} module{'s' if len(norms) != 1 else ''}"
        if not weights.dora and all(n == 0.0 for n in norms.values()):
            return False, (
                f"the adapter is a no-op: ΔW = scale·B·A is zero in each of the {where} it "
                "targets (untrained, a step-0 checkpoint, or scale 0?)"
            )
        rows = [self._preflight_row(opener)[0] for opener in (self.as_base, self.as_finetuned)]
        if np.array_equal(rows[0], rows[1]):
            return False, (
                f"the adapter is a no-op: with its {where} attached the model's logits equal "
                f"the base model's bit for bit (dtype {getattr(self, 'dtype', '?')})"
            )
        return True, "the adapter changes the model's logits"

    # --------------------------------------------------------------- closing
    def close(self) -> None:
        self._cache.clear()
        self._encodings.clear()
        self._null_draws.clear()
        self._release()

    def __enter__(self) -> DifferentialBackendBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
