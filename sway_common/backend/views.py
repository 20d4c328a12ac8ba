"""What a view is: its spec, its cache key, and the handle ``with backend.as_*()`` yields.

A view (``base``, ``ft``, ``scaled(λ)``, ``null(seed, …)``) is one set of weights of the
one loaded model. :class:`ViewSpec` names it and keys its results in the cache;
:class:`BackendView` is the :class:`~sway_common.protocols.ScoringModel` a probe scores
through, which forwards every call, with its spec, to the backend that opened it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from sway_common.protocols import NullMode
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


class ViewOps(Protocol):
    """What a :class:`BackendView` asks of its backend: each op for the view it names."""

    def next_token_dists(
        self, view: ViewSpec, prompts: Sequence[str], top_k: int
    ) -> list[TokenDist]: ...

    def logprobs_of(
        self, view: ViewSpec, prompts: Sequence[str], completions: Sequence[str]
    ) -> list[float]: ...

    def rolling(self, view: ViewSpec, text: str) -> RollingLogprob: ...

    def rollings(self, view: ViewSpec, texts: Sequence[str]) -> list[RollingLogprob]: ...

    def generate_in(
        self, view: ViewSpec, prompt: str, max_new_tokens: int, temperature: float, seed: int
    ) -> str: ...

    def generate_batch_in(
        self,
        view: ViewSpec,
        prompts: Sequence[str],
        max_new_tokens: int,
        temperature: float,
        seed: int,
        chat: bool,
    ) -> list[str]: ...


class BackendView:
    """What ``with backend.as_*()`` yields: a :class:`ScoringModel` bound to one view."""

    def __init__(self, backend: ViewOps, spec: ViewSpec) -> None:
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
