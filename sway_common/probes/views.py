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
from typing import Any

from sway_common.backend.views import ViewSpec
from sway_common.protocols import ScoringModel
from sway_common.types import TokenDist


def open_view(backend: Any, spec: ViewSpec) -> AbstractContextManager[ScoringModel]:
    """``backend.as_*()`` for ``spec``, through the public protocol methods only."""
    if spec.kind == "base":
        return backend.as_base()
    if spec.kind == "ft":
        return backend.as_finetuned()
    if spec.kind == "scaled":
        return backend.as_scaled_adapter(spec.lam)
    return backend.as_null_adapter(
        spec.seed, init_scale=spec.init_scale, rank_scale=spec.rank_scale, mode=spec.mode
    )


def next_token_dists_in_views(
    backend: Any, views: Sequence[ViewSpec], prompts: Sequence[str], *, top_k: int
) -> list[list[TokenDist]]:
    """One list of next-token distributions per view, stacked where the backend can."""
    stacked = getattr(backend, "next_token_dist_views", None)
    if stacked is not None:
        return stacked(list(views), list(prompts), top_k=top_k)
    out = []
    for spec in views:
        with open_view(backend, spec) as view:
            out.append(view.next_token_dist_batch(prompts, top_k=top_k))
    return out
