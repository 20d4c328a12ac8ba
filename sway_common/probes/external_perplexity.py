"""external_perplexity: does the adapter make ordinary held-out prose less likely?

Chunks of general prose the adapter never saw (the built-in corpus written for sway-mlx,
or a local text file named by ``corpus``) are scored token by token in the base and the
fine-tuned views; the metric is the change in mean log-prob per token over all chunks
(negative: perplexity went up). A gating regression FAILs below ``assert_mean_delta_gte``
(damage so large no null matters), or when the adapter lost significantly more than
random adapters of its size (z against the nulls) and more than ``tolerance``; any other
adapter PASSes, and the message says whether it lost nothing, no more than noise, or a
tolerated amount more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sway_common.protocols import DifferentialBackend
from sway_common.types import ProbeResult

from .base import ProbeConfig, RunContext, register
from .likelihood import Regression, RegressionProbe, judge_regression, per_token, rolling_gain
from .packs import BUILTIN, chunks, is_named_file, load_corpus, spread


@dataclass
class ExternalPerplexityConfig(ProbeConfig):
    corpus: str = BUILTIN
    """``builtin`` or a local UTF-8 text file of plain prose."""
    chunk_chars: int = 2048
    max_chunks: int = 16
    assert_mean_delta_gte: float = -0.1
    """Nats per token; -0.1 is a perplexity about 10.5% higher."""
    assert_z_gte: float = 3.0
    tolerance: float = 0.03
    """Nats per token (about 3% perplexity) an adapter may lose beyond its nulls' without
    a FAIL: significance alone would fail any measurable cost."""
    min_effect: float = 1e-4
    """Mean |change| per token below which the adapter is taken to leave the prose alone."""


def corpus_chunks(corpus: str, chunk_chars: int, max_chunks: int) -> list[str]:
    return spread(chunks(load_corpus(corpus), chunk_chars), max_chunks)


def mean_gain(backend: DifferentialBackend, texts: list[str]) -> float:
    """Change in log-prob per token over all texts together (token-weighted)."""
    gains, counts = rolling_gain(backend, texts)
    return float(gains.sum() / max(1, counts.sum()))


@register
class ExternalPerplexityProbe(RegressionProbe):
    kind = "external_perplexity"
    claim = "held-out prose is no less likely than random adapters of its size leave it, or less likely within the tolerance, and no absolute limit was crossed"
    Config = ExternalPerplexityConfig

    def check(self, cfg: ExternalPerplexityConfig) -> list[str]:
        problems = super().check(cfg)
        if cfg.chunk_chars < 64:
            problems.append("chunk_chars: must be >= 64 (a chunk needs context to score)")
        if cfg.max_chunks < 1:
            problems.append("max_chunks: must be >= 1")
        if is_named_file(cfg.corpus):
            try:
                if not chunks(load_corpus(cfg.corpus), max(64, cfg.chunk_chars)):
                    problems.append(f"corpus: {cfg.corpus} holds no text")
            except ValueError as e:
                problems.append(f"corpus: {e}")
        if cfg.tolerance < 0:
            problems.append("tolerance: must be >= 0")
        return problems

    def run(self, cfg: ExternalPerplexityConfig, ctx: RunContext) -> ProbeResult:
        texts = corpus_chunks(cfg.corpus, cfg.chunk_chars, cfg.max_chunks)
        gains, counts = rolling_gain(ctx.backend, texts)
        raw = float(gains.sum() / max(1, counts.sum()))
        per_chunk = per_token(gains, counts)
        ppl_change = math.exp(-raw) - 1.0

        problems = []
        if raw < cfg.assert_mean_delta_gte:
            problems.append(
                f"held-out prose lost {-raw:.3g} nats/token (perplexity {ppl_change:+.1%}; "
                f"limit {cfg.assert_mean_delta_gte:g})"
            )
        kept = (
            f"held-out prose kept: {raw:+.3g} nats/token over {len(texts)} chunks "
            f"(perplexity {ppl_change:+.1%})"
        )
        reg = Regression(
            raw,
            problems,
            kept,
            float(abs(per_chunk).mean()),
            "this prose",
            " nats/token",
            min_effect=cfg.min_effect,
            z_min=cfg.assert_z_gte,
            tolerance=cfg.tolerance,
        )
        evidence = {
            "chunks": len(texts),
            "tokens": int(counts.sum()),
            "corpus": cfg.corpus,
            "perplexity_change": ppl_change,
            "per_chunk": [float(g) for g in per_chunk],
        }
        return judge_regression(
            self, cfg, ctx, reg, lambda b: mean_gain(b, texts), (texts,), evidence
        )
