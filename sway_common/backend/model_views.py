"""One loaded model, many views: the differential backend every probe talks to.

:class:`ModelViews` owns a :class:`~sway_common.backend.runtime.Runtime` (the
framework's hooks) and the shared machinery built around it, one job per module:

- :mod:`~sway_common.backend.switch`: which view the model is in (one at a time) and
  the drawn nulls;
- :mod:`~sway_common.backend.scorer`: the cached, batched ops of one view and the
  handle ``with backend.as_*()`` yields;
- :mod:`~sway_common.backend.stacker`: several views' rows in shared batches.

Here: the public surface (the protocols of :mod:`sway_common.protocols`), preflight
checks, ``describe`` and ``close``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from sway_common.adapters.weights import AdapterWeights, structure_hash
from sway_common.backend.nulls import DEFAULT_INIT_SCALE, NullSpec
from sway_common.backend.runtime import Runtime
from sway_common.backend.scorer import BackendView, Scorer
from sway_common.backend.stacker import Stacker
from sway_common.backend.stacking import KeptResults
from sway_common.backend.switch import ViewSwitch
from sway_common.backend.views import PREFLIGHT_PROMPT, ViewSpec
from sway_common.fast_paths import fast_paths_enabled
from sway_common.protocols import NullMode, ViewConflictError
from sway_common.types import TokenDist


class ModelViews:
    """Base, fine-tuned, λ-scaled and null views of one runtime's model and adapter.

    Implements :class:`~sway_common.protocols.NullCalibratedBackend`,
    :class:`~sway_common.protocols.ScalableDifferentialBackend`,
    :class:`~sway_common.protocols.PreflightCheckable` and
    :class:`~sway_common.protocols.EmbeddingBackend`. Views share one set of weights:
    entering one while another is open raises :class:`ViewConflictError`.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.switch = ViewSwitch(runtime)
        self.scorer = Scorer(runtime, self.switch)
        self.stacker = Stacker(runtime, self.switch, self.scorer)

    # ------------------------------------------------------------ what is loaded
    @property
    def info(self) -> dict[str, Any]:
        return self.runtime.info

    @property
    def adapter_hash(self) -> str:
        return self.runtime.adapter_hash

    @property
    def adapter_weights(self) -> AdapterWeights | None:
        return self.runtime.adapter_weights

    @property
    def tokenizer(self) -> Any:
        return self.runtime.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.runtime.vocab_size

    @property
    def max_context(self) -> int:
        return self.runtime.max_context

    @property
    def batch_size(self) -> int:
        return self.runtime.batch_size

    @property
    def prompt_limit(self) -> int | None:
        """The most tokens a prompt may have: the context window (None: no limit)."""
        return self.runtime.prompt_limit

    @property
    def check_store(self) -> KeptResults | None:
        """Where checks of this model are kept across runs (the runner's null cache)."""
        return self.stacker.check_store

    @check_store.setter
    def check_store(self, store: KeptResults | None) -> None:
        self.stacker.check_store = store

    def token_count(self, text: str) -> int:
        """How many tokens ``text`` is, counted as every scoring call counts them."""
        return len(self.scorer.encoded(text)[0])

    def peak_memory_bytes(self) -> int | None:
        return self.runtime.peak_memory_bytes()

    def set_adapter(self, adapter_path: str | Path) -> None:
        """Swap in another adapter of the same base model without reloading the base.

        Base-view results stay cached (their key holds no adapter); adapter views are
        keyed by the new adapter's content hash. On failure the previous adapter stays.
        """
        if self.switch.active is not None:
            raise ViewConflictError("close the open view before changing the adapter")
        self.runtime.set_adapter(adapter_path)

    # --------------------------------------------------------------------- views
    @contextlib.contextmanager
    def open(self, view: ViewSpec) -> Iterator[BackendView]:
        """The model in ``view`` for the with-block, as a scoring handle."""
        with self.switch.opened(view):
            yield BackendView(self.scorer, view)

    def as_base(self) -> contextlib.AbstractContextManager[BackendView]:
        return self.open(ViewSpec("base"))

    def as_finetuned(self) -> contextlib.AbstractContextManager[BackendView]:
        return self.open(ViewSpec("ft"))

    def as_scaled_adapter(self, lam: float) -> contextlib.AbstractContextManager[BackendView]:
        if not np.isfinite(lam):
            raise ValueError(f"lam must be finite, got {lam}")
        return self.open(ViewSpec("scaled", lam=float(lam)))

    def as_null_adapter(
        self,
        seed: int,
        *,
        init_scale: float = DEFAULT_INIT_SCALE,
        rank_scale: float = 1.0,
        mode: NullMode = "fixed",
    ) -> contextlib.AbstractContextManager[BackendView]:
        null = NullSpec(int(seed), float(init_scale), float(rank_scale), mode)
        return self.open(ViewSpec("null", null=null))

    @property
    def active_view(self) -> ViewSpec | None:
        return self.switch.active

    def next_token_dist_views(
        self, views: Sequence[ViewSpec], prompts: Sequence[str], *, top_k: int
    ) -> list[list[TokenDist]]:
        """Next-token distributions of the same prompts in several views: one list per view.

        Where the runtime can, the views' rows share padded batches (one forward for
        base, ft, λ-views and K nulls); otherwise (DoRA, the dummy) each view runs on
        its own. Results go into the result cache under the one-view keys, so a later
        ``next_token_dist_batch`` in any of these views is a hit. No view may be open.
        """
        return self.stacker.next_token_dist_views(views, prompts, top_k)

    def mean_hidden_states(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """One row per text: the base model's last hidden states averaged over its tokens.

        Always in the base view, so a topic map of prompts cannot move with the adapter
        under test. A text longer than the context keeps its last ``max_context`` tokens.
        """
        with self.switch.opened(ViewSpec("base")):
            return self.scorer.mean_hidden(texts)

    # ----------------------------------------------------------------- preflight
    def preflight_finite_check(self) -> tuple[bool, str]:
        bad = self.runtime.nonfinite_adapter_tensors()
        if bad:
            shown = ", ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
            return False, f"adapter weights hold NaN/Inf in {len(bad)} tensor(s): {shown}"
        views = [ViewSpec("base"), ViewSpec("ft")] if self.adapter_weights else [ViewSpec("base")]
        for view in views:
            row = self._preflight_row(view)
            if not np.all(np.isfinite(row)):
                return False, f"{view.label()} view gives non-finite logits"
            if float(row.max() - row.min()) < 1e-6:
                return False, f"{view.label()} view gives a uniform distribution (broken LM head?)"
        return True, "base and fine-tuned views give finite logits"

    def _preflight_row(self, view: ViewSpec) -> NDArray[np.float32]:
        """The preflight prompt's next-token row in one view: run once per view and adapter,
        since both preflight checks read the same rows (on a CPU they were a quarter of a
        warm run's probe phase)."""
        with self.switch.opened(view):
            key = (view.key(self.adapter_hash), "preflight")
            row = self.scorer.cache.get(key)
            if row is None:
                row = self.runtime.last_logprobs([self.runtime.encode(PREFLIGHT_PROMPT)[0]])[0]
                self.scorer.cache.put(key, row)
            return row

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
        rows = [self._preflight_row(ViewSpec(kind)) for kind in ("base", "ft")]
        if np.array_equal(rows[0], rows[1]):
            return False, (
                f"the adapter is a no-op: with its {where} attached the model's logits equal "
                f"the base model's bit for bit (dtype {self.runtime.dtype})"
            )
        return True, "the adapter changes the model's logits"

    @contextlib.contextmanager
    def weights_replaced(self, weights: Mapping[str, NDArray[np.float32]]) -> Iterator[None]:
        """For the with-block, the named modules' weights replaced
        (:meth:`Runtime.install_weights`): another model. The result cache is emptied on
        the way in and out, so no result of one model is read back as the other's. No
        view may be open."""
        if self.switch.active is not None:
            raise ViewConflictError("close the open view before replacing weights")
        restore = self.runtime.install_weights(weights)
        self.scorer.cache.clear()
        try:
            yield
        finally:
            restore()
            self.scorer.cache.clear()

    # ------------------------------------------------------------------- closing
    def close(self) -> None:
        self.scorer.clear()
        self.switch.clear()
        self.runtime.release()

    def __enter__(self) -> ModelViews:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def framework_versions(dists: Sequence[str]) -> dict[str, str | None]:
    """Installed versions of the packages a runtime computes with (None: not installed)."""
    out: dict[str, str | None] = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _structure(weights: AdapterWeights | None) -> str:
    return structure_hash(weights.modules, weights.dora) if weights is not None else ""


def describe(
    runtime: Runtime,
    name: str,
    model: str,
    device: str,
    slots: Sequence[Any],
    **extra: Any,
) -> dict[str, Any]:
    """The ``info`` a runtime reports: what is loaded and how the adapter is shaped.

    ``slots`` are the runtime's adapted modules (anything with ``rank``, ``path``, ``dora``).
    """
    ranks = sorted({s.rank for s in slots})
    return {
        "backend": name,
        "frameworks": framework_versions(runtime.frameworks),
        "model": model,
        "model_dir": str(runtime.model_dir),
        "adapter": str(runtime.adapter_path),
        "adapter_hash": runtime.adapter_hash,
        # The null cache shares fixed-mode nulls between adapters of one structure.
        "adapter_shape": _structure(runtime.adapter_weights),
        "dtype": runtime.dtype,
        "device": device,
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "targets": sorted({s.path.rsplit(".", 1)[-1] for s in slots}),
        "modules": len(slots),
        "dora": any(s.dora for s in slots),
        "max_context": runtime.max_context,
        "batch_size": runtime.batch_size,
        # Part of the null cache's key: a run with the fast paths off recomputes its nulls.
        "fast_paths": fast_paths_enabled(),
        **extra,
    }
