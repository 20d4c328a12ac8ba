"""Stacked views: the rows of one padded batch carry different views of the adapter.

Two views of one LoRA adapter differ only in each adapted module's factors and scale,
so one forward can serve many: each LoRA layer adds ``scale_v · B_v (A_v x)`` to the
rows of view ``v``. Rows are laid out view-major (every prompt of view 0, then every
prompt of view 1, ...), so a layer finds a row's view from the batch size alone and
needs no per-batch state: with ``V`` views, row ``i`` of ``N`` belongs to view
``i // (N / V)``, and reshaping ``(N, ..., in)`` to ``(V, -1, in)`` groups them.

The base model is the view with scale 0 (its delta is exactly zero), so it rides in
the same batch. Below the first decoder block that holds an adapted module every view
computes the same hidden states; those blocks run once on the unique prompts and the
rows are repeated per view only from that block on (the shared prefix).

This module holds the backend-neutral half: what each view contributes and how many
rows one step may hold. The backends' ``lora.py`` install the layers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sway_common.backend import limits
from sway_common.backend.nulls import PlacedNull


@dataclass(frozen=True, slots=True)
class StackedView:
    """One row group of a stacked batch.

    ``scale`` multiplies each module's trained scale (0: the base model, λ: a scaled
    view, 1: the fine-tune or a null); ``factors`` are a null's factors as the runtime
    placed them (``Runtime.place_null``), or None for the trained ones. ``modules``: the
    modules ``scale`` applies to, the others at their trained scale (None: all of them).
    """

    scale: float
    factors: PlacedNull | None = None
    modules: frozenset[str] | None = None

    def scale_of(self, path: str) -> float:
        """What module ``path``'s trained scale is multiplied by in this view."""
        return self.scale if self.modules is None or path in self.modules else 1.0


# A module path inside a numbered list of decoder blocks: "model.layers.22.self_attn.q_proj".
_IN_BLOCK = re.compile(r"^(?P<blocks>.+?)\.(?P<index>\d+)\.")


def first_adapted_block(paths: Iterable[str]) -> str | None:
    """Path of the lowest decoder block holding an adapted module ("model.layers.22").

    None when some adapted module sits outside a numbered block list (an LM head, say)
    or the modules span two lists: then no prefix is common to every view.
    """
    found = [_IN_BLOCK.match(p) for p in paths]
    if not found or any(m is None for m in found):
        return None
    lists = {m["blocks"] for m in found if m}
    if len(lists) != 1:
        return None
    return f"{lists.pop()}.{min(int(m['index']) for m in found if m)}"


def stack_plan(
    n_views: int, longest: int, *, batch_size: int, max_context: int, vocab_size: int
) -> tuple[int, int]:
    """(views, prompts) of one stacked step, for prompts of at most ``longest`` tokens.

    A step holds as many tokens as a one-view batch of full windows (``batch_size``
    rows of ``max_context`` tokens), so its activations fit wherever those do, and no
    more rows than the logit budget allows at the last position. Short prompts thus
    get many rows per step: on a CPU the per-step overhead dominates small steps
    (docs/benchmarks.md).
    """
    rows = int(batch_size) * int(max_context) // max(1, int(longest))
    rows = max(1, min(rows, limits.LOGIT_BUDGET // max(1, int(vocab_size))))
    views = max(1, min(int(n_views), rows))
    return views, max(1, rows // views)


class KeptResults(Protocol):
    """Results kept across runs under content keys (:class:`sway_common.null_cache.NullCache`)."""

    def key(
        self, info: dict[str, Any], draw: dict[str, Any], measurement: Sequence[Any]
    ) -> str | None: ...

    def get(self, key: str) -> Any | None: ...

    def put(self, key: str, value: Any) -> None: ...
