"""Scoring several views of the same prompts at once (stacked views).

Where the runtime can (``install_stacked``), base, ft, λ-views and K nulls share padded
batches, and the blocks below the first adapted one run once per prompt (the shared
prefix); otherwise each view runs on its own through the one-view path. The
backend-neutral plan lives in :mod:`~sway_common.backend.stacking`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from sway_common.backend.runtime import Runtime
from sway_common.backend.scorer import Scorer
from sway_common.backend.scoring import filled, length_buckets, text_hash
from sway_common.backend.stacking import KeptResults, StackedView, first_adapted_block, stack_plan
from sway_common.backend.switch import ViewSwitch
from sway_common.backend.views import PREFLIGHT_PROMPT, ViewSpec
from sway_common.protocols import ViewConflictError
from sway_common.types import TokenDist

# Bumped when the shared-block check changes, so outcomes of the old check are not read.
SHARED_CHECK_VERSION = 1

StackedForward = Callable[[list[list[int]], int], list[TokenDist]]
"""Each prompt once and a top-k in; the prompts' next-token dists in every view out."""


class Stacker:
    """Next-token distributions of several views in shared batches."""

    def __init__(self, runtime: Runtime, switch: ViewSwitch, scorer: Scorer) -> None:
        self.runtime = runtime
        self.switch = switch
        self.scorer = scorer
        # Where the shared-block check's outcome is kept across runs (the runner hands
        # it the null cache); None: checked once per process.
        self.check_store: KeptResults | None = None
        # Per adapter hash: the block from which stacked views' rows differ, when
        # sharing the blocks below it checked out on this model (None: it did not).
        self.shared_blocks: dict[str, str | None] = {}

    def next_token_dist_views(
        self, views: Sequence[ViewSpec], prompts: Sequence[str], top_k: int
    ) -> list[list[TokenDist]]:
        """One list per view; results go into the result cache under the one-view keys."""
        if self.switch.active is not None:
            raise ViewConflictError(
                f"close the {self.switch.active.label()} view before scoring stacked views"
            )
        cache, adapter = self.scorer.cache, self.runtime.adapter_hash
        found: dict[tuple[Any, ...], list[TokenDist | None]] = {}
        # Views missing the same prompts are stacked together (usually: all of them).
        groups: dict[tuple[int, ...], list[ViewSpec]] = {}
        for view in views:
            vkey = view.key(adapter)
            if vkey in found:
                continue
            found[vkey] = [cache.get((vkey, "next", text_hash(p), top_k)) for p in prompts]
            todo = tuple(i for i, hit in enumerate(found[vkey]) if hit is None)
            if todo:
                groups.setdefault(todo, []).append(view)
        for todo, group in groups.items():
            fresh = self._views_next(group, [prompts[i] for i in todo], top_k)
            for view, dists in zip(group, fresh, strict=True):
                for i, dist in zip(todo, dists, strict=True):
                    found[view.key(adapter)][i] = dist
        return [filled(found[view.key(adapter)]) for view in views]

    def _views_next(
        self, views: list[ViewSpec], prompts: list[str], top_k: int
    ) -> list[list[TokenDist]]:
        stacked = self._stacked_next(views, prompts, top_k) if len(views) > 1 else None
        if stacked is not None:
            return stacked
        out = []
        for view in views:
            with self.switch.opened(view):
                out.append(self.scorer.next_token_dists(view, prompts, top_k))
        return out

    def _stacked_next(
        self, views: list[ViewSpec], prompts: list[str], top_k: int
    ) -> list[list[TokenDist]] | None:
        """:meth:`_views_next` in stacked batches; None if the runtime cannot stack."""
        runtime = self.runtime
        if runtime.adapter_weights is None:
            return None  # the one-view path says why a non-base view cannot run
        stack = [self.switch.stacked_member(view) for view in views]
        encoded = [self.scorer.encoded_ids(p) for p in prompts]
        tile_at = self.shared_block()
        n_views, n_prompts = stack_plan(
            len(stack),
            max(len(e) for e in encoded),
            batch_size=runtime.batch_size,
            max_context=runtime.max_context,
            vocab_size=runtime.vocab_size,
        )
        out: list[list[TokenDist | None]] = [[None] * len(prompts) for _ in views]
        for first in range(0, len(stack), n_views):
            part = range(first, min(len(stack), first + n_views))
            with self._stacked([stack[v] for v in part], tile_at) as forward:
                if forward is None:
                    return None
                # A prompt's rows in a step are one per view: its share of the step cost.
                share = runtime.step_tokens / len(part) if runtime.step_tokens else None
                for bucket in length_buckets([len(e) for e in encoded], n_prompts, share):
                    dists = iter(forward([encoded[j] for j in bucket], top_k))
                    for v in part:
                        vkey = views[v].key(runtime.adapter_hash)
                        for j in bucket:
                            out[v][j] = dist = next(dists)
                            self.scorer.cache.put(
                                (vkey, "next", text_hash(prompts[j]), top_k), dist
                            )
        return [filled(row) for row in out]

    @contextlib.contextmanager
    def _stacked(
        self, stack: Sequence[StackedView], tile_at: str | None
    ) -> Iterator[StackedForward | None]:
        """The stacked layers installed for the block; yields the forward (None: cannot).

        The forward returns each prompt's next-token dists in every view of ``stack``,
        view-major; the real adapter is back in place on exit.
        """
        restore = self.runtime.install_stacked(stack, tile_at)
        if restore is None:
            yield None
            return

        def forward(batch: list[list[int]], top_k: int) -> list[TokenDist]:
            dists = self.runtime.last_dists(batch if tile_at else batch * len(stack), top_k)
            if len(dists) != len(stack) * len(batch):
                raise RuntimeError(
                    f"stacked forward gave {len(dists)} rows, expected "
                    f"{len(stack)} views × {len(batch)} prompts"
                )
            return dists

        try:
            yield forward
        finally:
            restore()

    def shared_block(self) -> str | None:
        """The block below which stacked views share their rows, checked once per adapter."""
        adapter = self.runtime.adapter_hash
        if adapter not in self.shared_blocks:
            self.shared_blocks[adapter] = self._kept_shared_block()
        return self.shared_blocks[adapter]

    def _kept_shared_block(self) -> str | None:
        """:meth:`check_shared_block`'s outcome, read from ``check_store`` when an earlier
        run checked the same model, adapter, dtype and framework versions: its two
        forwards weigh on a warm run's probe phase (docs/benchmarks.md)."""
        weights = self.runtime.adapter_weights
        assert weights is not None
        block = first_adapted_block(weights.modules)
        if block is None or block.rsplit(".", 1)[1] == "0":
            # Below block 0 lies only the embedding lookup: nothing worth a check's two
            # forwards.
            return None
        store = self.check_store
        check = {"check": "shared_block", "block": block}
        key = store.key(self.runtime.info, check, [SHARED_CHECK_VERSION]) if store else None
        if store is None or key is None:
            return self.check_shared_block(block)
        kept = store.get(key)
        if isinstance(kept, dict) and "block" in kept:
            return kept["block"]
        outcome = self.check_shared_block(block)
        store.put(key, {"block": outcome})
        return outcome

    def check_shared_block(self, block: str) -> str | None:
        """``block``, if repeating rows there gives what unshared rows give.

        An architecture whose blocks take per-row arguments a runtime does not repeat
        fails this (or raises) on two prompts of different lengths; every block then
        runs on every row. The tolerance only has to tell a wrong row from rounding.
        """
        batch = [self.scorer.encoded_ids(t) for t in (PREFLIGHT_PROMPT, "The quick brown")]
        stack = [StackedView(0.0), StackedView(1.0)]
        vocab = self.runtime.vocab_size
        with self._stacked(stack, None) as forward:
            if forward is None:
                return None
            plain = _dense(forward(batch, vocab))
        try:
            with self._stacked(stack, block) as forward:
                shared = _dense(forward(batch, vocab)) if forward is not None else None
        except (RuntimeError, ValueError, TypeError, AttributeError, IndexError):
            return None
        atol = 1e-3 if self.runtime.dtype == "float32" else 0.25
        ok = shared is not None and np.allclose(shared, plain, rtol=0.0, atol=atol)
        return block if ok else None

    def clear(self) -> None:
        self.shared_blocks.clear()


def _dense(dists: list[TokenDist]) -> NDArray[np.float32]:
    """Whole-vocabulary dists as rows indexed by token id."""
    rows = np.empty((len(dists), dists[0].vocab_size), dtype=np.float32)
    for row, dist in zip(rows, dists, strict=True):
        row[dist.token_ids] = dist.logprobs
    return rows
