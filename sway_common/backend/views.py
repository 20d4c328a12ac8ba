"""What a view is: which weights of the one loaded model it runs with, and its cache key.

A view (``base``, ``ft``, ``scaled(λ)``, ``null(NullSpec)``) is one set of weights of the
one loaded model. :class:`ViewSpec` names it and keys its results in the result cache;
:mod:`~sway_common.backend.scorer` scores in it and
:mod:`~sway_common.backend.switch` puts the model into it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from sway_common.backend.nulls import NullSpec

Encoding = tuple[list[int], list[tuple[int, int]]]
"""Token ids and each token's (start, end) character span."""

ViewKind = Literal["base", "ft", "scaled", "null"]
Restore = Callable[[], None]
"""Undoes a view: brings the model back to its resting, fine-tuned state."""

PREFLIGHT_PROMPT = "The quick brown fox jumps over the lazy dog. The answer is"


def guarded(restore: Restore, change: Callable[[], None]) -> Restore:
    """Run ``change``, the model's move into a view; undo it if it raises; return the undo.

    Every install hook of both backends ends here, so a failing install never leaves the
    model half in a view.
    """
    try:
        change()
    except BaseException:
        restore()
        raise
    return restore


@dataclass(frozen=True, slots=True)
class ViewSpec:
    """Which weights a view runs with. ``key()`` identifies its results in the cache.

    ``lam`` is read by ``scaled`` views, ``null`` (required) by ``null`` views.
    """

    kind: ViewKind
    lam: float = 1.0
    null: NullSpec | None = None

    def __post_init__(self) -> None:
        if (self.kind == "null") != (self.null is not None):
            raise ValueError("a null view needs its NullSpec, and only a null view has one")

    @property
    def runs(self) -> ViewKind:
        """The view that really runs: λ = 0 is the base model and λ = 1 the fine-tune.

        λ = 0 goes through the base switch rather than a zero scale: for DoRA a zero
        scale is not the base model (the magnitude still rescales every row), and the
        switch is exact and skips the LoRA matmuls. λ = 1 is the resting state itself,
        so it is exact too. Both then share the cache entries of the view they are.
        """
        if self.kind == "scaled" and self.lam == 0.0:
            return "base"
        if self.kind == "scaled" and self.lam == 1.0:
            return "ft"
        return self.kind

    def key(self, adapter_hash: str) -> tuple[Any, ...]:
        runs = self.runs
        if runs == "base":
            return ("base",)
        if runs == "ft":
            return ("ft", adapter_hash)
        if runs == "scaled":
            return ("scaled", float(self.lam), adapter_hash)
        null = self.null_spec
        return (
            "null",
            int(null.seed),
            float(null.init_scale),
            float(null.rank_scale),
            null.mode,
            adapter_hash,
        )

    @property
    def null_spec(self) -> NullSpec:
        if self.null is None:
            raise ValueError(f"the {self.label()} view draws no null")
        return self.null

    def label(self) -> str:
        if self.kind == "scaled":
            return f"scaled(λ={self.lam:g})"
        if self.null is not None:
            return f"null(seed={self.null.seed}, {self.null.mode}, rank×{self.null.rank_scale:g})"
        return self.kind
