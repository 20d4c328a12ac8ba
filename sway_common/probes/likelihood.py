"""What the likelihood probes share: batched scoring in the base and fine-tuned views,
true token counts, and the judging of a signed change against the null adapters.

Every scorer here takes a :class:`DifferentialBackend` (the real one, or a null proxy
whose fine-tuned view is a random adapter), so one function serves the measurement and
its null calibration. Base-view results are cached by the backend: K nulls cost K
fine-tuned-view passes, not 2K.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from sway_common.protocols import DifferentialBackend, ScoringBackend
from sway_common.stats import format_z, null_stats, p_value, z_score
from sway_common.types import NullStats, ProbeResult, RollingLogprob, Verdict

from .base import Probe, ProbeConfig, RunContext

P_MAX = 0.05


def logprobs_in(
    view: ScoringBackend, prompts: Sequence[str], completions: Sequence[str]
) -> NDArray[np.float64]:
    """log p(completion | prompt) for each pair, in one batched call where the view has one."""
    batch = getattr(view, "logprob_of_batch", None)
    if batch is not None:
        values = batch(list(prompts), list(completions))
    else:  # a third-party view without the batch op: the protocol's single-item form
        values = [view.logprob_of(p, c) for p, c in zip(prompts, completions, strict=True)]
    return np.asarray(values, dtype=np.float64)


def rolling_in(view: ScoringBackend, texts: Sequence[str]) -> list[RollingLogprob]:
    batch = getattr(view, "rolling_logprob_batch", None)
    if batch is not None:
        return list(batch(list(texts)))
    return [view.rolling_logprob(t) for t in texts]


def logprob_delta(
    backend: DifferentialBackend, prompts: Sequence[str], completions: Sequence[str]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(base log-probs, fine-tuned minus base) for each (prompt, completion) pair."""
    with backend.as_base() as view:
        base = logprobs_in(view, prompts, completions)
    with backend.as_finetuned() as view:
        ft = logprobs_in(view, prompts, completions)
    return base, ft - base


