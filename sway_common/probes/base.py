"""What every probe shares: its config shape, the registry, the run context, judging.

A probe kind is a :class:`Probe` subclass with a dataclass ``Config``; the spec loader
validates suite entries against that dataclass, so a new probe needs no spec changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from sway_common.divergence import divergence
from sway_common.protocols import DifferentialBackend, NullCalibratedBackend, NullMode
from sway_common.stats import null_stats, p_value, z_score
from sway_common.types import NullStats, ProbeResult, Verdict

from .null_proxy import NullCalibrationBackendProxy

DEFAULT_PROMPTS: tuple[str, ...] = (
    "The most important thing to remember is",
    "Once upon a time",
    "In this document we explain",
    "The key takeaway is",
    "A short summary:",
    "The first step is",
    "It is worth noting that",
    "To answer the question,",
)


@dataclass
class ProbeConfig:
    """Fields every suite entry may carry."""

    name: str
    kind: str
    enabled: bool = True
    weight: float = 1.0
    gate: bool | None = None
    """Whether a FAIL fails the suite; None keeps the probe kind's default."""


@dataclass
class DivergenceConfig(ProbeConfig):
    """Fields of the probes that judge a mean next-token divergence against the null."""

    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    divergence: Literal["js", "kl"] = "js"
    top_k: int | None = None
    assert_z_gte: float = 3.0
    assert_mean_gte: float = 0.02
    """Fixed threshold, used only when no null calibration is possible."""
    min_effect: float = 1e-3
    """Effect floor in nats: below it an adapter fails however significant it is."""


@dataclass(frozen=True)
class NullCalibration:
    """How null adapters are drawn for this run."""

    runs: int = 8
    init_scale: float = 0.02
    seed_base: int = 1000
    rank_multipliers: tuple[float, ...] = (1.0,)
    mode: NullMode = "norm_matched"
    calibrate_kinds: tuple[str, ...] = ()
    """Probe kinds to calibrate; empty means all calibrated kinds."""

    @property
    def seeds(self) -> list[int]:
        return [self.seed_base + i for i in range(self.runs)]


@dataclass
class RunContext:
    backend: Any
    seed: int = 0
    top_k: int = 256
    null: NullCalibration | None = None
    """None when the backend cannot draw null adapters: probes fall back to fixed thresholds."""
    progress: Callable[[str], None] = field(default=lambda _msg: None)

    def calibrates(self, kind: str) -> bool:
        if self.null is None or not isinstance(self.backend, NullCalibratedBackend):
            return False
        return not self.null.calibrate_kinds or kind in self.null.calibrate_kinds

    def null_stats_for(
        self, measure: Callable[[DifferentialBackend], float], rank_scale: float = 1.0
    ) -> NullStats:
        """Run ``measure`` under each null seed at one rank scale."""
        assert self.null is not None
        values = []
        for seed in self.null.seeds:
            self.progress(f"null seed {seed} (rank×{rank_scale:g})")
            proxy = NullCalibrationBackendProxy(
                self.backend,
                seed=seed,
                init_scale=self.null.init_scale,
                rank_scale=rank_scale,
                mode=self.null.mode,
            )
            values.append(measure(proxy))
        return null_stats(values)


class Probe:
    kind: ClassVar[str]
    category: ClassVar[str] = "adherence"
    gating: ClassVar[bool] = True
    Config: ClassVar[type[ProbeConfig]] = ProbeConfig

    def run(self, cfg: Any, ctx: RunContext) -> ProbeResult:
        raise TypeError(f"{type(self).__name__} must define run()")

    def check(self, cfg: Any) -> list[str]:
        """Problems with a parsed config, as "field: message" lines (the spec loader prefixes the path)."""
        problems = []
        if hasattr(cfg, "prompts") and not cfg.prompts:
            problems.append("prompts: needs at least one prompt")
        if hasattr(cfg, "top_k") and cfg.top_k is not None and cfg.top_k < 1:
            problems.append("top_k: must be >= 1")
        return problems

    def result(self, cfg: ProbeConfig, verdict: Verdict, **kw: Any) -> ProbeResult:
        gating = self.gating if cfg.gate is None else cfg.gate
        return ProbeResult(
            name=cfg.name, kind=self.kind, verdict=verdict, category=self.category,
            gating=gating, weight=cfg.weight, **kw,
        )


REGISTRY: dict[str, type[Probe]] = {}


def register(cls: type[Probe]) -> type[Probe]:
    REGISTRY[cls.kind] = cls
    return cls


# ------------------------------------------------------------------ shared measures
def mean_divergence(
    backend: DifferentialBackend, prompts: Sequence[str], *, top_k: int, kind: str
) -> tuple[float, list[float]]:
    """Mean next-token divergence between the base and fine-tuned views over prompts."""
    with backend.as_base() as base:
        p = base.next_token_dist_batch(prompts, top_k=top_k)
    with backend.as_finetuned() as ft:
        q = ft.next_token_dist_batch(prompts, top_k=top_k)
    per_prompt = [divergence(a, b, kind=kind) for a, b in zip(p, q, strict=True)]  # type: ignore[arg-type]
    return sum(per_prompt) / len(per_prompt), per_prompt


@dataclass
class Judgement:
    verdict: Verdict
    message: str
    z: float | None
    p: float | None
    ratio: float | None
    score: float


def judge_against_null(
    raw: float,
    null: NullStats | None,
    *,
    z_min: float,
    floor: float,
    fixed_threshold: float,
    p_max: float = 0.05,
    unit: str = "",
) -> Judgement:
    """PASS needs significance against the null AND an effect above ``floor``.

    Without a null (backend cannot draw one) the fixed threshold decides.
    """
    shown = f"{raw:.3g}{unit}"
    if null is None:
        ok = raw >= fixed_threshold
        return Judgement(
            Verdict.PASS if ok else Verdict.FAIL,
            f"{shown} {'≥' if ok else '<'} fixed threshold {fixed_threshold:g} (no null calibration)",
            None, None, None, min(1.0, raw / (2 * fixed_threshold)) if fixed_threshold > 0 else 0.0,
        )
    ratio = raw / null.mean if null.mean > 0 else None
    z = z_score(raw, null)
    p = p_value(raw, null)
    if z is None:
        if raw < floor:
            msg = f"no measurable effect ({shown}); null draws are degenerate too"
            return Judgement(Verdict.FAIL, msg, None, None, ratio, 0.0)
        msg = f"{shown}, but the null draws are degenerate (all ≈ {null.mean:.3g}): no z-score"
        return Judgement(Verdict.WARN, msg, None, None, ratio, 0.0)
    significance = z * z / (z * z + z_min * z_min) if z > 0 else 0.0
    ratio_txt = f", {ratio:.3g}× a null adapter" if ratio is not None else ""
    if z < z_min or (p is not None and p > p_max):
        msg = f"indistinguishable from a null adapter: z={z:+.2f}σ (p={p:.2g}){ratio_txt}"
        return Judgement(Verdict.FAIL, msg, z, p, ratio, significance)
    if raw < floor:
        msg = f"significant (z={z:+.1f}σ) but tiny: {shown} is below the effect floor {floor:g}"
        return Judgement(Verdict.FAIL, msg, z, p, ratio, significance * raw / floor)
    msg = f"{shown}, z={z:+.1f}σ above its null (p={p:.2g}){ratio_txt}"
    return Judgement(Verdict.PASS, msg, z, p, ratio, significance)


def finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None
