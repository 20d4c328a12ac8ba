"""Scoring several views of the same prompts at once (stacked views).

Where the backend can (``_install_stacked``), base, ft, λ-views and K nulls share
padded batches, and the blocks below the first adapted one run once per prompt
(the shared prefix); otherwise each view runs on its own through the one-view path.
The backend-neutral plan lives in :mod:`~sway_common.backend.stacking`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from sway_common.backend.batched import BatchedScoring
from sway_common.backend.scoring import length_buckets, text_hash
from sway_common.backend.stacking import StackedView, first_adapted_block, stack_plan
from sway_common.backend.views import PREFLIGHT_PROMPT, ViewSpec
from sway_common.protocols import ViewConflictError
from sway_common.types import TokenDist

# Bumped when the shared-block check changes, so outcomes of the old check are not read.
SHARED_CHECK_VERSION = 1


class StackedScoring(BatchedScoring):
    """:meth:`next_token_dist_views` and the stacked forward it runs on."""

    def next_token_dist_views(
        self, views: Sequence[ViewSpec], prompts: Sequence[str], *, top_k: int
    ) -> list[list[TokenDist]]:
        """Next-token distributions of the same prompts in several views: one list per view.

        Where the backend can, the views' rows share padded batches (one forward for
        base, ft, λ-views and K nulls; see :mod:`~sway_common.backend.stacking`);
        otherwise (DoRA, the dummy) each view runs on its own. Results go into the
        result cache under the one-view keys, so a later ``next_token_dist_batch`` in
        any of these views is a hit. No view may be open: the stacked layers stand in
        for all of them.
        """
        if self._active is not None:
            raise ViewConflictError(
                f"close the {self._active.label()} view before scoring stacked views"
            )
        found: dict[tuple[Any, ...], list[TokenDist | None]] = {}
        # Views missing the same prompts are stacked together (usually: all of them).
        groups: dict[tuple[int, ...], list[ViewSpec]] = {}
        for view in views:
            vkey = view.key(self.adapter_hash)
            if vkey in found:
                continue
            found[vkey] = [self._cache.get((vkey, "next", text_hash(p), top_k)) for p in prompts]
            todo = tuple(i for i, hit in enumerate(found[vkey]) if hit is None)
            if todo:
                groups.setdefault(todo, []).append(view)
        for todo, group in groups.items():
            fresh = self._views_next(group, [prompts[i] for i in todo], top_k)
            for view, dists in zip(group, fresh, strict=True):
                for i, dist in zip(todo, dists, strict=True):
                    found[view.key(self.adapter_hash)][i] = dist
        return [found[view.key(self.adapter_hash)] for view in views]  # type: ignore[misc]

    def _views_next(
        self, views: list[ViewSpec], prompts: list[str], top_k: int
    ) -> list[list[TokenDist]]:
        stacked = self._stacked_next(views, prompts, top_k) if len(views) > 1 else None
        if stacked is not None:
            return stacked
        out = []
        for view in views:
            with self._open(view):
                out.append(self.next_token_dists(view, prompts, top_k))
        return out

    def _stacked_next(
        self, views: list[ViewSpec], prompts: list[str], top_k: int
    ) -> list[list[TokenDist]] | None:
        """:meth:`_views_next` in stacked batches; None if the backend cannot stack."""
        if self.adapter_weights is None:
            return None  # the one-view path says why a non-base view cannot run
        stack = [self._stacked_member(view) for view in views]
        encoded = [self._encode_nonempty(p)[0] for p in prompts]
        tile_at = self._shared_block()
        n_views, n_prompts = stack_plan(
            len(stack),
            max(len(e) for e in encoded),
            batch_size=self.batch_size,
            max_context=self.max_context,
            vocab_size=self.vocab_size,
        )
        out: list[list[TokenDist | None]] = [[None] * len(prompts) for _ in views]
        for first in range(0, len(stack), n_views):
            part = range(first, min(len(stack), first + n_views))
            with self._stacked([stack[v] for v in part], tile_at) as forward:
                if forward is None:
                    return None
                # A prompt's rows in a step are one per view: its share of the step cost.
                share = self.step_tokens / len(part) if self.step_tokens else None
                for bucket in length_buckets([len(e) for e in encoded], n_prompts, share):
                    dists = forward([encoded[j] for j in bucket], top_k)
                    for n, (v, j) in enumerate((v, j) for v in part for j in bucket):
                        dist = dists[n]
                        out[v][j] = dist
                        vkey = views[v].key(self.adapter_hash)
                        self._cache.put((vkey, "next", text_hash(prompts[j]), top_k), dist)
        return out  # type: ignore[return-value]

    def _stacked_member(self, view: ViewSpec) -> StackedView:
        """What ``view``'s rows run with in a stacked batch (the dispatch of :meth:`_activate`)."""
        runs = view.runs
        if runs == "base":
            return StackedView(0.0)
        if runs == "scaled":
            return StackedView(view.lam)
        if runs == "null":
            return StackedView(1.0, self._null_draw(view))
        return StackedView(1.0)

    @contextlib.contextmanager
    def _stacked(
        self, stack: Sequence[StackedView], tile_at: str | None
    ) -> Iterator[Callable[[list[list[int]], int], list[TokenDist]] | None]:
        """The stacked layers installed for the block; yields the forward (None: cannot).

        The forward takes each prompt once and a top-k, and returns the prompt's
        next-token dists in every view of ``stack``, view-major; the real adapter is
        back in place on exit.
        """
        restore = self._install_stacked(stack, tile_at)
        if restore is None:
            yield None
            return

        def forward(batch: list[list[int]], top_k: int) -> list[TokenDist]:
            dists = self._last_dists(batch if tile_at else batch * len(stack), top_k)
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

    def _shared_block(self) -> str | None:
        """The block below which stacked views share their rows, checked once per adapter."""
        if self.adapter_hash not in self._shared_blocks:
            self._shared_blocks[self.adapter_hash] = self._kept_shared_block()
        return self._shared_blocks[self.adapter_hash]

    def _kept_shared_block(self) -> str | None:
        """:meth:`_check_shared_block`'s outcome, read from ``check_store`` when an earlier
        run checked the same model, adapter, dtype and framework versions: its two
        forwards were a quarter of a warm run's probe phase on a CPU."""
        assert self.adapter_weights is not None
        block = first_adapted_block(self.adapter_weights.modules)
        if block is None or block.rsplit(".", 1)[1] == "0":
            # Below block 0 lies only the embedding lookup: nothing worth a check's two
            # forwards (a third of a cold probe phase on an H100).
            return None
        store = self.check_store
        check = {"check": "shared_block", "block": block}
        key = store.key(self.info, check, [SHARED_CHECK_VERSION]) if store is not None else None
        if store is None or key is None:
            return self._check_shared_block(block)
        kept = store.get(key)
        if isinstance(kept, dict) and "block" in kept:
            return kept["block"]
        outcome = self._check_shared_block(block)
        store.put(key, {"block": outcome})
        return outcome

    def _check_shared_block(self, block: str) -> str | None:
        """``block``, if repeating rows there gives what unshared rows give.

        An architecture whose blocks take per-row arguments a backend does not repeat
        fails this (or raises) on two prompts of different lengths; every block then
        runs on every row. The tolerance only has to tell a wrong row from rounding.
        """
        batch = [self._encode_nonempty(t)[0] for t in (PREFLIGHT_PROMPT, "The quick brown")]
        stack = [StackedView(0.0), StackedView(1.0)]
        with self._stacked(stack, None) as forward:
            if forward is None:
                return None
            plain = _dense(forward(batch, self.vocab_size))
        try:
            with self._stacked(stack, block) as forward:
                shared = _dense(forward(batch, self.vocab_size)) if forward is not None else None
        except (RuntimeError, ValueError, TypeError, AttributeError, IndexError):
            return None
        atol = 1e-3 if getattr(self, "dtype", "float32") == "float32" else 0.25
        ok = shared is not None and np.allclose(shared, plain, rtol=0.0, atol=atol)
        return block if ok else None


def _dense(dists: list[TokenDist]) -> NDArray[np.float32]:
    """Whole-vocabulary dists as rows indexed by token id."""
    rows = np.empty((len(dists), dists[0].vocab_size), dtype=np.float32)
    for row, dist in zip(rows, dists, strict=True):
        row[dist.token_ids] = dist.logprobs
    return rows
