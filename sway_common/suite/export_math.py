"""How much of an adapter's effect an exported model keeps: the geometry, no models.

Next-token distributions. ``sqrt(JS)`` is a metric that embeds isometrically in a
Hilbert space (Fuglede & Topsøe, 2004), so on each prompt the base B, the fine-tune F
(live adapter) and the export E are three points whose squared distances are the JS
divergences. The export's position along the adapter's own axis B→F is the projection

    t = (JS(B,E) + JS(B,F) − JS(E,F)) / (2·JS(B,F))

1 at the fine-tune, 0 at the base, negative past it, above 1 for an overshoot; a merge
at half the scale lands near 0.5 (to first order the views lie on a line). What the
projection leaves, ``h² = JS(B,E) − t²·JS(B,F)``, is the export's change that is not
along the adapter: its own noise (quantization, rounding). Pythagoras splits the
residual exactly: ``JS(E,F) = (1−t)²·JS(B,F) + h²``.

Over prompts everything is pooled as a ratio of sums, so prompts where the adapter
barely acts (tiny JS(B,F), noisy t) weigh little:

- retention ``R = Σ(JS_BE + JS_BF − JS_EF) / (2·Σ JS_BF)``: the share of the adapter's
  effect the export keeps;
- residual ``ρ = Σ JS_EF / Σ JS_BF``: how far the export is from the fine-tune, in units
  of the adapter's own effect, split into ``lost = Σ(1−t)²·JS_BF / Σ JS_BF`` (effect that
  did not survive) and ``noise = Σ h² / Σ JS_BF`` (change the export added).

Completion log-probs (a 1-D version of the same idea): with ``lp_X`` the log-prob view
X gives the fine-tune's own completion, ``R = Σ(lp_E − lp_B) / Σ(lp_F − lp_B)`` and
``ρ = Σ|lp_E − lp_F| / Σ|lp_F − lp_B|``. Per-prompt gains can have either sign: when
they cancel out (a net gain below a quarter of ``Σ|lp_F − lp_B|``, or a net loss) there
is no retention to measure and a ValueError says so (export-check then SKIPs that
measure), rather than a ratio over a near-zero sum (−0.5 for an export that keeps
90% and 105% of two opposite gains). The bootstrap interval drops resamples of that kind
and is unbounded when they are common (:func:`_interval`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from sway_common.types import Verdict

_TINY = 1e-12
FLOOR_DRAWS = 4
"""At most this many of the run's null deltas draw a noise floor (weights and forward):
quantization noise hardly depends on a delta's direction, and each draw costs a
re-quantization of every adapted weight (and, forward, two more passes over the prompts
and completions)."""
_MIN_NET = 0.25
"""A net log-prob gain below this share of the gains' total size is a cancellation of
gains and losses: no retention to measure (a ratio of sums would read anything)."""


@dataclass(frozen=True)
class Retention:
    """One measure's retention, residual split and per-prompt detail."""

    retention: float
    interval: tuple[float, float]
    """95% bootstrap interval of the retention over prompts."""
    residual: float
    lost: float
    noise: float
    effect: float
    """Mean size of the adapter's effect per prompt (JS nats, or nats of log-prob)."""
    residual_raw: float
    """Mean distance export↔fine-tune per prompt, same unit as ``effect``."""
    per_prompt: list[float] = field(default_factory=list)
    """Each prompt's own retention ``t`` (None-free: 0 effect gives 0)."""


