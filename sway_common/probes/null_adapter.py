"""null_adapter: how much does a random adapter of the same shape move the model?

This entry configures the null draws every calibrated probe is z-scored against (K
seeds, init scale, rank multipliers, fixed or norm-matched mode) and reports the
noise level itself, measured as mean next-token divergence on its prompts, with a
rank profile: the real adapter's z against nulls of rank r·m for each multiplier m.
It never gates the suite: its job is calibration, not judgment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sway_common.protocols import DifferentialBackend, NullCalibratedBackend, NullMode
from sway_common.stats import z_score
from sway_common.types import ProbeResult, Verdict

from .base import (
    DEFAULT_PROMPTS,
    Probe,
    ProbeConfig,
    RunContext,
    mean_divergence,
    register,
)
from .context import NextTokenDivergence, NullCalibration


@dataclass
class NullAdapterConfig(ProbeConfig):
    # The spec's fields of NullCalibration, with its defaults.
    runs: int = NullCalibration.runs
    init_scale: float = NullCalibration.init_scale
    seed_base: int = NullCalibration.seed_base
    rank_multipliers: list[float] = field(default_factory=lambda: [1.0])
    mode: NullMode = NullCalibration.mode
    calibrate_kinds: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    """Where the null level is measured; empty: the prompts of the suite's first divergence
    probe (so its null forwards serve both), else the built-in generic prompts."""

    def calibration(self) -> NullCalibration:
        return NullCalibration(
            runs=self.runs,
            init_scale=self.init_scale,
            seed_base=self.seed_base,
            rank_multipliers=tuple(self.rank_multipliers),
            mode=self.mode,
            calibrate_kinds=tuple(self.calibrate_kinds),
        )


@register
class NullAdapterProbe(Probe):
    kind = "null_adapter"
    claim = "nothing: it measures how much random adapters of this shape move the model"
    category = "calibration"
    gating = False
    Config = NullAdapterConfig

    def check(self, cfg: NullAdapterConfig) -> list[str]:
        problems = [
            p for p in super().check(cfg) if not p.startswith("prompts:")
        ]  # empty is allowed
        if cfg.runs < 2:
            problems.append("runs: needs at least 2 null draws to estimate a spread")
        if cfg.init_scale <= 0:
            problems.append("init_scale: must be > 0")
        if not cfg.rank_multipliers or any(m <= 0 for m in cfg.rank_multipliers):
            problems.append("rank_multipliers: must be a non-empty list of numbers > 0")
        elif cfg.mode == "norm_matched" and any(m != 1.0 for m in cfg.rank_multipliers):
            # Norm matching rescales each null to the adapter's norm, which cancels the rank's
            # larger variance: every multiplier would draw the same null level.
            problems.append(
                "rank_multipliers: norm-matched nulls are rescaled to the adapter's norm, so "
                "a rank multiplier changes nothing; set mode: fixed to compare ranks"
            )
        return problems

    def run(self, cfg: NullAdapterConfig, ctx: RunContext) -> ProbeResult:
        if not isinstance(ctx.backend, NullCalibratedBackend) or ctx.null is None:
            return self.result(
                cfg,
                Verdict.SKIP,
                message="backend cannot draw null adapters; probes use fixed thresholds",
            )

        prompts = cfg.prompts or list(DEFAULT_PROMPTS)

        def measure(backend: DifferentialBackend) -> list[float]:
            return mean_divergence(backend, prompts, top_k=ctx.top_k, kind="js")[1]

        real, _ = mean_divergence(ctx.backend, prompts, top_k=ctx.top_k, kind="js")
        profile = {}
        key = NextTokenDivergence("js", ctx.top_k, tuple(prompts))
        for m in ctx.null.rank_multipliers:
            stats, _ = ctx.null_per_prompt(measure, rank_scale=m, key=key)
            profile[f"{m:g}"] = {
                "mean": stats.mean,
                "std": stats.std,
                "z_real": z_score(real, stats),
            }
            if m == ctx.null.rank_multipliers[0]:
                primary = stats
        verdict = Verdict.WARN if primary.degenerate else Verdict.PASS
        msg = (
            f"{ctx.null.runs} {ctx.null.mode} nulls: mean JS {primary.mean:.3g} ± {primary.std:.2g}"
            + (" (degenerate: no z-scores possible)" if primary.degenerate else "")
        )
        return self.result(
            cfg,
            verdict,
            raw=primary.mean,
            null=primary,
            message=msg,
            evidence={
                "mode": ctx.null.mode,
                "init_scale": ctx.null.init_scale,
                "seeds": ctx.null.seeds,
                "rank_profile": profile,
                "real_mean_js": real,
            },
        )
