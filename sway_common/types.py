"""Plain data types shared by every layer: distributions, verdicts, results.

Everything here is numpy + stdlib so that ``import sway_common`` stays light.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class TokenDist:
    """A next-token distribution, possibly truncated to its top ``k`` tokens.

    ``tail_logprob`` has three states that consumers must tell apart:

    - ``None``: the slice covers the whole vocabulary (``k == vocab_size``), or the
      leftover mass fell below what the backend can report. Nothing to spread.
    - ``0.0``: a sentinel (not log-mass 0) meaning the leftover mass is exactly zero
      in float32. Divergence math treats it like ``None``; it is kept distinct so a
      backend with more precision can say "measured, and it was zero".
    - a negative float: the log of the measurable mass outside the slice. Divergence
      helpers spread it evenly over the vocabulary ids the slice does not hold.
    """

    token_ids: NDArray[np.int64]
    """Token ids, most probable first. Length ``k``."""
    logprobs: NDArray[np.float32]
    """Natural-log probabilities of ``token_ids``. Length ``k``."""
    vocab_size: int
    tail_logprob: float | None = None

    def __post_init__(self) -> None:
        if self.token_ids.shape != self.logprobs.shape or self.token_ids.ndim != 1:
            raise ValueError("TokenDist token_ids and logprobs must be 1-D and the same length")
        if self.token_ids.size > self.vocab_size:
            raise ValueError("TokenDist holds more ids than the vocabulary has")

    @property
    def k(self) -> int:
        return int(self.token_ids.size)


@dataclass(frozen=True, slots=True)
class RollingLogprob:
    """Per-token log-probabilities over a whole text (lm-eval's loglikelihood_rolling).

    ``logprobs[i]`` is ``log p(token_ids[i + 1] | token_ids[: i + 1])``: the first
    token has no context and is not scored, so ``len(logprobs) == len(token_ids) - 1``.
    """

    token_ids: NDArray[np.int64]
    logprobs: NDArray[np.float32]

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.size)

    @property
    def total_logprob(self) -> float:
        return float(np.sum(self.logprobs, dtype=np.float64))

    @property
    def mean_logprob(self) -> float:
        n = self.logprobs.size
        return self.total_logprob / n if n else 0.0

    @property
    def perplexity(self) -> float:
        """``exp(-mean_logprob)``, natural base."""
        return float(math.exp(-self.mean_logprob))


class Verdict(str, enum.Enum):
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"
    ERROR = "ERROR"


@dataclass(slots=True)
class NullStats:
    """Summary of a metric measured under K null adapters."""

    mean: float
    std: float
    """Sample standard deviation (ddof=1); 0.0 when fewer than two draws."""
    n: int
    values: list[float] = field(default_factory=list)
    degenerate: bool = False
    """True when no z-score can be formed: fewer than two draws, or std ~ 0."""


@dataclass(slots=True)
class ProbeResult:
    name: str
    kind: str
    verdict: Verdict
    category: str = "adherence"
    score: float | None = None
    """0..1 contribution to the composite score; None when the probe has no score."""
    raw: float | None = None
    """The probe's headline metric (e.g. mean JS divergence in nats)."""
    z: float | None = None
    p_value: float | None = None
    effect_ratio: float | None = None
    """The effect as a multiple of the nulls' ("N× a random adapter of the same size"); for
    a JS divergence on its bounded scale (``divergence.bounded_effect``)."""
    null: NullStats | None = None
    message: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    gating: bool = True
    """A gating probe's FAIL makes the whole suite FAIL."""
    weight: float = 1.0
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdict"] = self.verdict.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeResult:
        d = dict(d)
        d["verdict"] = Verdict(d["verdict"])
        if d.get("null") is not None:
            d["null"] = NullStats(**d["null"])
        return cls(**d)


@dataclass(slots=True)
class SuiteResult:
    probes: list[ProbeResult]
    verdict: Verdict
    score: float | None
    category_scores: dict[str, float] = field(default_factory=dict)
    threshold: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    """Run facts: spec path, backend, model, adapter, seed, versions, timings."""
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "verdict": self.verdict.value,
            "score": self.score,
            "threshold": self.threshold,
            "category_scores": dict(self.category_scores),
            "meta": dict(self.meta),
            "probes": [p.to_dict() for p in self.probes],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SuiteResult:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"unsupported result schema_version {version!r}; this build reads {SCHEMA_VERSION}"
            )
        return cls(
            probes=[ProbeResult.from_dict(p) for p in d["probes"]],
            verdict=Verdict(d["verdict"]),
            score=d.get("score"),
            category_scores=dict(d.get("category_scores", {})),
            threshold=float(d.get("threshold", 0.0)),
            meta=dict(d.get("meta", {})),
            schema_version=version,
        )
