"""external_perplexity: does the adapter make ordinary held-out prose less likely?

Chunks of general prose the adapter never saw (the built-in corpus written for sway-mlx,
or a local text file named by ``corpus``) are scored token by token in the base and the
fine-tuned views; the metric is the change in log-prob per UTF-8 byte over all chunks
(total nats over the chunks divided by their bytes; negative: perplexity went up), so the
tolerance means the same whatever the tokenizer. (A tokenizer that adds no BOS token
leaves each chunk's first token unscored in every view; its bytes stay in the denominator.)
A gating regression FAILs below ``assert_mean_delta_gte`` nats per token (dlm-sway's field
and unit: damage so large no null matters), or when the adapter lost significantly more than
random adapters of its size (z against the nulls) and more than ``tolerance``; any other
adapter PASSes, and the message says whether it lost nothing, no more than noise, or a
tolerated amount more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sway_common.protocols import DifferentialBackend
from sway_common.types import ProbeResult

from .base import ProbeConfig, RunContext, register
from .likelihood import Regression, RegressionProbe, judge_regression, rolling_gain
from .packs import BUILTIN, chunks, is_named_file, load_corpus, spread


@dataclass
class ExternalPerplexityConfig(ProbeConfig):
    corpus: str = BUILTIN
    """``builtin`` or a local UTF-8 text file of plain prose."""
    chunk_chars: int = 2048
    max_chunks: int = 16
    assert_mean_delta_gte: float = -0.1
    """Nats per scored token, as in dlm-sway (damage so large no null matters): the
    perplexity per token more than ``exp(0.1)`` times the base's."""
    assert_z_gte: float = 3.0
    tolerance: float = 0.006
    """Nats per UTF-8 byte an adapter may lose, when it loses more than its nulls, without
    a FAIL (perplexity per token ``exp(0.006 b)`` times the base's at ``b`` bytes per
    token): significance alone would fail any measurable cost."""
    min_effect: float = 1e-4
    """Mean |change| per byte below which the adapter is taken to leave the prose alone."""


def corpus_chunks(corpus: str, chunk_chars: int, max_chunks: int) -> list[str]:
    return spread(chunks(load_corpus(corpus), chunk_chars), max_chunks)


def utf8_bytes(texts: list[str]) -> np.ndarray:
    return np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64)


def mean_gain(backend: DifferentialBackend, texts: list[str]) -> float:
    """Change in log-prob per UTF-8 byte over all texts together (byte-weighted)."""
    gains, _ = rolling_gain(backend, texts)
    return float(gains.sum() / max(1, int(utf8_bytes(texts).sum())))


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
        nbytes = utf8_bytes(texts)
        raw = float(gains.sum() / max(1, int(nbytes.sum())))
        per_chunk = gains / np.maximum(nbytes, 1)
        # The same total nats over the scored tokens: the absolute guard's unit.
        per_token = float(gains.sum()) / max(1, int(counts.sum()))
        ppl_change = math.exp(-per_token) - 1.0

        problems = []
        if per_token < cfg.assert_mean_delta_gte:
            problems.append(
                f"held-out prose lost {-per_token:.3g} nats/token (perplexity {ppl_change:+.1%}; "
                f"limit {cfg.assert_mean_delta_gte:g} nats/token)"
            )
        facts = (
            f"{raw:+.3g} nats/byte over {len(texts)} chunks "
            f"(perplexity per token {ppl_change:+.1%})"
        )
        reg = Regression(
            raw,
            problems,
            "held-out prose",
            facts,
            float(abs(per_chunk).mean()),
            "this prose",
            " nats/byte",
            min_effect=cfg.min_effect,
            z_min=cfg.assert_z_gte,
            tolerance=cfg.tolerance,
        )
        evidence = {
            "chunks": len(texts),
            "tokens": int(counts.sum()),
            "bytes": int(nbytes.sum()),
            "unit": "nats per UTF-8 byte",
            "corpus": cfg.corpus,
            "perplexity_change": ppl_change,
            "per_chunk": [float(g) for g in per_chunk],
        }
        # The unit in the key: a null cached per token must not be read per byte.
        key = (texts, "nats/byte")
        return judge_regression(self, cfg, ctx, reg, lambda b: mean_gain(b, texts), key, evidence)
