"""What every probe shares: its config shape, the registry, judging against nulls.

A probe kind is a :class:`Probe` subclass with a dataclass ``Config``; the spec loader
validates suite entries against that dataclass, so a new probe needs no spec changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sway_common.backend.views import ViewSpec
from sway_common.divergence import DivergenceKind, bounded_effect, divergence
from sway_common.protocols import DifferentialBackend
from sway_common.stats import format_z, log_values, null_stats, p_value, paired_ratio, z_score
from sway_common.types import NullStats, ProbeResult, Verdict

from .context import NextTokenDivergence, RunContext
from .views import next_token_dists_in_views

# Below this many prompts a bootstrap over them cannot bound the effect ratio (its lower
# bound lands above 1× for a true 1× far more often than its nominal 2.5%): such a
# probe decides on z and the ratio alone, and says so.
MIN_PROMPTS_FOR_INTERVAL = 6

# Null effects below this (nats) are numerical zero: their ratio scales nothing, and only
# the absolute effect floor can tell a near-zero adapter from a real one.
NULLS_RESOLVED = 1e-6

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
    divergence: DivergenceKind = "js"
    top_k: int | None = None
    assert_z_gte: float = 3.0
    assert_mean_gte: float = 0.02
    """Fixed threshold, used only when no null calibration is possible."""
    min_effect: float = 1e-3
    """Absolute effect floor in nats: below it an adapter fails however significant it is,
    unless it clears ``min_effect_over_nulls``."""
    min_effect_over_nulls: float = 5.0
    """The floor relative to the nulls: an effect below ``min_effect`` still counts when it
    is at least this many times what random adapters of its size do (and theirs is above
    numerical zero): a light adapter's small effect, far beyond its size's."""
    min_effect_ratio: float = 1.5
    """The adapter must move the model this many times more than a random adapter of its
    size (norm-matched nulls): below it the *direction* is not what moves the model. What
    random adapters at trained norms reach: docs/statistics.md."""


class Probe:
    """One kind of check of an adapter. Subclasses set ``kind`` (the spec's ``kind:``),
    a dataclass ``Config`` (the fields a suite entry may carry) and :meth:`run`, which
    measures on ``ctx.backend``, judges against the nulls and returns one result.

    ``category`` groups results in reports; ``gating``: whether a FAIL fails the suite
    by default (a config's ``gate`` overrides it).
    """

    kind: ClassVar[str]
    claim: ClassVar[str] = ""
    """What a PASS of this kind claims about the adapter, in one sentence (list-probes)."""
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
        if getattr(cfg, "min_effect_over_nulls", 1.0) < 1.0:
            problems.append("min_effect_over_nulls: must be >= 1 (a multiple of the nulls' effect)")
        return problems + empty_texts(cfg)

    def result(self, cfg: ProbeConfig, verdict: Verdict, **kw: Any) -> ProbeResult:
        gating = self.gating if cfg.gate is None else cfg.gate
        return ProbeResult(
            name=cfg.name,
            kind=self.kind,
            verdict=verdict,
            category=self.category,
            gating=gating,
            weight=cfg.weight,
            **kw,
        )


def empty_texts(cfg: Any) -> list[str]:
    """Empty prompts and empty completions, wherever a probe keeps them.

    An empty completion scores 0 nats in every view, so it would read as "unchanged"
    rather than as the typo it is; an empty prompt has no token to predict from.
    """
    fix = "write the text, or remove the entry"
    problems = [
        f"prompts[{i}]: the prompt is empty; {fix}"
        for i, p in enumerate(getattr(cfg, "prompts", None) or [])
        if isinstance(p, str) and not p.strip()
    ]
    for i, item in enumerate(getattr(cfg, "items", None) or []):
        if isinstance(item, list | tuple) and len(item) == 2 and item[1] == "":
            problems.append(f"items[{i}]: the gold answer is an empty completion; {fix}")
    for field_name, keys in (("triples", ("chosen", "rejected")), ("cases", ("gold",))):
        for i, entry in enumerate(getattr(cfg, field_name, None) or []):
            for key in keys:
                if isinstance(entry, dict) and entry.get(key) == "":
                    problems.append(f"{field_name}[{i}].{key}: an empty completion; {fix}")
    return problems


REGISTRY: dict[str, type[Probe]] = {}


def register(cls: type[Probe]) -> type[Probe]:
    REGISTRY[cls.kind] = cls
    return cls


# ------------------------------------------------------------------ shared measures
def mean_divergence(
    backend: DifferentialBackend, prompts: Sequence[str], *, top_k: int, kind: DivergenceKind
) -> tuple[float, list[float]]:
    """Mean next-token divergence between the base and fine-tuned views over prompts."""
    p, q = next_token_dists_in_views(
        backend, [ViewSpec("base"), ViewSpec("ft")], prompts, top_k=top_k
    )
    per_prompt = [divergence(a, b, kind=kind) for a, b in zip(p, q, strict=True)]
    return sum(per_prompt) / len(per_prompt), per_prompt


def judge_divergence(
    cfg: DivergenceConfig,
    ctx: RunContext,
    kind: str,
    raw: float,
    per_prompt: Sequence[float],
    top_k: int,
    unit: str,
) -> tuple[Judgement, NullStats | None]:
    """Draw the nulls on ``cfg.prompts`` and judge a mean divergence, paired by prompt
    (without nulls, against the config's fixed threshold)."""
    null: NullStats | None = None
    paired = effect = rows = None
    if ctx.calibrates(kind):

        def measure(backend: DifferentialBackend) -> list[float]:
            return mean_divergence(backend, cfg.prompts, top_k=top_k, kind=cfg.divergence)[1]

        request = NextTokenDivergence(cfg.divergence, top_k, tuple(cfg.prompts))
        null, rows = ctx.null_per_prompt(measure, key=request)
        # The effect ratio on a scale JS's bound cannot cap (KL has none: as measured).
        scale = bounded_effect if cfg.divergence == "js" else float
        mine = [scale(x) for x in per_prompt]
        theirs = [[scale(x) for x in row] for row in rows]
        effect = (sum(mine) / len(mine), null_stats([sum(r) / len(r) for r in theirs]))
        if len(mine) >= MIN_PROMPTS_FOR_INTERVAL:
            paired = paired_ratio(mine, theirs, seed=ctx.seed)
    j = judge_against_null(
        raw,
        null,
        z_min=cfg.assert_z_gte,
        floor=cfg.min_effect,
        floor_over_nulls=cfg.min_effect_over_nulls,
        fixed_threshold=cfg.assert_mean_gte,
        unit=unit,
        log_scale=True,
        min_ratio=cfg.min_effect_ratio,
        paired=paired,
        effect=effect,
    )
    j.null_rows = rows
    if null is not None and paired is None:
        j.message += (
            f"; {len(per_prompt)} prompts are too few for an interval over prompts "
            f"(needs {MIN_PROMPTS_FOR_INTERVAL}): decided on z and the ratio"
        )
    return j, null


@dataclass
class Judgement:
    verdict: Verdict
    message: str
    z: float | None
    p: float | None
    ratio: float | None
    score: float
    ratio_interval: tuple[float, float] | None = None
    """95% bootstrap interval of the effect ratio over prompts (paired with the nulls)."""
    z_linear: float | None = None
    """z on the metric itself, when the verdict used log scale."""
    fail_reason: str | None = None
    """What a FAIL failed on: significance, floor, ratio or prompts."""
    null_rows: list[list[float]] | None = None
    """The metric per null draw and prompt (K × P), for findings judged against the nulls."""


def judge_against_null(
    raw: float,
    null: NullStats | None,
    *,
    z_min: float,
    floor: float,
    fixed_threshold: float,
    p_max: float = 0.05,
    unit: str = "",
    log_scale: bool = False,
    min_ratio: float = 1.0,
    paired: tuple[float, float, float] | None = None,
    effect: tuple[float, NullStats] | None = None,
    floor_over_nulls: float | None = None,
) -> Judgement:
    """PASS needs significance against the null, an effect above the floor and, for ratio
    metrics, ``min_ratio`` times the null's mean with a prompt-bootstrap interval above 1×.

    The floor is absolute (``floor``) and, with ``floor_over_nulls``, also relative: an
    effect below ``floor`` passes it when it is at least ``floor_over_nulls`` times the
    nulls' (on the effect scale) and the nulls' mean is above numerical zero
    (:data:`NULLS_RESOLVED`): a light adapter far beyond what its size does. Nulls at
    numerical zero leave the absolute floor alone to decide (a near-zero adapter).

    ``log_scale`` tests log(metric) against the logs of the null draws: a divergence is
    positive and right-skewed across null seeds, and on the raw scale a few draws
    under-estimate that tail (a random adapter then looks significant). ``paired`` is
    :func:`~sway_common.stats.paired_ratio`'s (ratio, low, high). ``effect``: the adapter's
    value and the nulls' on the scale the effect ratio is taken on, when it is not the
    metric's own (a bounded divergence; :func:`~sway_common.divergence.bounded_effect`).
    Without a null (the backend cannot draw one) the fixed threshold decides.
    """
    shown = f"{raw:.3g}{unit}"
    if null is None:
        return _against_fixed(shown, raw, fixed_threshold)
    effect_raw, effect_null = effect if effect is not None else (raw, null)
    ratio = effect_raw / effect_null.mean if effect_null.mean > 0 else None
    tested, x = (
        (null_stats(log_values(null.values)), log_values([raw])[0]) if log_scale else (null, raw)
    )
    z, p = z_score(x, tested), p_value(x, tested)

    def judged(verdict: Verdict, msg: str, score: float, reason: str | None = None) -> Judgement:
        return Judgement(
            verdict,
            msg,
            z,
            p if z is not None else None,
            ratio,
            score,
            ratio_interval=(paired[1], paired[2]) if paired is not None else None,
            z_linear=z_score(raw, null) if log_scale else None,
            fail_reason=reason,
        )

    if z is None:
        if raw < floor:
            msg = f"no measurable effect ({shown}); null draws are degenerate too"
            return judged(Verdict.FAIL, msg, 0.0)
        msg = f"{shown}, but the null draws are degenerate (all ≈ {null.mean:.3g}): no z-score"
        return judged(Verdict.WARN, msg, 0.0)
    significance = z * z / (z * z + z_min * z_min) if z > 0 else 0.0
    z_txt = f"z={format_z(z, null.n)} (p={p:.2g})"
    ratio_txt = f", {ratio:.3g}× a null adapter" if ratio is not None else ""
    if paired is not None:
        ratio_txt += f" [{paired[1]:.3g}×–{paired[2]:.3g}× over prompts]"
    if z < z_min or (p is not None and p > p_max):
        msg = f"indistinguishable from a null adapter: {z_txt}{ratio_txt}"
        return judged(Verdict.FAIL, msg, significance, "significance")
    tiny = _below_floor(
        raw, floor, ratio, floor_over_nulls if null.mean >= NULLS_RESOLVED else None
    )
    if tiny is not None:
        msg = f"significant ({z_txt}) but tiny: {shown} is below the effect floor {floor:g}{tiny}"
        return judged(Verdict.FAIL, msg, significance * raw / floor, "floor")
    if ratio is not None and ratio < min_ratio:
        msg = (
            f"{shown}, {z_txt}, but random adapters of its size already move the model by "
            f"{null.mean:.3g}{unit}: only {ratio:.2f}× theirs (needs {min_ratio:g}×), so its "
            "direction is not what moves the model"
        )
        return judged(Verdict.FAIL, msg, significance * ratio / min_ratio, "ratio")
    if paired is not None and paired[1] <= 1.0:
        msg = (
            f"{shown}, {z_txt}, but the effect does not carry over prompts: "
            f"ratio {paired[0]:.3g}× with an interval down to {paired[1]:.3g}×"
        )
        return judged(Verdict.FAIL, msg, significance * 0.5, "prompts")
    small = f"; below the absolute floor {floor:g}, but beyond the nulls'" if raw < floor else ""
    return judged(Verdict.PASS, f"{shown}, {z_txt}{ratio_txt}{small}", significance)


def _against_fixed(shown: str, raw: float, fixed_threshold: float) -> Judgement:
    """The verdict without nulls: the config's fixed threshold decides."""
    ok = raw >= fixed_threshold
    return Judgement(
        Verdict.PASS if ok else Verdict.FAIL,
        f"{shown} {'≥' if ok else '<'} fixed threshold {fixed_threshold:g} (no null calibration)",
        None,
        None,
        None,
        min(1.0, raw / (2 * fixed_threshold)) if fixed_threshold > 0 else 0.0,
    )


def _below_floor(raw: float, floor: float, ratio: float | None, over: float | None) -> str | None:
    """None when ``raw`` clears the floor: the absolute ``floor``, or below it ``over`` times
    the nulls (``over`` None: nulls at numerical zero, or no relative floor); else the
    words a FAIL adds after "below the effect floor"."""
    if raw >= floor:
        return None
    if over is None or ratio is None:
        return ""
    if ratio >= over:
        return None
    return f" and only {ratio:.3g}× a null adapter (needs {over:g}× below it)"