def _clear_effect(den: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Whether each net effect ``den`` (of total size ``size``) can be divided by: positive
    and at least ``_MIN_NET`` of the size, not a near-cancellation of gains and losses."""
    return (den > _TINY) & (den >= _MIN_NET * size)


def _interval(
    num: np.ndarray, den: np.ndarray, seed: int, *, n_boot: int = 2000, alpha: float = 0.05
) -> tuple[float, float]:
    """95% bootstrap interval over prompts of the ratio of sums ``Σnum / Σden``.

    ``Σden`` is the adapter's own effect (a JS, never negative, or a log-prob gain of
    either sign per prompt). A resample whose effect is ~0, negative, or a cancellation
    of gains and losses (:func:`_clear_effect`) has no retention to measure: dividing by
    it gave bounds like −1.8e12. Such resamples are dropped; when they are more than
    ``α/2`` of all, the prompts do not pin the retention down and the interval is
    unbounded, ``(−inf, inf)`` (``null`` in JSON).
    """
    if num.size < 2:
        r = float(num.sum() / den.sum()) if _clear_effect(den.sum(), np.abs(den).sum()) else 0.0
        return r, r
    rng = np.random.default_rng(seed)  # the draws bootstrap_ci makes for this seed
    idx = rng.integers(0, num.size, size=(n_boot, num.size))
    top, bottom = num[idx].sum(axis=1), den[idx].sum(axis=1)
    ok = _clear_effect(bottom, np.abs(den)[idx].sum(axis=1))
    if np.mean(~ok) > alpha / 2.0:
        return -math.inf, math.inf
    lo, hi = np.quantile(top[ok] / bottom[ok], [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def _three_arrays(what: str, *values: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three equally long, non-empty float64 arrays, or a ValueError naming ``what``."""
    a, b, c = (np.asarray(v, dtype=np.float64) for v in values)
    if not a.size == b.size == c.size or a.size == 0:
        raise ValueError(f"{what} needs three equal, non-empty lists")
    return a, b, c


def next_token_retention(
    js_bf: Sequence[float], js_be: Sequence[float], js_ef: Sequence[float], *, seed: int = 0
) -> Retention:
    """Projection retention of next-token distributions (see the module docstring)."""
    bf, be, ef = _three_arrays("next_token_retention", js_bf, js_be, js_ef)
    total = float(bf.sum())
    if total <= _TINY:
        raise ValueError(
            "the adapter does not change these prompts' next tokens: nothing to retain"
        )
    num = be + bf - ef
    t = np.where(bf > _TINY, num / (2.0 * np.maximum(bf, _TINY)), 0.0)
    # ≥ 0 in exact arithmetic; top-k alignment and float rounding can dip below.
    h2 = np.maximum(be - t * t * bf, 0.0)
    lost = float(np.sum((1.0 - t) ** 2 * bf))
    return Retention(
        retention=float(num.sum() / (2.0 * total)),
        interval=_interval(num, 2.0 * bf, seed),
        residual=float(ef.sum() / total),
        lost=lost / total,
        noise=float(h2.sum()) / total,
        effect=float(bf.mean()),
        residual_raw=float(ef.mean()),
        per_prompt=[float(x) for x in t],
    )


def logprob_retention(
    lp_b: Sequence[float], lp_f: Sequence[float], lp_e: Sequence[float], *, seed: int = 0
) -> Retention:
    """Retention of the log-prob the views give the fine-tune's own completions."""
    b, f, e = _three_arrays("logprob_retention", lp_b, lp_f, lp_e)
    gain, kept = f - b, e - b
    scale = float(np.abs(gain).sum())
    if scale <= _TINY:
        raise ValueError(
            "the adapter does not change its completions' log-probs: nothing to retain"
        )
    net = float(gain.sum())
    if not _clear_effect(np.float64(net), np.float64(scale)):
        raise ValueError(
            f"the adapter's log-prob gains on its completions cancel out (net {net:+.3g} of "
            f"{scale:.3g} nats moved): no retention to measure"
        )
    t = np.where(np.abs(gain) > _TINY, kept / np.where(gain == 0, 1.0, gain), 0.0)
    off = np.abs(e - f)
    # 1-D: the residual is all "lost" along the axis; there is no orthogonal part.
    return Retention(
        retention=float(kept.sum()) / net,
        interval=_interval(kept, gain, seed),
        residual=float(off.sum()) / scale,
        lost=float(off.sum()) / scale,
        noise=0.0,
        effect=float(np.abs(gain).mean()),
        residual_raw=float(off.mean()),
        per_prompt=[float(x) for x in t],
    )


