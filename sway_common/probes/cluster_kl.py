"""cluster_kl: is the adapter's shift specific to some topics, or spread over everything?

The prompts are grouped into ``num_clusters`` topics by k-means on embeddings (the base
model's own mean-pooled hidden states, offline; a local ``embedding_model`` directory if
given). Per prompt, the next-token divergence between base and fine-tuned view; per
cluster, its mean. Specificity = 1 - (mean of the other clusters) / (the most shifted
cluster): 0 for an even shift, 1 for a shift confined to one topic. The shift itself must
beat random adapters of the same size (as delta_kl) or the probe FAILs; a real shift PASSes
with a specificity of at least ``assert_specificity_gte`` that is also above every null
draw's specificity on the same topics (the max over clusters is biased up, so random
shifts look specific too), and WARNs otherwise (a broad shift may be intended); fewer
than ``min_prompts`` prompts WARN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sway_common.types import ProbeResult, Verdict

from .base import DEFAULT_PROMPTS, DivergenceConfig, Probe, RunContext, register
from .clusters import embed, kmeans
from .common import finding_verdict, judged_mean_divergence, judged_result
from .packs import BUILTIN, load_items, spread

DEFAULT_SIZE = 24


def default_prompts() -> list[str]:
    """The generic prompts plus general-knowledge prompts over every topic of the pack."""
    pack = [i.prompt for i in load_items(BUILTIN)]
    return [*DEFAULT_PROMPTS, *spread(pack, DEFAULT_SIZE - len(DEFAULT_PROMPTS))]


@dataclass
class ClusterKLConfig(DivergenceConfig):
    prompts: list[str] = field(default_factory=default_prompts)
    num_clusters: int = 5
    embedding_model: str | None = None
    min_prompts: int = 20
    assert_specificity_gte: float = 0.6


def specificity(
    per_prompt: Sequence[float], labels: np.ndarray
) -> tuple[float, int, dict[int, float]]:
    """(specificity, the most shifted cluster, mean divergence per cluster)."""
    values = np.asarray(per_prompt, dtype=np.float64)
    means = {int(c): float(values[labels == c].mean()) for c in np.unique(labels)}
    top = max(means, key=means.__getitem__)
    others = [m for c, m in means.items() if c != top]
    if means[top] <= 0 or not others:
        return 0.0, top, means
    return float(np.clip(1.0 - np.mean(others) / means[top], 0.0, 1.0)), top, means


@register
class ClusterKLProbe(Probe):
    kind = "cluster_kl"
    claim = "the adapter's shift is beyond random adapters of its size and concentrated on some topics of the prompts"
    category = "adherence"
    Config = ClusterKLConfig

    def check(self, cfg: ClusterKLConfig) -> list[str]:
        problems = super().check(cfg)
        if cfg.num_clusters < 2:
            problems.append("num_clusters: must be >= 2")
        if not 0 <= cfg.assert_specificity_gte <= 1:
            problems.append("assert_specificity_gte: must lie in [0, 1]")
        return problems

    def run(self, cfg: ClusterKLConfig, ctx: RunContext) -> ProbeResult:
        n = len(cfg.prompts)
        if n < cfg.min_prompts:
            return self.result(
                cfg,
                Verdict.WARN,
                score=0.5,
                message=(
                    f"{n} prompts are too few to find topics (min_prompts {cfg.min_prompts}); "
                    "give prompts on the adapter's subject and on others"
                ),
            )
        vectors, source = embed(ctx.backend, cfg.prompts, cfg.embedding_model)
        if vectors is None:
            return self.result(cfg, Verdict.SKIP, message=f"no embeddings: {source}")
        k = max(2, min(cfg.num_clusters, n // 2))  # a cluster of one prompt says nothing
        labels = kmeans(vectors, k, seed=ctx.seed)
        d = judged_mean_divergence(cfg, ctx, self.kind)
        j = d.judgement
        spec, top, means = specificity(d.per_prompt, labels)
        top_prompts = [p for p, c in zip(cfg.prompts, labels, strict=True) if c == top]
        where = f"most shifted topic ({len(top_prompts)} prompts, e.g. {top_prompts[0]!r}) {means[top]:.3g}"
        # A broad shift (style, format) can be what the author wanted: a finding to look
        # at, not evidence that the adapter is broken.
        spread = (
            f"a real shift, spread over topics: specificity {spec:.2f} < "
            f"{cfg.assert_specificity_gte:g}; {where}"
        )
        # The max over clusters is biased up: random adapters' shifts look specific too.
        noise = [specificity(row, labels)[0] for row in j.null_rows or []]
        as_random = (
            f"a real shift, but no more specific than random adapters' shifts on these topics "
            f"(specificity {spec:.2f}, theirs up to {max(noise):.2f}); {where}"
            if noise and spec <= max(noise)
            else None
        )
        problem = (Verdict.WARN, spread) if spec < cfg.assert_specificity_gte else None
        verdict, msg, score = finding_verdict(
            j,
            "no shift to localise",
            problem or ((Verdict.WARN, as_random) if as_random else None),
            f"specificity {spec:.2f}: {where}; {j.message}",
        )
        return judged_result(
            self,
            cfg,
            verdict,
            j,
            d.null,
            score=score,
            raw=spec,
            message=msg,
            evidence={
                **self._evidence(cfg, labels, d.per_prompt, means, k, source, d.raw),
                "null_specificity": noise,
            },
        )

    @staticmethod
    def _evidence(
        cfg: ClusterKLConfig,
        labels: np.ndarray,
        per_prompt: list[float],
        means: dict[int, float],
        k: int,
        source: str,
        raw: float,
    ) -> dict[str, Any]:
        return {
            "embeddings": source,
            "clusters": k,
            "mean_divergence": raw,
            "per_prompt": per_prompt,
            "cluster_means": {str(c): m for c, m in means.items()},
            "labels": [int(c) for c in labels],
            "prompts": list(cfg.prompts),
        }
