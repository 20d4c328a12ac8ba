"""adapter_ablation: how does the model respond as the adapter is dialled from 0 to 1.25?

The mean next-token divergence from the base is traced over λ (the LoRA term scaled
by λ). A healthy adapter gives a curve that grows roughly linearly (R² of a line fit),
reaches 90% of its λ=1 value late rather than early (saturation λ), and still moves
when pushed past 1 (overshoot = d(1.25) / d(1)). A curve's shape means nothing when
the adapter is indistinguishable from noise, so the λ=1 point must also beat the null.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sway_common.divergence import divergence
from sway_common.protocols import ScalableDifferentialBackend
from sway_common.stats import linear_fit
from sway_common.types import ProbeResult, Verdict

from .base import (
    DivergenceConfig,
    Probe,
    RunContext,
    judge_against_null,
    mean_divergence,
    register,
)


@dataclass
class AdapterAblationConfig(DivergenceConfig):
    lambdas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0, 1.25])
    assert_linearity_gte: float = 0.85
    assert_saturation_between: tuple[float, float] = (0.3, 1.05)
    assert_overshoot_gte: float = 1.02


def saturation_lambda(lams: list[float], curve: list[float], level: float) -> float | None:
    """Smallest λ (linearly interpolated) where the curve first reaches ``level``."""
    for i, (lam, d) in enumerate(zip(lams, curve, strict=True)):
        if d >= level:
            if i == 0:
                return lam
            lo, dlo = lams[i - 1], curve[i - 1]
            return lo + (lam - lo) * (level - dlo) / (d - dlo) if d > dlo else lam
    return None


@register
class AdapterAblationProbe(Probe):
    kind = "adapter_ablation"
    category = "ablation"
    Config = AdapterAblationConfig

    def check(self, cfg: AdapterAblationConfig) -> list[str]:
        problems = super().check(cfg)
        if len(set(cfg.lambdas)) < 3:
            problems.append("lambdas: needs at least 3 distinct values to trace a curve")
        lo, hi = cfg.assert_saturation_between
        if lo > hi:
            problems.append("assert_saturation_between: the lower bound exceeds the upper")
        return problems

    def run(self, cfg: AdapterAblationConfig, ctx: RunContext) -> ProbeResult:
        if not isinstance(ctx.backend, ScalableDifferentialBackend):
            return self.result(cfg, Verdict.SKIP, message="backend cannot scale the adapter")
        lams = sorted(set(cfg.lambdas) | {0.0, 1.0})
        top_k = cfg.top_k or ctx.top_k
        with ctx.backend.as_base() as base:
            p = base.next_token_dist_batch(cfg.prompts, top_k=top_k)
        curve = []
        for lam in lams:
            ctx.progress(f"λ={lam:g}")
            with ctx.backend.as_scaled_adapter(lam) as view:
                q = view.next_token_dist_batch(cfg.prompts, top_k=top_k)
            curve.append(sum(divergence(a, b, kind=cfg.divergence) for a, b in zip(p, q, strict=True)) / len(p))

        at_one = curve[lams.index(1.0)]

        def measure(backend: object) -> float:
            return mean_divergence(backend, cfg.prompts, top_k=top_k, kind=cfg.divergence)[0]  # type: ignore[arg-type]

        null = ctx.null_stats_for(measure) if ctx.calibrates(self.kind) else None
        sig = judge_against_null(
            at_one, null, z_min=cfg.assert_z_gte, floor=cfg.min_effect,
            fixed_threshold=cfg.assert_mean_gte, unit=" nats at λ=1",
        )
        _, _, r2 = linear_fit(lams, curve)
        sat = saturation_lambda(lams, curve, 0.9 * at_one) if at_one > 0 else None
        top = max(lams)
        overshoot = curve[-1] / at_one if at_one > 0 and top > 1.0 else None
        lo, hi = cfg.assert_saturation_between
        problems = []
        if curve[lams.index(0.0)] > 1e-6:
            problems.append(f"λ=0 differs from the base (d={curve[0]:.2g}): backend scaling is broken")
        if r2 < cfg.assert_linearity_gte:
            problems.append(f"response is not linear (R²={r2:.2f} < {cfg.assert_linearity_gte:g})")
        if sat is None or not lo <= sat <= hi:
            problems.append(f"saturation λ {sat if sat is None else round(sat, 2)} outside [{lo:g}, {hi:g}]")
        if overshoot is not None and overshoot < cfg.assert_overshoot_gte:
            problems.append(f"overshoot {overshoot:.2f} < {cfg.assert_overshoot_gte:g}: the adapter has saturated")

        if sig.verdict is not Verdict.PASS:
            verdict, message = sig.verdict, f"curve not judged: {sig.message}"
        elif problems:
            verdict, message = Verdict.FAIL, "; ".join(problems)
        else:
            verdict = Verdict.PASS
            message = f"healthy response: R²={r2:.2f}, saturation λ={sat:.2f}" + (
                f", overshoot {overshoot:.2f}" if overshoot is not None else ""
            ) + f"; {sig.message}"
        # A curve only earns credit once the adapter is distinguishable from noise.
        score = max(0.0, 1 - len(problems) / 3) if sig.verdict is Verdict.PASS else 0.0
        return self.result(
            cfg, verdict, score=score, raw=at_one, z=sig.z, p_value=sig.p,
            effect_ratio=sig.ratio, null=null, message=message,
            evidence={
                "lambdas": lams, "curve": curve, "r_squared": r2, "saturation_lambda": sat,
                "overshoot": overshoot, "problems": problems, "divergence": cfg.divergence,
            },
        )
