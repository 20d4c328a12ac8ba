"""The one abstract class a framework implements: a loaded model and its LoRA hooks.

A :class:`Runtime` is one model of one framework (MLX, torch, the numpy dummy) with its
adapter attached. It knows how to put that model into a view and how to run a forward
or a generation in whatever view it is in; it knows nothing of caches, batching,
stacking or statistics. :class:`~sway_common.backend.model_views.ModelViews` owns one
and builds everything else around it, so the backends cannot drift apart on what a
view means, how results are keyed, or how prompts are batched.

Hooks, by job:

- load: the constructor, :meth:`set_adapter`, :meth:`release`;
- install a view: :meth:`install_base`, :meth:`install_scaled`, :meth:`place_null`,
  :meth:`install_null`, :meth:`install_stacked`; each returns the :data:`Restore`
  that brings back the fine-tuned resting state (and leaves it in place if it raises);
  :meth:`install_weights` replaces modules' weights the same way;
- forward: :meth:`last_logprobs`, :meth:`last_dists`, :meth:`token_logprobs`,
  :meth:`position_dists`, :meth:`mean_hidden`, on token ids already bucketed into one
  padded batch;
- generate: :meth:`generate_tokens`, :meth:`decode_new`; text: :meth:`encode`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from sway_common.adapters.weights import AdapterWeights
from sway_common.backend.generation import Draws, decode_new
from sway_common.backend.nulls import NullFactors, PlacedFactors, PlacedNull
from sway_common.backend.scoring import token_dist_from_logprobs
from sway_common.backend.stacking import StackedView
from sway_common.backend.views import Encoding, Restore
from sway_common.types import TokenDist


class Runtime(ABC):
    """One loaded model of one framework, its adapter attached (the fine-tuned state rests).

    A subclass sets the attributes below in its constructor and implements the hooks.
    """

    tokenizer: Any = None
    vocab_size: int = 0
    max_context: int = 2048
    batch_size: int = 8
    dtype: str = "float32"
    logit_budget: int | None = None
    """Floats of logits one scoring step may hold (``limits.resolve_logit_budget``)."""
    step_tokens: float | None = None
    """What one more forward costs in padded tokens (``limits.resolve_step_tokens``);
    None: batches are cut full (``scoring.length_buckets``)."""
    adapter_hash: str = ""
    adapter_weights: AdapterWeights | None = None
    """The loaded adapter in canonical form: what a null copies the structure of. None
    when loaded without one (``adapter_path=None``): only the base view."""
    frameworks: tuple[str, ...] = ()
    """The packages whose versions decide this runtime's numbers (reported in ``info``)."""
    model_dir: Path | None = None
    """Where the model's files are (None: not loaded from files, as the dummy)."""
    adapter_path: Path | None = None
    """Where the adapter was read from (None: the model alone)."""

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}

    @property
    def prompt_limit(self) -> int | None:
        """The most tokens a prompt may have: the context window (None: no limit)."""
        return self.max_context

    # ------------------------------------------------------------------ load
    def set_adapter(self, adapter_path: str | Path) -> None:
        """Swap in another adapter of the same base model (the old one stays on failure)."""
        raise NotImplementedError(f"{type(self).__name__} cannot load another adapter")

    def release(self) -> None:  # noqa: B027  (optional hook, empty on purpose)
        """Drop model references. Default: nothing to do."""

    # ---------------------------------------------------------- install a view
    @abstractmethod
    def install_base(self) -> Restore:
        """The plain base model."""

    @abstractmethod
    def install_scaled(self, lam: float, modules: frozenset[str] | None = None) -> Restore:
        """Every module's change scaled by ``lam`` (never 0 or 1: those are base and ft).

        ``modules``: only those modules (by path) are scaled, the others keep their trained
        change (``views.scaled_slots`` picks them; an unknown path raises ``ValueError``).
        """

    def place_null(self, factors: Mapping[str, NullFactors]) -> PlacedNull:
        """A drawn null's numpy factors as this framework's arrays, on its device, once per
        draw: a null opened again is neither drawn nor converted again. Default: as drawn."""
        return {path: PlacedFactors(a, b) for path, (a, b) in factors.items()}

    @abstractmethod
    def install_null(self, placed: PlacedNull) -> Restore:
        """A null's factors, as :meth:`place_null` placed them, in place of the trained ones."""

    def install_stacked(self, stack: Sequence[StackedView], tile_at: str | None) -> Restore | None:
        """Several views in one batch (see :mod:`~sway_common.backend.stacking`).

        Row group ``v`` of a view-major batch runs with ``stack[v]``. With ``tile_at``
        (a block path) the model takes each prompt once and repeats its rows per view
        at that block, so :meth:`last_logprobs` returns ``len(stack)`` rows per prompt.
        None: this runtime or adapter cannot stack (DoRA, the dummy); views then run
        one at a time. Default: None.
        """
        return None

    @abstractmethod
    def install_weights(self, weights: Mapping[str, NDArray[np.float32]]) -> Restore:
        """Replace the named modules' weights (adapter module paths) with these float
        ``(out, in)`` values, already as stored (dequantized), in the module's dtype (a
        quantized module becomes a float one holding them): a model that differs from this
        one in those modules only (the export made into the noise floor's model). Undo
        restores them; raising changes nothing."""

    # --------------------------------------------------------------- forward
    @abstractmethod
    def last_logprobs(self, batch: list[list[int]]) -> NDArray[np.float32]:
        """Log-softmax at the last position of each token list: (rows, vocab)."""

    def last_dists(self, batch: list[list[int]], top_k: int) -> list[TokenDist]:
        """The top-``top_k`` slices of :meth:`last_logprobs`'s rows, with their tail mass.

        Default: full rows to the host, sliced there. A runtime whose logits live on a
        GPU slices them there, so a vocabulary-wide row never crosses to the host.
        """
        return [token_dist_from_logprobs(row, top_k) for row in self.last_logprobs(batch)]

    @abstractmethod
    def token_logprobs(self, batch: list[list[int]]) -> list[NDArray[np.float32]]:
        """Log p of every token given the ones before it: ``len(ids) - 1`` values per row."""

    @abstractmethod
    def position_dists(self, batch: list[list[int]], top_k: int) -> list[list[TokenDist]]:
        """The top-``top_k`` slice, with its tail mass, of the distribution at every position
        that predicts a token of the row: ``len(ids) - 1`` per row, position ``t`` giving
        the distribution of token ``t + 1`` (as :meth:`token_logprobs` scores it). Sliced
        where the logits are, in chunks of positions, so no (positions × vocabulary)
        array of a long text exists at once."""

    @abstractmethod
    def mean_hidden(self, batch: list[list[int]]) -> NDArray[np.float32]:
        """Final hidden states of each token list, averaged over its tokens: (rows, hidden)."""

    # -------------------------------------------------------------- generate
    @abstractmethod
    def generate_tokens(
        self, batch: list[list[int]], max_new_tokens: int, temperature: float, draws: Draws | None
    ) -> list[list[int]]:
        """New token ids for each row of ``batch`` (stop token left off); ``draws``: one
        uniform per row and new token (None: greedy)."""

    def decode_new(self, ids: list[int]) -> str:
        return decode_new(self.tokenizer, ids)

    def encode(self, text: str) -> Encoding:
        """Token ids and character spans, as every scoring call counts them."""
        # verbose=False: the tokenizer's own "longer than the maximum" warning is noise;
        # prompt lengths are checked against the context window before a run starts.
        enc = self.tokenizer(
            text, add_special_tokens=True, return_offsets_mapping=True, verbose=False
        )
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    # ---------------------------------------------------------------- checks
    def nonfinite_adapter_tensors(self) -> list[str]:
        """Names of adapter tensors holding NaN/Inf. Default: none checked."""
        return []

    def peak_memory_bytes(self) -> int | None:
        """The framework allocator's peak in this process (GPU memory where the model runs
        on one); None when the framework does not say. Default: None."""
        return None
