"""adapter_ablation: does the effect grow the way a learned update should as λ goes 0 → 1.25?

The mean next-token divergence from the base is traced over λ (the LoRA term scaled by
λ). For a small update a divergence grows like λ² (KL and JS are quadratic near zero),
then bends toward saturation, so the reference shape is a power law, not a line. A
healthy adapter gives a curve that rises monotonically, with a log–log exponent in
[``exponent_min``, ``exponent_max``] fitted well (R² >= ``assert_linearity_gte``), reaches
90% of its λ=1 value late (saturation λ in ``assert_saturation_between``), and still moves
past λ=1 (overshoot d(1.25)/d(1) >= ``assert_overshoot_gte``). The verdict is the λ=1
point's against the nulls, as delta_kl judges it; the shape is reported beside it, not
judged: a random adapter at a trained norm traces a healthy shape too, and a strong
trained one saturates, so the shape alone tells neither apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sway_common.backend.views import ViewSpec
from sway_common.divergence import divergence
from sway_common.protocols import ScalableDifferentialBackend
from sway_common.stats import linear_fit
from sway_common.types import ProbeResult, Verdict

from .base import DivergenceConfig, Probe, RunContext, judge_divergence, register
from .common import judged_result
from .views import next_token_dists_in_views

# A fall this small between neighbouring λ is numerical noise, not a non-monotone curve.
MONOTONE_SLACK = 0.02


@dataclass
class AdapterAblationConfig(DivergenceConfig):
    lambdas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0, 1.25])
    assert_linearity_gte: float = 0.85
    """R² of the power-law (log–log line) fit over 0 < λ <= 1."""
    assert_saturation_between: tuple[float, float] = (0.3, 1.05)
    assert_overshoot_gte: float = 1.02
    exponent_min: float = 0.5
    exponent_max: float = 3.0
    """The log–log slope band: ~2 for a small update (quadratic), lower as it saturates."""


@dataclass
class Shape:
    exponent: float | None
    r2: float | None
    saturation: float | None
    overshoot: float | None
    problems: list[str]


def saturation_lambda(lams: list[float], curve: list[float], level: float) -> float | None:
    """Smallest λ (linearly interpolated) where the curve first reaches ``level``."""
    for i, (lam, d) in enumerate(zip(lams, curve, strict=True)):
        if d >= level:
            if i == 0:
                return lam
            lo, dlo = lams[i - 1], curve[i - 1]
            return lo + (lam - lo) * (level - dlo) / (d - dlo) if d > dlo else lam
    return None


def power_fit(lams: list[float], curve: list[float]) -> tuple[float | None, float | None]:
    """(exponent, R²) of ``d = c·λ^e`` fitted on log–log over 0 < λ <= 1 with d > 0."""
    pts = [
        (math.log(lam), math.log(d))
        for lam, d in zip(lams, curve, strict=True)
        if 0 < lam <= 1 and d > 0
    ]
    if len({x for x, _ in pts}) < 2:
        return None, None
    slope, _, r2 = linear_fit([x for x, _ in pts], [y for _, y in pts])
    return slope, r2


def judge_shape(lams: list[float], curve: list[float], cfg: AdapterAblationConfig) -> Shape:
    """What is wrong with the dose-response curve, if anything (λs sorted, 0 and 1 included)."""
    at_one = curve[lams.index(1.0)]
    exponent, r2 = power_fit(lams, curve)
    sat = saturation_lambda(lams, curve, 0.9 * at_one) if at_one > 0 else None
    overshoot = curve[-1] / at_one if at_one > 0 and lams[-1] > 1.0 else None
    lo, hi = cfg.assert_saturation_between
    problems = []
    if curve[lams.index(0.0)] > 1e-6:
        problems.append(
            f"λ=0 differs from the base (d={curve[lams.index(0.0)]:.2g}): backend scaling is broken"
        )
    steps = zip(lams, lams[1:], curve, curve[1:], strict=False)
    falls = [(a, b) for a, b, da, db in steps if db < da * (1 - MONOTONE_SLACK)]
    if falls:
        problems.append(f"the effect falls as λ grows ({falls[0][0]:g} → {falls[0][1]:g})")
    if exponent is None or not cfg.exponent_min <= exponent <= cfg.exponent_max:
        shown = "undefined" if exponent is None else f"{exponent:.2f}"
        problems.append(
            f"growth exponent {shown} outside [{cfg.exponent_min:g}, {cfg.exponent_max:g}]"
        )
    elif r2 is not None and r2 < cfg.assert_linearity_gte:
        problems.append(
            f"the curve is not a power law (log–log R²={r2:.2f} < {cfg.assert_linearity_gte:g})"
        )
    if sat is None or not lo <= sat <= hi:
        problems.append(
            f"saturation λ {sat if sat is None else round(sat, 2)} outside [{lo:g}, {hi:g}]"
        )
    if overshoot is not None and overshoot < cfg.assert_overshoot_gte:
        problems.append(
            f"overshoot {overshoot:.2f} < {cfg.assert_overshoot_gte:g}: the adapter has saturated"
        )
    return Shape(exponent, r2, sat, overshoot, problems)


@register
class AdapterAblationProbe(Probe):
    kind = "adapter_ablation"
    claim = "at λ=1 the adapter moves next-token distributions beyond random adapters of its size, as delta_kl claims; the λ curve's shape is reported, not claimed"
    category = "ablation"
    Config = AdapterAblationConfig

    def check(self, cfg: AdapterAblationConfig) -> list[str]:
        problems = super().check(cfg)
        if len(set(cfg.lambdas)) < 3:
            problems.append("lambdas: needs at least 3 distinct values to trace a curve")
        if any(lam < 0 for lam in cfg.lambdas):
            problems.append("lambdas: must be >= 0")
        lo, hi = cfg.assert_saturation_between
        if lo > hi:
            problems.append("assert_saturation_between: the lower bound exceeds the upper")
        if cfg.exponent_min > cfg.exponent_max:
            problems.append("exponent_min: exceeds exponent_max")
        return problems

    def run(self, cfg: AdapterAblationConfig, ctx: RunContext) -> ProbeResult:
        if not isinstance(ctx.backend, ScalableDifferentialBackend):
            return self.result(cfg, Verdict.SKIP, message="backend cannot scale the adapter")
        lams = sorted(set(cfg.lambdas) | {0.0, 1.0})
        top_k = cfg.top_k or ctx.top_k
        # Base and every λ in one call: stacked into shared batches where the backend
        # can (λ=0 and λ=1 are the base and ft views, computed once).
        ctx.progress(f"{len(lams)} λ views")
        views = [ViewSpec("base")] + [ViewSpec("scaled", lam=lam) for lam in lams]
        p, *per_view = next_token_dists_in_views(ctx.backend, views, cfg.prompts, top_k=top_k)
        per_lambda = [
            [divergence(a, b, kind=cfg.divergence) for a, b in zip(p, q, strict=True)]
            for q in per_view
        ]
        curve = [sum(d) / len(d) for d in per_lambda]
        at_one, per_prompt = curve[lams.index(1.0)], per_lambda[lams.index(1.0)]
        sig, null = judge_divergence(
            cfg, ctx, self.kind, at_one, per_prompt, top_k, unit=" nats at λ=1"
        )
        shape = judge_shape(lams, curve, cfg)
        # The verdict is the effect's. The curve's shape is reported, not judged: random
        # adapters at a trained norm give "healthy" curves too, and a strong trained one
        # saturates (no overshoot), so the shape alone tells neither apart.
        verdict = sig.verdict
        if sig.verdict is not Verdict.PASS:
            message = f"curve not judged: {sig.message}"
        elif shape.problems:
            message = f"{sig.message}; curve shape (reported, not judged): " + "; ".join(
                shape.problems
            )
        else:
            message = (
                f"grows like λ^{shape.exponent:.2f}, saturation λ={shape.saturation:.2f}"
                + (f", overshoot {shape.overshoot:.2f}" if shape.overshoot is not None else "")
                + f"; {sig.message}"
            )
        # A curve only earns credit once the adapter is distinguishable from noise.
        score = max(0.0, 1 - len(shape.problems) / 3) if sig.verdict is Verdict.PASS else 0.0
        return judged_result(
            self,
            cfg,
            verdict,
            sig,
            null,
            score=score,
            raw=at_one,
            message=message,
            evidence={
                "lambdas": lams,
                "curve": curve,
                "exponent": shape.exponent,
                "r_squared": shape.r2,
                "saturation_lambda": shape.saturation,
                "overshoot": shape.overshoot,
                "problems": shape.problems,
                "divergence": cfg.divergence,
                "z_scale": "log",
                "effect_ratio_interval": sig.ratio_interval,
            },
        )
