"""delta_kl: does the adapter move the next-token distribution on the author's prompts?

For each prompt, the divergence (JS by default) between the base and fine-tuned
next-token distributions; the probe's metric is their mean. Judged against the same
metric under null adapters: a PASS needs z above ``assert_z_gte`` and a mean above
``min_effect`` (a near-zero adapter can be "significant" and still change nothing).
It cannot say whether the change is *correct*, only that it is real.
"""

from __future__ import annotations

from dataclasses import dataclass

from sway_common.types import ProbeResult

from .base import (
    DivergenceConfig,
    Probe,
    RunContext,
    judge_against_null,
    mean_divergence,
    register,
)


@dataclass
class DeltaKLConfig(DivergenceConfig):
    """delta_kl takes exactly the shared divergence fields."""


@register
class DeltaKLProbe(Probe):
    kind = "delta_kl"
    category = "adherence"
    Config = DeltaKLConfig

    def run(self, cfg: DeltaKLConfig, ctx: RunContext) -> ProbeResult:
        top_k = cfg.top_k or ctx.top_k

        def measure(backend: object) -> float:
            return mean_divergence(backend, cfg.prompts, top_k=top_k, kind=cfg.divergence)[0]  # type: ignore[arg-type]

        raw, per_prompt = mean_divergence(
            ctx.backend, cfg.prompts, top_k=top_k, kind=cfg.divergence
        )
        null = ctx.null_stats_for(measure) if ctx.calibrates(self.kind) else None
        j = judge_against_null(
            raw, null, z_min=cfg.assert_z_gte, floor=cfg.min_effect,
            fixed_threshold=cfg.assert_mean_gte, unit=f" nats mean {cfg.divergence.upper()}",
        )
        return self.result(
            cfg, j.verdict, score=j.score, raw=raw, z=j.z, p_value=j.p, effect_ratio=j.ratio,
            null=null, message=j.message,
            evidence={
                "divergence": cfg.divergence, "top_k": top_k, "per_prompt": per_prompt,
                "prompts": list(cfg.prompts), "max": max(per_prompt),
            },
        )