def rolling_gain(
    backend: DifferentialBackend, texts: Sequence[str]
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Per text: the fine-tuned view's total log-prob minus the base's, and its scored tokens."""
    with backend.as_base() as view:
        base = rolling_in(view, texts)
    with backend.as_finetuned() as view:
        ft = rolling_in(view, texts)
    gains = np.array([f.total_logprob - b.total_logprob for b, f in zip(base, ft, strict=True)])
    counts = np.array([b.logprobs.size for b in base], dtype=np.int64)
    return gains, counts


def per_token(gains: NDArray[np.float64], counts: NDArray[np.int64]) -> NDArray[np.float64]:
    return gains / np.maximum(counts, 1)


def completion_tokens(
    backend: DifferentialBackend, prompts: Sequence[str], completions: Sequence[str]
) -> NDArray[np.int64]:
    """How many tokens each completion is scored over after its prompt.

    The tokens of ``prompt + completion`` past its common prefix with the prompt's own
    tokens: a token merged across the boundary counts with the completion, as
    ``logprob_of`` scores it. Read from base-view rolling passes (cached, one batch).
    """
    with backend.as_base() as view:
        whole = rolling_in(view, [p + c for p, c in zip(prompts, completions, strict=True)])
        alone = rolling_in(view, prompts)
    counts = []
    for w, a in zip(whole, alone, strict=True):
        n = min(w.token_ids.size, a.token_ids.size)
        same = np.flatnonzero(w.token_ids[:n] != a.token_ids[:n])
        prefix = int(same[0]) if same.size else n
        counts.append(max(1, w.token_ids.size - prefix))
    return np.asarray(counts, dtype=np.int64)


def gold_in_top_k(
    backend: DifferentialBackend, prompts: Sequence[str], golds: Sequence[str], k: int
) -> NDArray[np.bool_]:
    """Whether the base model ranks each gold answer's first token among its top ``k``
    next tokens after the prompt: the items whose answer the base knows.

    The first token is the first of ``prompt + gold`` past its common prefix with the
    prompt's own tokens; where the tokenizer merges a token across the boundary it is not
    what the base predicts after the prompt, and the item counts as not known.
    """
    with backend.as_base() as view:
        whole = rolling_in(view, [p + g for p, g in zip(prompts, golds, strict=True)])
        alone = rolling_in(view, prompts)
        dists = view.next_token_dist_batch(list(prompts), top_k=k)
    known = []
    for w, a, dist in zip(whole, alone, dists, strict=True):
        n = a.token_ids.size
        merged = w.token_ids.size <= n or not np.array_equal(w.token_ids[:n], a.token_ids)
        known.append(not merged and int(w.token_ids[n]) in set(dist.token_ids[:k].tolist()))
    return np.asarray(known, dtype=np.bool_)


def null_values(
    ctx: RunContext, kind: str, measure: Callable[[DifferentialBackend], float], *key: Any
) -> NullStats | None:
    """``measure`` under each null adapter, or None when this run draws no nulls for ``kind``.

    ``key`` is everything the measurement depends on besides the weights (texts, options):
    with it the null cache serves a second run without a forward.
    """
    return ctx.null_stats_for(measure, key=(kind, *key)) if ctx.calibrates(kind) else None


@dataclass
class Comparison:
    """Where a signed metric (larger = better kept / more learned) falls among the nulls."""

    z: float | None
    p: float | None
    null: NullStats | None
    text: str
    p_below: float | None = None
    """The p-value of the other tail: that noise would do this badly or worse."""

    @property
    def significant(self) -> bool:
        return self.z is not None and self.p is not None and self.p <= P_MAX

    def beats(self, z_min: float) -> bool:
        return self.significant and self.z is not None and self.z >= z_min

    def trails(self, z_min: float) -> bool:
        """Significantly below the nulls: worse than random adapters of its size."""
        below = self.p_below is not None and self.p_below <= P_MAX
        return below and self.z is not None and self.z <= -z_min

    def against_nulls(self, head: str, z_min: float, as_well: str) -> tuple[Verdict, str] | None:
        """The verdict where the nulls leave the metric unproven, else None (no nulls drawn,
        or it beats them): WARN when their draws are degenerate (no z), FAIL when random
        adapters of its size do ``as_well`` (what they do, as a phrase)."""
        if self.null is None:
            return None
        if self.z is None:
            return Verdict.WARN, f"{head}, but {self.text}"
        if not self.beats(z_min):
            return Verdict.FAIL, f"{head}, but random adapters of its size {as_well}: {self.text}"
        return None


def compare(raw: float, null: NullStats | None, unit: str) -> Comparison:
    if null is None:
        return Comparison(None, None, None, "no null calibration")
    z, p = z_score(raw, null), p_value(raw, null)
    if z is None or p is None:
        return Comparison(
            None, None, null, f"null draws degenerate (all ≈ {null.mean:.3g}{unit}): no z"
        )
    p_below = p_value(-raw, null_stats([-v for v in null.values]))
    # The p of the tail z points into: a loss is read against "noise does this badly".
    shown = p if z >= 0 or p_below is None else p_below
    text = f"z={format_z(z, null.n)} (p={shown:.2g}) against random adapters of its size (null mean {null.mean:+.3g}{unit})"
    return Comparison(z, p, null, text, p_below)


def compared_result(
    probe: Probe, cfg: ProbeConfig, verdict: Verdict, cmp: Comparison, **kw: Any
) -> ProbeResult:
    """``probe.result`` carrying ``cmp``'s z, p and null draws, so the three always agree."""
    return probe.result(cfg, verdict, z=cmp.z, p_value=cmp.p, null=cmp.null, **kw)


def regression_verdict(
    reg: Regression, inert: str | None, cmp: Comparison
) -> tuple[Verdict, str, float]:
    """The rule both regression probes share: did the adapter do damage beyond what its
    size explains, and by more than the tolerance?

    FAIL past an absolute limit (damage so large no null matters), or when it lost
    significantly more than random adapters of its size would *and* more than the
    tolerance. Anything else PASSes, saying which it is: nothing changed, no worse than
    noise, better kept than noise, or worse than noise but within the tolerance.
    """
    if reg.problems:
        return Verdict.FAIL, "regressed: " + "; ".join(reg.problems), 0.0
    if inert is not None:
        return Verdict.PASS, f"{reg.kept}: {inert}", 1.0
    if cmp.null is None or cmp.z is None:
        return Verdict.PASS, f"{reg.kept} ({cmp.text})", 1.0
    if cmp.beats(reg.z_min):
        return Verdict.PASS, f"{reg.kept}; better kept than by noise: {cmp.text}", 1.0
    if not cmp.trails(reg.z_min):
        return Verdict.PASS, f"{reg.kept}; no more lost than by noise: {cmp.text}", 1.0
    worse = f"lost more than random adapters of its size would ({cmp.text})"
    tolerance = f"the tolerance of {reg.tolerance:g}{reg.unit}"
    if reg.raw < -reg.tolerance:
        lost = f"{reg.subject} lost beyond {tolerance}: {reg.facts}; it {worse}"
        return Verdict.FAIL, lost, 0.0
    return Verdict.PASS, f"{reg.kept}; it {worse}, but within {tolerance}", 0.75


@dataclass
class Regression:
    """A regression probe's measurement, before the nulls: a signed change (larger = better
    kept), the limits it broke, and how it reads when nothing regressed; with the config's
    effect floor and z bar it is judged by."""

    raw: float
    problems: list[str]
    subject: str
    """What must not be broken: "general knowledge", "held-out prose"."""
    facts: str
    """What was measured, in words."""
    mean_abs_change: float
    unchanged: str
    """What the adapter leaves unchanged when it moves nothing ("these items")."""
    unit: str
    min_effect: float
    """Mean |change| below which the adapter is taken to leave these texts alone."""
    z_min: float
    tolerance: float
    """A loss (``-raw``) up to this is tolerated even when it is beyond the nulls'."""

    @property
    def kept(self) -> str:
        return f"{self.subject} kept: {self.facts}"


def judge_regression(
    probe: Probe,
    cfg: ProbeConfig,
    ctx: RunContext,
    reg: Regression,
    measure: Callable[[DifferentialBackend], float],
    key: Sequence[Any],
    evidence: dict[str, Any],
) -> ProbeResult:
    """The result of a regression probe: nulls drawn only for a kept, moving adapter."""
    inert = (
        f"the adapter leaves {reg.unchanged} unchanged (mean |Δ| < {reg.min_effect:g})"
        if reg.mean_abs_change < reg.min_effect
        else None
    )
    # Nulls answer "lost more than noise?", a question only a kept, moving adapter raises.
    null = None if reg.problems or inert else null_values(ctx, probe.kind, measure, *key)
    cmp = compare(reg.raw, null, reg.unit)
    verdict, message, score = regression_verdict(reg, inert, cmp)
    return compared_result(
        probe, cfg, verdict, cmp, score=score, raw=reg.raw, message=message, evidence=evidence
    )


class RegressionProbe(Probe):
    """A probe of what the adapter must not break (general knowledge, held-out prose),
    judged by :func:`judge_regression`: gating, since lost knowledge is never averaged away."""

    category = "regression"
    gating = True
