"""The hooks a backend supplies and the one place that maps a view onto them.

A concrete backend (MLX, HF, dummy) supplies only the model-specific hooks:

- ``_install_base()``, ``_install_scaled(lam)``, ``_install_null(factors)``: put the
  model into that view and return the function that brings back the fine-tuned state
  (the real backends forward each to the same-named function of their ``lora.py``);
- optionally ``_place_null(factors)``: a drawn null's numpy factors as the backend's
  own arrays on its device, kept with the draw (``lora.null_arrays``);
- ``_last_logprobs(batch)``: log-softmax at the last position of each token list;
- ``_token_logprobs(batch)``: log p of every token given the ones before it;
- ``_mean_hidden(batch)``: final hidden states averaged over each token list;
- ``_generate_tokens(batch, max_new_tokens, temperature, draws)``: new token ids per
  row in the current view (chat template, batching and seeded draws are
  :mod:`~sway_common.backend.generation`'s, written once);
- ``_encode(text)`` (default: the HF tokenizer in ``self.tokenizer``), ``_release()``;
- optionally ``_install_stacked(stack, tile_at)``: several views' rows in one batch
  (:mod:`~sway_common.backend.stacking`), used by
  :meth:`~sway_common.backend.multiview.StackedScoring.next_token_dist_views`.

:class:`ViewDispatch` declares them, opens and closes views (two open at once raise;
leaving restores the real adapter, also on exceptions) and draws nulls, so the
backends cannot drift apart on what a view means.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from sway_common.adapters.weights import AdapterWeights
from sway_common.backend.generation import Draws, decode_new, generate_texts
from sway_common.backend.nulls import NullFactors, check_null_args, null_factors
from sway_common.backend.scoring import ResultCache, token_dist_from_logprobs
from sway_common.backend.stacking import KeptResults, StackedView
from sway_common.backend.views import BackendView, Encoding, Restore, ViewSpec
from sway_common.protocols import NullMode, ViewConflictError
from sway_common.types import TokenDist

# Drawn null factors kept per backend: all K nulls of a small adapter; a few of a large one.
NULL_DRAWS_KEPT_BYTES = 256 * 2**20


def _nbytes(placed: Mapping[str, tuple[Any, ...]]) -> int:
    """Bytes of a placed null: numpy, torch and MLX arrays all say ``nbytes``."""
    return sum(int(array.nbytes) for arrays in placed.values() for array in arrays)


class ViewDispatch(ABC):
    """One loaded model, many views. Subclasses set the attributes below and the hooks."""

    tokenizer: Any = None
    vocab_size: int = 0
    max_context: int = 2048
    batch_size: int = 8
    logit_budget: int | None = None
    """Floats of logits one scoring step may hold (``limits.resolve_logit_budget``)."""
    step_tokens: float | None = None
    """What one more forward costs in padded tokens (``limits.resolve_step_tokens``);
    None: batches are cut full (``scoring.length_buckets``)."""
    adapter_hash: str = ""
    adapter_weights: AdapterWeights | None = None
    """The loaded adapter in canonical form: what a null copies the structure of. None
    when the backend was built without one (``adapter_path=None``): only the base view."""
    info: dict[str, Any]
    frameworks: tuple[str, ...] = ()
    """The packages whose versions decide this backend's numbers (reported in ``info``)."""

    def __init__(self) -> None:
        self._active: ViewSpec | None = None
        self._cache = ResultCache()
        # Per adapter hash: the block from which stacked views' rows differ, when
        # sharing the blocks below it checked out on this model (None: it did not).
        self._shared_blocks: dict[str, str | None] = {}
        # Where that check's outcome is kept across runs (the runner hands it the null
        # cache); None: checked once per process.
        self.check_store: KeptResults | None = None
        self._encodings: OrderedDict[str, Encoding] = OrderedDict()
        self._null_draws: OrderedDict[tuple[Any, ...], dict[str, Any]] = OrderedDict()
        self.info = {}

    # ----------------------------------------------------------------- hooks
    @abstractmethod
    def _install_base(self) -> Restore:
        """The plain base model."""

    @abstractmethod
    def _install_scaled(self, lam: float) -> Restore:
        """Every module's change scaled by ``lam`` (never 0 or 1: those are base and ft)."""

    def _place_null(self, factors: dict[str, NullFactors]) -> dict[str, Any]:
        """A drawn null's factors as :meth:`_install_null` and the stacked layers take them:
        the backend's arrays, on its device. Kept with the draw, so a null opened again
        is neither drawn nor converted nor copied again. Default: the numpy factors."""
        return factors

    @abstractmethod
    def _install_null(self, factors: dict[str, Any]) -> Restore:
        """A null's factors, as :meth:`_place_null` placed them, in place of the trained ones."""

    @abstractmethod
    def _last_logprobs(self, batch: list[list[int]]) -> NDArray[np.float32]: ...

    def _last_dists(self, batch: list[list[int]], top_k: int) -> list[TokenDist]:
        """The top-``top_k`` slices of :meth:`_last_logprobs`'s rows, with their tail mass.

        Default: full rows to the host, sliced there. A backend whose logits live on a
        GPU slices them there, so a vocabulary-wide row per prompt and view never crosses
        to the host (nor is partitioned by numpy).
        """
        return [token_dist_from_logprobs(row, top_k) for row in self._last_logprobs(batch)]

    @abstractmethod
    def _token_logprobs(self, batch: list[list[int]]) -> list[NDArray[np.float32]]: ...

    @abstractmethod
    def _generate_tokens(
        self, batch: list[list[int]], max_new_tokens: int, temperature: float, draws: Draws | None
    ) -> list[list[int]]:
        """New token ids for each row of ``batch`` (stop token left off); ``draws``: one
        uniform per row and new token (None: greedy)."""

    def _decode_new(self, ids: list[int]) -> str:
        return decode_new(self.tokenizer, ids)

    def _generate_batch(
        self, prompts: list[str], max_new_tokens: int, temperature: float, seed: int, chat: bool
    ) -> list[str]:
        """Continuations of ``prompts`` in the current view, in length-bucketed batches."""
        return generate_texts(
            self,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            chat=chat,
            loop=self._generate_tokens,
            decode=self._decode_new,
        )

    def _generate(self, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> str:
        # One row of the batched path, so generate and generate_batch agree exactly.
        return self._generate_batch([prompt], max_new_tokens, temperature, seed, False)[0]

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

    @abstractmethod
    def _mean_hidden(self, batch: list[list[int]]) -> NDArray[np.float32]:
        """Final hidden states of each token list, averaged over its tokens: (rows, hidden)."""

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

    def _null_draw(self, view: ViewSpec) -> dict[str, Any]:
        """The null's placed factors, drawn once per backend while they fit the byte budget:
        every probe of a suite opens the same K nulls, and a draw cost 17 ms per view on
        SmolLM2's small adapter (numpy, float64), more on a larger one."""
        assert self.adapter_weights is not None
        key = view.key(self.adapter_hash)
        if (hit := self._null_draws.get(key)) is not None:
            self._null_draws.move_to_end(key)
            return hit
        factors = self._place_null(
            null_factors(
                self.adapter_weights.modules,
                view.seed,
                init_scale=view.init_scale,
                rank_scale=view.rank_scale,
                mode=view.mode,
            )
        )
        self._null_draws[key] = factors
        while sum(map(_nbytes, self._null_draws.values())) > NULL_DRAWS_KEPT_BYTES:
            self._null_draws.popitem(last=False)
        return factors

    @contextlib.contextmanager
    def _open(self, view: ViewSpec) -> Iterator[BackendView]:
        if self._active is not None:
            raise ViewConflictError(
                f"cannot enter the {view.label()} view while the {self._active.label()} "
                "view is open; close it first (views share one set of weights)"
            )
        restore = self._activate(view)
        self._active = view
        # The concrete backend (a BatchedScoring) has the ops the view forwards to.
        handle = BackendView(self, view)  # type: ignore[arg-type]
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

    def _check_active(self, view: ViewSpec) -> None:
        if self._active is not view:
            raise ViewConflictError(
                f"the {view.label()} view was used after it was closed; "
                "use a view only inside its with-block"
            )

    # ------------------------------------------------------------ generation
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
