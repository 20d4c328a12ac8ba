"""The shared half of every differential backend: views, caching, batching, scoring.

A concrete backend (MLX, HF, dummy) subclasses :class:`DifferentialBackendBase` and
supplies only the model-specific hooks:

- ``_install_base()``, ``_install_scaled(lam)``, ``_install_null(factors)``: put the
  model into that view and return the function that brings back the fine-tuned state
  (the real backends forward each to the same-named function of their ``lora.py``);
- ``_last_logprobs(batch)``: log-softmax at the last position of each token list;
- ``_token_logprobs(batch)``: log p of every token given the ones before it;
- ``_generate(prompt, ...)``, optionally ``_generate_batch(prompts, ...)``: text generation
  in the current view;
- ``_encode(text)`` (default: the HF tokenizer in ``self.tokenizer``), ``_release()``;
- optionally ``_install_stacked(stack, tile_at)``: several views' rows in one batch
  (:mod:`~sway_common.backend.stacking`), used by :meth:`next_token_dist_views`.

Everything a probe calls (the protocol methods) lives here once, and so does the view
dispatch (:meth:`DifferentialBackendBase._activate`: which hook runs for which view, and
the null draw), so the backends cannot drift apart on tokenisation boundaries, tail
mass, cache keys, window plans or what a view means.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from sway_common.adapters.weights import AdapterWeights
from sway_common.backend.nulls import NullFactors, check_null_args, null_factors
from sway_common.backend.scoring import (
    ResultCache,
    completion_start,
    length_buckets,
    rolling_windows,
    text_hash,
    token_dist_from_logprobs,
)
from sway_common.backend.stacking import StackedView, first_adapted_block, stack_plan
from sway_common.protocols import NullMode, ViewConflictError
from sway_common.types import RollingLogprob, TokenDist

Encoding = tuple[list[int], list[tuple[int, int]]]
"""Token ids and each token's (start, end) character span."""

ViewKind = Literal["base", "ft", "scaled", "null"]
Restore = Callable[[], None]
"""Undoes a view: brings the model back to its resting, fine-tuned state."""

PREFLIGHT_PROMPT = "The quick brown fox jumps over the lazy dog. The answer is"


@dataclass(frozen=True, slots=True)
class ViewSpec:
    """Which weights a view runs with. ``key()`` identifies its results in the cache."""

    kind: ViewKind
    lam: float = 1.0
    seed: int = 0
    init_scale: float = 0.02
    rank_scale: float = 1.0
    mode: NullMode = "fixed"

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
        return (
            "null",
            int(self.seed),
            float(self.init_scale),
            float(self.rank_scale),
            self.mode,
            adapter_hash,
        )

    def label(self) -> str:
        if self.kind == "scaled":
            return f"scaled(λ={self.lam:g})"
        if self.kind == "null":
            return f"null(seed={self.seed}, {self.mode}, rank×{self.rank_scale:g})"
        return self.kind


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


