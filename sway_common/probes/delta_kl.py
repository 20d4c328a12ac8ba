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

from .base import DivergenceConfig, Probe, RunContext, register
from .common import judged_mean_divergence, judged_result


@dataclass
class DeltaKLConfig(DivergenceConfig):
    """delta_kl takes exactly the shared divergence fields."""


@register
class DeltaKLProbe(Probe):
    kind = "delta_kl"
    claim = "on these prompts the adapter moves next-token distributions beyond random adapters of its size (significant, above the effect floor, at least min_effect_ratio times theirs)"
    category = "adherence"
    Config = DeltaKLConfig

    def run(self, cfg: DeltaKLConfig, ctx: RunContext) -> ProbeResult:
        d = judged_mean_divergence(cfg, ctx, self.kind)
        j = d.judgement
        return judged_result(
            self,
            cfg,
            j.verdict,
            j,
            d.null,
            score=j.score,
            raw=d.raw,
            message=j.message,
            evidence={
                "divergence": cfg.divergence,
                "top_k": d.top_k,
                "per_prompt": d.per_prompt,
                "prompts": list(cfg.prompts),
                "max": max(d.per_prompt),
                "z_scale": "log",
                "z_linear": j.z_linear,
                "effect_ratio_interval": j.ratio_interval,
                "fail_reason": j.fail_reason,
            },
        )
