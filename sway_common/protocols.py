"""The interfaces every backend and probe speaks.

Scoring is kept apart from generation because some backends can give logits and
not text, or the other way round. Every numeric probe rests on three operations:

- ``logprob_of(prompt, completion)``: how likely a completion is after a prompt;
- ``rolling_logprob(text)``: per-token log-probabilities over a whole text;
- ``next_token_dist(prompt, top_k)``: the distribution at the position after a prompt.

A :class:`DifferentialBackend` holds *one* loaded model and hands out views of it
(base, fine-tuned, scaled, null). Loading the model twice would double memory and
halve throughput, so views are toggled in place and may never be open together.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from sway_common.types import RollingLogprob, TokenDist

NullMode = Literal["fixed", "norm_matched"]
NULL_MODES: tuple[str, ...] = ("fixed", "norm_matched")


@runtime_checkable
class Model(Protocol):
    """Something that writes text."""

    def generate(
        self, prompt: str, *, max_new_tokens: int, temperature: float = 0.0, seed: int = 0
    ) -> str:
        """Continue ``prompt``. ``temperature == 0`` is greedy; otherwise ``seed`` fixes the draw."""
        ...

    def generate_batch(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        chat: bool = False,
    ) -> list[str]:
        """One continuation per prompt, in order; stops at EOS or ``max_new_tokens``.

        ``chat=True`` wraps each prompt as a user turn of the tokenizer's chat template when
        it has one (plain text otherwise). Greedy output equals :meth:`generate`'s per prompt
        (within the numerics of batched padding); seeded sampling is fixed by
        ``(seed, prompts)``. This default loops.
        """
        return [
            self.generate(p, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
            for p in prompts
        ]

    def close(self) -> None:
        """Release whatever the model holds. Safe to call twice."""
        ...


@runtime_checkable
class ScoringBackend(Protocol):
    """Log-probability access to a loaded model. All values are natural logs (nats)."""

    def logprob_of(self, prompt: str, completion: str) -> float:
        """Sum of log p over the completion's tokens given the prompt; the prompt is not scored."""
        ...

    def rolling_logprob(self, text: str) -> RollingLogprob:
        """Log p of every token of ``text`` given the ones before it (windowed past the context)."""
        ...

    def next_token_dist(self, prompt: str, *, top_k: int = 256) -> TokenDist:
        """The distribution of the token after ``prompt``, truncated to ``top_k`` ids."""
        ...

    def next_token_dist_batch(self, prompts: Sequence[str], *, top_k: int = 256) -> list[TokenDist]:
        """One :class:`TokenDist` per prompt, in order.

        This default loops. Backends that batch for real must match the per-prompt
        path within float32 tolerance, so cached and fresh prompts can be mixed.
        """
        return [self.next_token_dist(p, top_k=top_k) for p in prompts]

    def logprob_of_batch(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """:meth:`logprob_of` per (prompt, completion) pair, in order. This default loops."""
        return [self.logprob_of(p, c) for p, c in zip(prompts, completions, strict=True)]

    def rolling_logprob_batch(self, texts: Sequence[str]) -> list[RollingLogprob]:
        """:meth:`rolling_logprob` per text, in order. This default loops."""
        return [self.rolling_logprob(t) for t in texts]


@runtime_checkable
class ScoringModel(Model, ScoringBackend, Protocol):
    """What a view yields: a model that both writes and scores text."""


@runtime_checkable
class DifferentialBackend(Protocol):
    """Base and fine-tuned views of one loaded model.

    ::

        with backend.as_base() as base:
            p = base.next_token_dist(prompt)
        with backend.as_finetuned() as ft:
            q = ft.next_token_dist(prompt)

    Entering a view while another is open raises: a caller still holding the base
    view after switching to the fine-tuned one would silently read the wrong model.
    """

    def as_base(self) -> AbstractContextManager[ScoringModel]: ...

    def as_finetuned(self) -> AbstractContextManager[ScoringModel]: ...


@runtime_checkable
class ScalableDifferentialBackend(DifferentialBackend, Protocol):
    """A differential backend that can scale the LoRA term ``(alpha/r)·B·A`` by ``lam``.

    ``lam = 0`` is the base model, ``lam = 1`` the fine-tune, ``lam = 1.25`` an
    overshoot; used to trace the adapter's response curve.
    """

    def as_scaled_adapter(self, lam: float) -> AbstractContextManager[ScoringModel]: ...


@runtime_checkable
class NullCalibratedBackend(DifferentialBackend, Protocol):
    """A differential backend that can swap in a seeded random ("null") adapter.

    The null adapter has the real one's structure (rank, alpha, target modules) and
    zero-mean Gaussian factors. Metrics measured under K seeds give the noise
    distribution every numeric probe is z-scored against.

    Contract:

    - the real adapter is restored on exit, also when the body raised;
    - ``rank_scale`` emulates a null of rank ``r * rank_scale`` without reshaping
      tensors: the variance of ``ΔW = B·A`` grows *linearly* with it (the std of one
      factor is multiplied by ``sqrt(rank_scale)``, not both); ``rank_scale <= 0``
      raises ``ValueError``;
    - ``init_scale`` defaults to the null recipe's (``backend.nulls.DEFAULT_INIT_SCALE``);
    - ``mode="fixed"`` draws factors at ``init_scale``; ``mode="norm_matched"``
      rescales each module's ΔW to the real adapter's Frobenius norm for that module.
    """

    def as_null_adapter(
        self,
        seed: int,
        *,
        init_scale: float = ...,
        rank_scale: float = 1.0,
        mode: NullMode = "fixed",
    ) -> AbstractContextManager[ScoringModel]: ...


@runtime_checkable
class PreflightCheckable(Protocol):
    """A backend that can check itself before any probe runs.

    Returns ``(ok, reason)``. One forward per view on a sentinel prompt must give
    finite, non-uniform logits; the runner turns a failure into a single ERROR
    result so a NaN adapter can never produce a PASS.
    """

    def preflight_finite_check(self) -> tuple[bool, str]: ...


@runtime_checkable
class NoopCheckable(Protocol):
    """A backend that can tell whether its adapter changes the model at all: ``(ok, reason)``.
    A no-op adapter is a verdict on the adapter (FAIL), not a broken run."""

    def preflight_noop_check(self) -> tuple[bool, str]: ...


@runtime_checkable
class DescribedBackend(Protocol):
    """A backend that says what it has loaded (model, adapter, dtype, framework versions):
    reported with every result, and part of the null cache's keys."""

    @property
    def info(self) -> dict[str, Any]: ...


@runtime_checkable
class EmbeddingBackend(Protocol):
    """A backend that embeds texts with its own base model (offline topic maps)."""

    def mean_hidden_states(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """One row per text: the base model's final hidden states averaged over its tokens."""
        ...


class ViewConflictError(RuntimeError):
    """A view was entered while another was open, or used after it closed."""