class DifferentialBackendBase(ABC):
    """One loaded model, many views. Subclasses set the attributes below and the hooks."""

    tokenizer: Any = None
    vocab_size: int = 0
    max_context: int = 2048
    batch_size: int = 8
    adapter_hash: str = ""
    adapter_weights: AdapterWeights | None = None
    """The loaded adapter in canonical form: what a null copies the structure of. None
    when the backend was built without one (``adapter_path=None``): only the base view."""
    info: dict[str, Any]

    def __init__(self) -> None:
        self._active: ViewSpec | None = None
        self._cache = ResultCache()
        # Per adapter hash: the block from which stacked views' rows differ, when
        # sharing the blocks below it checked out on this model (None: it did not).
        self._shared_blocks: dict[str, str | None] = {}
        self.info = {}

    # ----------------------------------------------------------------- hooks
    @abstractmethod
    def _install_base(self) -> Restore:
        """The plain base model."""

    @abstractmethod
    def _install_scaled(self, lam: float) -> Restore:
        """Every module's change scaled by ``lam`` (never 0 or 1: those are base and ft)."""

    @abstractmethod
    def _install_null(self, factors: dict[str, NullFactors]) -> Restore:
        """Random factors (by module path, PEFT orientation) in place of the trained ones."""

    @abstractmethod
    def _last_logprobs(self, batch: list[list[int]]) -> NDArray[np.float32]: ...

    @abstractmethod
    def _token_logprobs(self, batch: list[list[int]]) -> list[NDArray[np.float32]]: ...

    @abstractmethod
    def _generate(self, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> str: ...

    def _generate_batch(
        self, prompts: list[str], max_new_tokens: int, temperature: float, seed: int, chat: bool
    ) -> list[str]:
        """Continuations of ``prompts`` in the current view. Default: one at a time."""
        if chat:
            raise NotImplementedError(f"{type(self).__name__} has no chat-template generation")
        return [self._generate(p, max_new_tokens, temperature, seed) for p in prompts]

    def _release(self) -> None:  # noqa: B027  (optional hook, empty on purpose)
        """Drop model references. Default: nothing to do."""

    def _nonfinite_adapter_tensors(self) -> list[str]:
        """Names of adapter tensors holding NaN/Inf. Default: none checked."""
        return []

    def _install_stacked(self, stack: Sequence[StackedView], tile_at: str | None) -> Restore | None:
        """Several views in one batch (see :mod:`~sway_common.backend.stacking`).

        Row group ``v`` of a view-major batch runs with ``stack[v]``. With ``tile_at``
        (a block path) the model takes each prompt once and repeats its rows per view
        at that block, so ``_last_logprobs`` returns ``len(stack)`` rows per prompt.
        None: this backend or adapter cannot stack (DoRA, the dummy); views then run
        one at a time. Default: None.
        """
        return None

    def peak_memory_bytes(self) -> int | None:
        """The framework allocator's peak in this process (GPU memory where the model runs
        on one); None when the framework does not say. Default: None."""
        return None

    def _encode(self, text: str) -> Encoding:
        # verbose=False: the tokenizer's own "longer than the maximum" warning is noise;
        # prompt lengths are checked against the context window before a run starts.
        enc = self.tokenizer(
            text, add_special_tokens=True, return_offsets_mapping=True, verbose=False
        )
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    # ----------------------------------------------------------------- views
    def _activate(self, view: ViewSpec) -> Restore:
        """Put the model into ``view``: the one place that maps a view to a hook.

        The fine-tuned state is the resting one, so ``ft`` has nothing to do. Null
        factors are drawn before any hook runs, so a failing draw leaves the model as
        it was.
        """
        runs = view.runs
        if runs == "base":
            return self._install_base()
        if self.adapter_weights is None:
            raise ValueError(
                f"no adapter is loaded, so there is no {view.label()} view: only the base "
                "model (build the backend with an adapter_path)"
            )
        if runs == "scaled":
            return self._install_scaled(view.lam)
        if runs == "null":
            return self._install_null(self._null_draw(view))
        return lambda: None

    def _null_draw(self, view: ViewSpec) -> dict[str, NullFactors]:
        assert self.adapter_weights is not None
        return null_factors(
            self.adapter_weights.modules,
            view.seed,
            init_scale=view.init_scale,
            rank_scale=view.rank_scale,
            mode=view.mode,
        )

    @contextlib.contextmanager
    def _open(self, view: ViewSpec) -> Iterator[BackendView]:
        if self._active is not None:
            raise ViewConflictError(
                f"cannot enter the {view.label()} view while the {self._active.label()} "
                "view is open; close it first (views share one set of weights)"
            )
        restore = self._activate(view)
        self._active = view
        handle = BackendView(self, view)
        try:
            yield handle
        finally:
            handle._closed = True
            try:
                restore()
            finally:
                self._active = None

    def as_base(self) -> contextlib.AbstractContextManager[BackendView]:
        return self._open(ViewSpec("base"))

    def as_finetuned(self) -> contextlib.AbstractContextManager[BackendView]:
        return self._open(ViewSpec("ft"))

    def as_scaled_adapter(self, lam: float) -> contextlib.AbstractContextManager[BackendView]:
        if not np.isfinite(lam):
            raise ValueError(f"lam must be finite, got {lam}")
        return self._open(ViewSpec("scaled", lam=float(lam)))

    def as_null_adapter(
        self,
        seed: int,
        *,
        init_scale: float = 0.02,
        rank_scale: float = 1.0,
        mode: NullMode = "fixed",
    ) -> contextlib.AbstractContextManager[BackendView]:
        check_null_args(init_scale, rank_scale, mode)
        view = ViewSpec(
            "null",
            seed=int(seed),
            init_scale=float(init_scale),
            rank_scale=float(rank_scale),
            mode=mode,
        )
        return self._open(view)

    @property
    def active_view(self) -> ViewSpec | None:
        return self._active

    # ------------------------------------------------------------- preflight
    def preflight_finite_check(self) -> tuple[bool, str]:
        bad = self._nonfinite_adapter_tensors()
        if bad:
            shown = ", ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
            return False, f"adapter weights hold NaN/Inf in {len(bad)} tensor(s): {shown}"
        ids, _ = self._encode(PREFLIGHT_PROMPT)
        openers = (self.as_base, self.as_finetuned) if self.adapter_weights else (self.as_base,)
        for opener in openers:
            with opener() as view:
                row = self._last_logprobs([ids])[0]
                if not np.all(np.isfinite(row)):
                    return False, f"{view.spec.label()} view gives non-finite logits"
                if float(row.max() - row.min()) < 1e-6:
                    return (
                        False,
                        f"{view.spec.label()} view gives a uniform distribution (broken LM head?)",
                    )
        return True, "base and fine-tuned views give finite logits"

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
        ids, _ = self._encode(PREFLIGHT_PROMPT)
        rows = []
        for opener in (self.as_base, self.as_finetuned):
            with opener():
                rows.append(self._last_logprobs([ids])[0])
        if np.array_equal(rows[0], rows[1]):
            return False, (
                f"the adapter is a no-op: with its {where} attached the model's logits equal "
                f"the base model's bit for bit (dtype {getattr(self, 'dtype', '?')})"
            )
        return True, "the adapter changes the model's logits"

    # --------------------------------------------------------------- scoring
    def _check_active(self, view: ViewSpec) -> None:
        if self._active is not view:
            raise ViewConflictError(
                f"the {view.label()} view was used after it was closed; "
                "use a view only inside its with-block"
            )

    def token_count(self, text: str) -> int:
        """How many tokens ``text`` is, counted as every scoring call counts them."""
        return len(self._encode(text)[0])

    @property
    def prompt_limit(self) -> int | None:
        """The most tokens a prompt may have: the context window (None: no limit)."""
        return self.max_context

    def _encode_nonempty(self, text: str) -> Encoding:
        ids, offsets = self._encode(text)
        if not ids:
            raise ValueError(f"text {text[:40]!r} encodes to no tokens; give a non-empty prompt")
        return ids, offsets

    def next_token_dists(
        self, view: ViewSpec, prompts: Sequence[str], top_k: int
    ) -> list[TokenDist]:
        self._check_active(view)
        vkey = view.key(self.adapter_hash)
        out: list[TokenDist | None] = []
        todo: list[int] = []
        for i, prompt in enumerate(prompts):
            hit = self._cache.get((vkey, "next", text_hash(prompt), top_k))
            out.append(hit)
            if hit is None:
                todo.append(i)
        encoded = [self._encode_nonempty(prompts[i])[0] for i in todo]
        for bucket in length_buckets([len(e) for e in encoded], self.batch_size):
            rows = self._last_logprobs([encoded[j] for j in bucket])
            for j, row in zip(bucket, rows, strict=True):
                dist = token_dist_from_logprobs(row, top_k)
                i = todo[j]
                out[i] = dist
                self._cache.put((vkey, "next", text_hash(prompts[i]), top_k), dist)
        return out  # type: ignore[return-value]

    def logprobs_of(
        self, view: ViewSpec, prompts: Sequence[str], completions: Sequence[str]
    ) -> list[float]:
        self._check_active(view)
        vkey = view.key(self.adapter_hash)
        out: list[float | None] = []
        todo: list[tuple[int, list[int], int]] = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            hit = self._cache.get((vkey, "logprob_of", text_hash(prompt, completion), 0))
            out.append(hit)
            if hit is not None:
                continue
            ids, offsets = self._encode(prompt + completion)
            # The first token has no context to be scored against.
            start = max(1, completion_start(offsets, len(prompt)))
            if start >= len(ids):
                out[i] = 0.0
                continue
            todo.append((i, ids, start))
        for bucket in length_buckets([len(t[1]) for t in todo], self.batch_size):
            rows = self._token_logprobs([todo[j][1] for j in bucket])
            for j, row in zip(bucket, rows, strict=True):
                i, _, start = todo[j]
                value = float(np.sum(row[start - 1 :], dtype=np.float64))
                out[i] = value
                self._cache.put(
                    (vkey, "logprob_of", text_hash(prompts[i], completions[i]), 0), value
                )
        return out  # type: ignore[return-value]

    def rolling(self, view: ViewSpec, text: str) -> RollingLogprob:
        return self.rollings(view, [text])[0]

    def generate_in(
        self, view: ViewSpec, prompt: str, max_new_tokens: int, temperature: float, seed: int
    ) -> str:
        self._check_active(view)
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        return self._generate(prompt, max_new_tokens, temperature, seed)

    def generate_batch_in(
        self,
        view: ViewSpec,
        prompts: Sequence[str],
        max_new_tokens: int,
        temperature: float,
        seed: int,
        chat: bool,
    ) -> list[str]:
        self._check_active(view)
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if not prompts:
            return []
        return self._generate_batch(list(prompts), max_new_tokens, temperature, seed, chat)

    # --------------------------------------------------------------- closing
    def close(self) -> None:
        self._cache.clear()
        self._release()

    def __enter__(self) -> DifferentialBackendBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------- many texts, embeddings
    def rollings(self, view: ViewSpec, texts: Sequence[str]) -> list[RollingLogprob]:
        """:meth:`rolling` for many texts at once: all their windows share padded batches."""
        self._check_active(view)
        vkey = view.key(self.adapter_hash)
        out = [self._cache.get((vkey, "rolling", text_hash(t), 0)) for t in texts]
        ids = {i: self._encode(texts[i])[0] for i, hit in enumerate(out) if hit is None}
        jobs = [
            (i, w) for i, row in ids.items() for w in rolling_windows(len(row), self.max_context)
        ]
        pieces: dict[int, list[tuple[int, NDArray[np.float32]]]] = {i: [] for i in ids}
        for bucket in length_buckets([w.end - w.start for _, w in jobs], self.batch_size):
            rows = self._token_logprobs(
                [ids[jobs[j][0]][jobs[j][1].start : jobs[j][1].end] for j in bucket]
            )
            for j, row in zip(bucket, rows, strict=True):
                i, w = jobs[j]
                pieces[i].append((w.start, row[w.score_from - w.start - 1 : w.end - w.start - 1]))
        for i, row_ids in ids.items():
            parts = [piece for _, piece in sorted(pieces[i], key=lambda t: t[0])]
            logprobs = (
                np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
            )
            out[i] = RollingLogprob(np.asarray(row_ids, dtype=np.int64), logprobs)
            self._cache.put((vkey, "rolling", text_hash(texts[i]), 0), out[i])
        return out  # type: ignore[return-value]

    def mean_hidden_states(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """One row per text: the base model's last hidden states averaged over its tokens.

        Always in the base view, so a topic map of prompts cannot move with the adapter
        under test. A text longer than the context keeps its last ``max_context`` tokens.
        """
        encoded = [self._encode_nonempty(t)[0][-self.max_context :] for t in texts]
        rows: list[NDArray[np.float32]] = [np.zeros(0, np.float32)] * len(texts)
        with self.as_base():
            for bucket in length_buckets([len(e) for e in encoded], self.batch_size):
                vectors = self._mean_hidden([encoded[j] for j in bucket])
                for j, vector in zip(bucket, vectors, strict=True):
                    rows[j] = np.asarray(vector, dtype=np.float32)
        return np.stack(rows)

    @abstractmethod
    def _mean_hidden(self, batch: list[list[int]]) -> NDArray[np.float32]:
        """Final hidden states of each token list, averaged over its tokens: (rows, hidden)."""

    # --------------------------------------------------------- stacked views
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
                for bucket in length_buckets([len(e) for e in encoded], n_prompts):
                    rows = forward([encoded[j] for j in bucket])
                    for n, (v, j) in enumerate((v, j) for v in part for j in bucket):
                        dist = token_dist_from_logprobs(rows[n], top_k)
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
    ) -> Iterator[Callable[[list[list[int]]], NDArray[np.float32]] | None]:
        """The stacked layers installed for the block; yields the forward (None: cannot).

        The forward takes each prompt once and returns its rows in every view of
        ``stack``, view-major; the real adapter is back in place on exit.
        """
        restore = self._install_stacked(stack, tile_at)
        if restore is None:
            yield None
            return

        def forward(batch: list[list[int]]) -> NDArray[np.float32]:
            rows = self._last_logprobs(batch if tile_at else batch * len(stack))
            if rows.shape[0] != len(stack) * len(batch):
                raise RuntimeError(
                    f"stacked forward gave {rows.shape[0]} rows, expected "
                    f"{len(stack)} views × {len(batch)} prompts"
                )
            return rows

        try:
            yield forward
        finally:
            restore()

    def _shared_block(self) -> str | None:
        """The block below which stacked views share their rows, checked once per adapter."""
        if self.adapter_hash not in self._shared_blocks:
            self._shared_blocks[self.adapter_hash] = self._check_shared_block()
        return self._shared_blocks[self.adapter_hash]

    def _check_shared_block(self) -> str | None:
        """The first adapted block, if repeating rows there gives what unshared rows give.

        An architecture whose blocks take per-row arguments a backend does not repeat
        fails this (or raises) on two prompts of different lengths; every block then
        runs on every row. The tolerance only has to tell a wrong row from rounding.
        """
        assert self.adapter_weights is not None
        block = first_adapted_block(self.adapter_weights.modules)
        if block is None:
            return None
        batch = [self._encode_nonempty(t)[0] for t in (PREFLIGHT_PROMPT, "The quick brown")]
        stack = [StackedView(0.0), StackedView(1.0)]
        with self._stacked(stack, None) as forward:
            if forward is None:
                return None
            plain = forward(batch)
        try:
            with self._stacked(stack, block) as forward:
                shared = forward(batch) if forward is not None else None
        except (RuntimeError, ValueError, TypeError, AttributeError, IndexError):
            return None
        atol = 1e-3 if getattr(self, "dtype", "float32") == "float32" else 0.25
        ok = shared is not None and np.allclose(shared, plain, rtol=0.0, atol=atol)
        return block if ok else None


class BackendView:
    """What ``with backend.as_*()`` yields: a :class:`ScoringModel` bound to one view."""

    def __init__(self, backend: DifferentialBackendBase, spec: ViewSpec) -> None:
        self.backend = backend
        self.spec = spec
        self._closed = False

    def next_token_dist(self, prompt: str, *, top_k: int = 256) -> TokenDist:
        return self.backend.next_token_dists(self.spec, [prompt], top_k)[0]

    def next_token_dist_batch(self, prompts: Sequence[str], *, top_k: int = 256) -> list[TokenDist]:
        return self.backend.next_token_dists(self.spec, list(prompts), top_k)

    def logprob_of(self, prompt: str, completion: str) -> float:
        return self.backend.logprobs_of(self.spec, [prompt], [completion])[0]

    def logprob_of_batch(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return self.backend.logprobs_of(self.spec, list(prompts), list(completions))

    def rolling_logprob(self, text: str) -> RollingLogprob:
        return self.backend.rolling(self.spec, text)

    def rolling_logprob_batch(self, texts: Sequence[str]) -> list[RollingLogprob]:
        return self.backend.rollings(self.spec, list(texts))

    def generate(
        self, prompt: str, *, max_new_tokens: int, temperature: float = 0.0, seed: int = 0
    ) -> str:
        return self.backend.generate_in(self.spec, prompt, max_new_tokens, temperature, seed)

    def generate_batch(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        chat: bool = False,
    ) -> list[str]:
        return self.backend.generate_batch_in(
            self.spec, prompts, max_new_tokens, temperature, seed, chat
        )

    def close(self) -> None:
        """A view does not own the model; closing the backend releases it."""
