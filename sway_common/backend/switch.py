"""The one place a view is mapped onto the runtime's hooks, and the drawn nulls kept.

:class:`ViewSwitch` puts the model into a view and back: one view open at a time (a
second raises), the fine-tuned resting state restored on exit, also on exceptions. A
null's factors are drawn (:func:`~sway_common.backend.nulls.null_factors`) and placed
once per backend, before any hook runs, so a failing draw leaves the model as it was.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from sway_common.backend.nulls import PlacedNull, null_factors
from sway_common.backend.runtime import Runtime
from sway_common.backend.stacking import StackedView
from sway_common.backend.views import Restore, ViewSpec
from sway_common.protocols import ViewConflictError

# Drawn null factors kept per backend: all K nulls of a small adapter; a few of a large one.
NULL_DRAWS_KEPT_BYTES = 256 * 2**20


class ViewSwitch:
    """Which view the runtime's model is in; opens, closes and checks views."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.active: ViewSpec | None = None
        self._null_draws: OrderedDict[tuple[Any, ...], PlacedNull] = OrderedDict()

    @contextlib.contextmanager
    def opened(self, view: ViewSpec) -> Iterator[None]:
        """The model in ``view`` for the with-block; its resting state after it."""
        if self.active is not None:
            raise ViewConflictError(
                f"cannot enter the {view.label()} view while the {self.active.label()} "
                "view is open; close it first (views share one set of weights)"
            )
        restore = self._install(view)
        self.active = view
        try:
            yield
        finally:
            try:
                restore()
            finally:
                self.active = None

    def check_open(self, view: ViewSpec) -> None:
        """Refuse an op in a view that is not the open one (a handle used after its block)."""
        if self.active is not view:
            raise ViewConflictError(
                f"the {view.label()} view was used after it was closed; "
                "use a view only inside its with-block"
            )

    def _install(self, view: ViewSpec) -> Restore:
        """The fine-tuned state is the resting one, so ``ft`` has nothing to do."""
        runs = view.runs
        if runs == "base":
            return self.runtime.install_base()
        self._require_adapter(view)
        if runs == "scaled":
            return self.runtime.install_scaled(view.lam, view.modules)
        if runs == "null":
            return self.runtime.install_null(self.null_draw(view))
        return lambda: None

    def stacked_member(self, view: ViewSpec) -> StackedView:
        """What ``view``'s rows run with in a stacked batch (the dispatch of :meth:`_install`)."""
        runs = view.runs
        if runs == "base":
            return StackedView(0.0)
        if runs == "scaled":
            if view.modules is not None:
                self._check_modules(view.modules)
            return StackedView(view.lam, modules=view.modules)
        if runs == "null":
            return StackedView(1.0, self.null_draw(view))
        return StackedView(1.0)

    def _require_adapter(self, view: ViewSpec) -> None:
        if self.runtime.adapter_weights is None:
            raise ValueError(
                f"no adapter is loaded, so there is no {view.label()} view: only the base "
                "model (build the backend with an adapter_path)"
            )

    def _check_modules(self, modules: frozenset[str]) -> None:
        """A subset view names adapted modules only (the one-view path checks in
        ``views.scaled_slots``)."""
        weights = self.runtime.adapter_weights
        if weights is None:
            return  # the one-view path says why no scaled view can run
        unknown = modules - set(weights.modules)
        if unknown:
            shown = ", ".join(sorted(unknown)[:3])
            raise ValueError(f"the view scales modules the adapter does not adapt: {shown}")

    def null_draw(self, view: ViewSpec) -> PlacedNull:
        """The null's placed factors, drawn once per backend while they fit the byte budget:
        every probe of a suite opens the same K nulls."""
        self._require_adapter(view)
        weights = self.runtime.adapter_weights
        assert weights is not None
        key = view.key(self.runtime.adapter_hash)
        if (hit := self._null_draws.get(key)) is not None:
            self._null_draws.move_to_end(key)
            return hit
        placed = self.runtime.place_null(null_factors(weights.modules, view.null_spec))
        self._null_draws[key] = placed
        while sum(map(_nbytes, self._null_draws.values())) > NULL_DRAWS_KEPT_BYTES:
            self._null_draws.popitem(last=False)
        return placed

    def clear(self) -> None:
        self._null_draws.clear()


def _nbytes(placed: PlacedNull) -> int:
    return sum(factors.nbytes for factors in placed.values())
