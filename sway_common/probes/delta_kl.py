"""delta_kl: does the adapter move the next-token distribution on the author's prompts?

For each prompt, the divergence (JS by default) between the base and fine-tuned
next-token distributions; the probe's metric is their mean. Judged against the same
metric under null adapters, on log scale (divergences are skewed across null seeds): a
PASS needs z above ``assert_z_gte`` with a small-sample p <= 0.05, a mean above
``min_effect`` (a near-zero adapter can be "significant" and still change nothing), at
least ``min_effect_ratio`` times a null's effect, and a ratio whose bootstrap interval
over prompts stays above 1x (paired with the nulls prompt by prompt).
It cannot say whether the change is *correct*, only that it is real.
"""

from __future__ import annotations

from dataclasses import dataclass

from sway_common.types import ProbeResult

from .base import (
    DivergenceConfig,
    Probe,
    RunContext,
    judge_divergence,
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
        raw, per_prompt = mean_divergence(
            ctx.backend, cfg.prompts, top_k=top_k, kind=cfg.divergence
        )
        j, null = judge_divergence(
            cfg, ctx, self.kind, raw, per_prompt, top_k, unit=f" nats mean {cfg.divergence.upper()}"
        )
        return self.result(
            cfg,
            j.verdict,
            score=j.score,
            raw=raw,
            z=j.z,
            p_value=j.p,
            effect_ratio=j.ratio,
            null=null,
            message=j.message,
            evidence={
                "divergence": cfg.divergence,
                "top_k": top_k,
                "per_prompt": per_prompt,
                "prompts": list(cfg.prompts),
                "max": max(per_prompt),
                "z_scale": "log",
                "z_linear": j.z_linear,
                "effect_ratio_interval": j.ratio_interval,
                "fail_reason": j.fail_reason,
            },
        )
