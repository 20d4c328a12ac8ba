"""What a view is: which weights of the one loaded model it runs with, and its cache key.

A view (``base``, ``ft``, ``scaled(λ)``, ``null(NullSpec)``) is one set of weights of the
one loaded model; a ``scaled`` view may scale a subset of the adapted modules only
(``modules``), the others keeping their trained change. :class:`ViewSpec` names it and keys its results in the result cache;
:mod:`~sway_common.backend.scorer` scores in it and
:mod:`~sway_common.backend.switch` puts the model into it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

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

    ``lam`` is read by ``scaled`` views, ``null`` (required) by ``null`` views. ``modules``
    (``scaled`` views only): the adapted modules, by path, that ``lam`` scales; every other
    module keeps its trained change (None: all of them). With ``lam=0`` it leaves those
    modules out; over the complement of a group it keeps that group alone.
    """

    kind: ViewKind
    lam: float = 1.0
    null: NullSpec | None = None
    modules: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if (self.kind == "null") != (self.null is not None):
            raise ValueError("a null view needs its NullSpec, and only a null view has one")
        if self.modules is not None and self.kind != "scaled":
            raise ValueError("only a scaled view scales a subset of the modules")

    @property
    def runs(self) -> ViewKind:
        """The view that really runs: λ = 0 is the base model and λ = 1 the fine-tune.

        λ = 0 goes through the base switch rather than a zero scale: for DoRA a zero
        scale is not the base model (the magnitude still rescales every row), and the
        switch is exact and skips the LoRA matmuls. λ = 1 is the resting state itself,
        so it is exact too. Both then share the cache entries of the view they are.
        A subset view is the fine-tune when it scales no module; with ``lam = 0`` it is
        never taken for the base view (it cannot tell whether it names every module).
        """
        if self.kind == "scaled" and (self.lam == 1.0 or self.modules == frozenset()):
            return "ft"
        if self.kind == "scaled" and self.lam == 0.0 and self.modules is None:
            return "base"
        return self.kind

    def key(self, adapter_hash: str) -> tuple[Any, ...]:
        runs = self.runs
        if runs == "base":
            return ("base",)
        if runs == "ft":
            return ("ft", adapter_hash)
        if runs == "scaled":
            subset = () if self.modules is None else (modules_digest(self.modules),)
            return ("scaled", float(self.lam), adapter_hash, *subset)
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
        if self.kind == "scaled" and self.modules is not None:
            n = len(self.modules)
            return f"scaled(λ={self.lam:g} on {n} module{'s' if n != 1 else ''})"
        if self.kind == "scaled":
            return f"scaled(λ={self.lam:g})"
        if self.null is not None:
            return f"null(seed={self.null.seed}, {self.null.mode}, rank×{self.null.rank_scale:g})"
        return self.kind


def modules_digest(modules: Collection[str]) -> str:
    """A short content name for a set of module paths (part of a subset view's cache key)."""
    joined = "\x00".join(sorted(modules)).encode()
    return hashlib.blake2b(joined, digest_size=12).hexdigest()


class HasPath(Protocol):
    @property
    def path(self) -> str: ...


SlotT = TypeVar("SlotT", bound=HasPath)


def scaled_slots(slots: Sequence[SlotT], modules: Collection[str] | None) -> list[SlotT]:
    """The slots a scaled view changes: those in ``modules`` (all when None), in order.

    Both runtimes' ``install_scaled`` hand these to their ``lora.install_scaled``; the
    others stay in the resting, fine-tuned state.
    """
    if modules is None:
        return list(slots)
    unknown = set(modules) - {slot.path for slot in slots}
    if unknown:
        shown = ", ".join(sorted(unknown)[:3])
        raise ValueError(f"the view scales modules the adapter does not adapt: {shown}")
    return [slot for slot in slots if slot.path in modules]