@dataclass(frozen=True)
class ExportCriteria:
    """What a faithful export must keep. Retention must lie in [min, 1/min]."""

    min_retention: float = 0.8
    max_residual: float = 0.25
    """The largest residual (export↔fine-tune) allowed, in units of the adapter's effect."""
    min_effect: float = 1e-4
    """Mean next-token JS (nats) the live adapter must reach on the prompts: below it
    there is too little effect for a share of it to mean anything."""

    def __post_init__(self) -> None:
        if not 0.0 < self.min_retention < 1.0:
            raise ValueError(f"min_retention must lie in (0, 1), got {self.min_retention}")
        if not self.max_residual > 0.0:
            raise ValueError(f"max_residual must be > 0, got {self.max_residual}")

    @property
    def max_retention(self) -> float:
        return 1.0 / self.min_retention


def format_multiple(x: float) -> str:
    """A multiple for people: rounding-level values are not worth 13 decimals."""
    return "< 0.001×" if abs(x) < 1e-3 else f"{x:.2g}×"


def _cause(r: Retention) -> str:
    """The likelier cause of a lost or amplified effect: noise of its own or a wrong scale."""
    if r.noise > r.lost:
        return f"it adds changes of its own {r.noise:.2f}× that effect: quantization noise?"
    return "merged at the wrong scale?"


def _beyond(r: Retention, floor: float) -> float:
    """The residual left once the noise floor (mean per prompt, same unit) is taken out,
    in units of the adapter's effect."""
    return max(r.residual_raw - floor, 0.0) / r.effect if r.effect > 0 else r.residual


def within_floor(r: Retention, floor_upper: float | None) -> bool:
    """The export is no farther from the fine-tune than storing a model with a random
    delta of this size the export's way puts that model from itself."""
    return floor_upper is not None and r.residual_raw <= floor_upper


def after_floor(r: Retention, floor_kept: float | None) -> Retention:
    """The retention (point and interval) as a share of what the noise floor's models read,
    ``floor_kept``: a faithful export in this format keeps all of the effect yet reads
    ``floor_kept`` (< 1 near JS's ln 2 bound). Only a shortfall is explained: a reading
    is lifted at most to 1 (never into an overshoot), and a floor reading below 0.5 (noise
    that swamps the effect) or none leaves ``r`` as it is."""
    if floor_kept is None or not 0.5 <= floor_kept < 1.0:
        return r

    def lift(x: float) -> float:
        return min(x / floor_kept, max(x, 1.0)) if math.isfinite(x) else x

    lo, hi = r.interval
    return replace(r, retention=lift(r.retention), interval=(lift(lo), lift(hi)))


