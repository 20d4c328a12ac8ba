"""Next-token distributions of the same prompts in several views, in as few forwards as possible.

A probe that compares views (base against ft, base against each λ) asks for all of them
at once. A backend with stacked views (``next_token_dist_views``) then puts every view's
rows into shared batches, and the blocks below the first adapted one run once per
prompt; any other backend (the null proxy, a plain protocol implementation) opens the
views one after another. Both give the same numbers within float32 tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

from sway_common.backend.views import ViewSpec
from sway_common.protocols import (
    DifferentialBackend,
    NullCalibratedBackend,
    ScalableDifferentialBackend,
    ScoringModel,
)
from sway_common.types import TokenDist


@runtime_checkable
class StackedViewsBackend(Protocol):
    """A backend that scores several views of the same prompts in shared batches."""

    def next_token_dist_views(
        self, views: Sequence[ViewSpec], prompts: Sequence[str], *, top_k: int
    ) -> list[list[TokenDist]]: ...


def open_view(backend: DifferentialBackend, spec: ViewSpec) -> AbstractContextManager[ScoringModel]:
    """``backend.as_*()`` for ``spec``, through the public protocol methods only."""
    if spec.kind == "base":
        return backend.as_base()
    if spec.kind == "ft":
        return backend.as_finetuned()
    if spec.kind == "scaled":
        if spec.modules is not None:
            raise TypeError(f"{type(backend).__name__} cannot scale a subset of the modules")
        if not isinstance(backend, ScalableDifferentialBackend):
            raise TypeError(f"{type(backend).__name__} has no scaled views")
        return backend.as_scaled_adapter(spec.lam)
    if not isinstance(backend, NullCalibratedBackend):
        raise TypeError(f"{type(backend).__name__} has no null views")
    null = spec.null_spec
    return backend.as_null_adapter(
        null.seed, init_scale=null.init_scale, rank_scale=null.rank_scale, mode=null.mode
    )


def next_token_dists_in_views(
    backend: DifferentialBackend, views: Sequence[ViewSpec], prompts: Sequence[str], *, top_k: int
) -> list[list[TokenDist]]:
    """One list of next-token distributions per view, stacked where the backend can."""
    if isinstance(backend, StackedViewsBackend):
        return backend.next_token_dist_views(list(views), list(prompts), top_k=top_k)
    out = []
    for spec in views:
        with open_view(backend, spec) as view:
            out.append(view.next_token_dist_batch(prompts, top_k=top_k))
    return out