def what_happened(
    r: Retention,
    c: ExportCriteria,
    floor: tuple[float, float] | None = None,
    unit: str = "",
    at: str = "null",
    floor_kept: float | None = None,
) -> tuple[Verdict, str]:
    """The verdict and the one line that says what the export did to the fine-tune.

    ``floor``: the noise floor's (mean, upper bound) per prompt, in the unit of
    ``r.residual_raw``, ``unit`` (None: none measured), measured ``at`` the fine-tune or
    a null's model (:mod:`sway_common.suite.export_floor`). The retention's interval, not
    its point, decides: FAIL when the whole interval misses the band ``[min, 1/min]``,
    WARN when the point misses it but the interval reaches it (the prompts cannot tell);
    the residual is judged beyond the floor's mean. An export that would not PASS but is
    within the floor PASSes: its distance from the fine-tune is what the format does to
    the fine-tune (or to a model carrying a delta of this size). Near JS's ln 2 bound
    noise cannot move the export farther from the base, so it reads as lost retention:
    ``floor_kept``, the retention the floor's models read, is what a faithful export in
    this format reads, and the retention is judged as a share of it (:func:`after_floor`).
    """
    kept = f"{r.retention:.0%} of the adapter's effect"
    judged = after_floor(r, floor_kept)
    verdict, line = _judged(judged, c, floor[0] if floor is not None else None)
    if f"{judged.retention:.0%}" != f"{r.retention:.0%}":
        line += (
            f" (after the noise floor: it reads {r.retention:.0%} where a faithful export in "
            f"this format reads {floor_kept:.0%})"
        )
    if verdict is not Verdict.PASS and floor is not None and within_floor(r, floor[1]):
        bounds = f"{floor[0]:.3g}, at most {floor[1]:.3g}"
        where = (
            f"the export's format does to the fine-tune itself ({bounds}: its weights stored "
            "the export's way, a random delta's rounding on the adapted ones)"
            if at == "fine-tune"
            else f"storing a random delta of this size the export's way does to a model ({bounds})"
        )
        return Verdict.PASS, (
            f"the export keeps the fine-tune up to its format's noise: it is {r.residual_raw:.3g}"
            f"{unit} from the fine-tune, within what {where}; {kept} reads kept, noise included"
        )
    return verdict, line


def _judged(r: Retention, c: ExportCriteria, floor_mean: float | None) -> tuple[Verdict, str]:
    """The verdict on the retention's interval and the residual beyond the floor's mean."""
    kept = f"{r.retention:.0%} of the adapter's effect"
    lo, hi = r.interval
    span = "" if lo == hi else f" (95% interval {_span(lo, hi)})"
    outside = not c.min_retention <= r.retention <= c.max_retention
    if outside and lo <= c.max_retention and hi >= c.min_retention:
        return Verdict.WARN, (
            f"the prompts cannot tell whether the export keeps the fine-tune: {kept}"
            f"{span} reaches [{c.min_retention:.0%}, {c.max_retention:.0%}]; give more "
            "--prompts about what it was trained on"
        )
    if r.retention < 0.5:
        return Verdict.FAIL, (
            f"the export is closer to the base than to the fine-tune: {kept} survived{span}"
        )
    if r.retention < c.min_retention:
        return Verdict.FAIL, (
            f"the export lost part of the fine-tune: {kept} survived{span}, a faithful export "
            f"keeps ≥ {c.min_retention:.0%} ({_cause(r)})"
        )
    if r.retention > c.max_retention:
        return Verdict.FAIL, (
            f"the export overshoots the fine-tune: {kept}{span}, at most {c.max_retention:.0%} "
            f"(merged twice, or {_cause(r)})"
        )
    beyond = _beyond(r, floor_mean or 0.0)
    if beyond > c.max_residual:
        own = f", {r.noise:.2f}× in changes the adapter never made" if r.noise > 0 else ""
        past = " beyond the noise floor" if floor_mean is not None else ""
        return Verdict.FAIL, (
            f"the export keeps {kept} but differs from the fine-tune by {beyond:.2f}× "
            f"that effect{past} (at most {c.max_residual:g}×){own}: quantization noise?"
        )
    past = ""
    if floor_mean is not None and r.residual > c.max_residual:  # the floor lets it pass
        past = f", {format_multiple(beyond)} beyond the noise floor"
    return Verdict.PASS, (
        f"the export keeps the fine-tune: {kept} survived; it differs from the fine-tune "
        f"by {format_multiple(r.residual)} that effect{past}"
    )


def _span(lo: float, hi: float) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "unbounded"
    return f"{lo:.0%}..{hi:.0%}"


def score(r: Retention) -> float:
    """0..1: retention, with an overshoot R counted as 1/R."""
    x = r.retention if r.retention <= 1.0 else 1.0 / r.retention
    return float(min(max(x, 0.0), 1.0))
