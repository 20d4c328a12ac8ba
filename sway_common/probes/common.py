"""What the divergence probes share beyond base: the judged mean divergence and its result.

delta_kl, cluster_kl, prompt_collapse and adapter_ablation all judge a next-token
divergence against the nulls with :func:`~.base.judge_divergence`; their results carry
that judgement's z, p, effect ratio and null draws the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sway_common.types import NullStats, ProbeResult, Verdict

from .base import (
    DivergenceConfig,
    Judgement,
    Probe,
    ProbeConfig,
    RunContext,
    judge_divergence,
    mean_divergence,
)


@dataclass
class JudgedDivergence:
    """The mean next-token divergence between base and fine-tuned views on ``cfg.prompts``,
    judged against the nulls."""

    raw: float
    per_prompt: list[float]
    top_k: int
    judgement: Judgement
    null: NullStats | None


def judged_mean_divergence(cfg: DivergenceConfig, ctx: RunContext, kind: str) -> JudgedDivergence:
    """Measure the mean divergence of ``cfg.prompts`` and judge it for probe ``kind``."""
    top_k = cfg.top_k or ctx.top_k
    raw, per_prompt = mean_divergence(ctx.backend, cfg.prompts, top_k=top_k, kind=cfg.divergence)
    j, null = judge_divergence(
        cfg, ctx, kind, raw, per_prompt, top_k, unit=f" nats mean {cfg.divergence.upper()}"
    )
    return JudgedDivergence(raw, per_prompt, top_k, j, null)


def finding_verdict(
    j: Judgement, unjudged: str, problem: tuple[Verdict, str] | None, passed: str
) -> tuple[Verdict, str, float]:
    """(verdict, message, score) of a finding that means something only on a real shift.

    While ``j`` (the divergence against the nulls) does not pass, its verdict stands and
    the finding is not judged (``unjudged`` says what is missing); then the finding's
    ``problem``, if any, decides, else it PASSes with ``passed``. The score is ``j``'s,
    halved unless the finding PASSes.
    """
    verdict: Verdict
    if j.verdict is not Verdict.PASS:
        verdict, msg = j.verdict, f"{unjudged}: {j.message}"
    else:
        verdict, msg = problem or (Verdict.PASS, passed)
    return verdict, msg, j.score * (1.0 if verdict is Verdict.PASS else 0.5)


def judged_result(
    probe: Probe,
    cfg: ProbeConfig,
    verdict: Verdict,
    j: Judgement,
    null: NullStats | None,
    **kw: Any,
) -> ProbeResult:
    """``probe.result`` carrying ``j``'s z, p and effect ratio and the null draws it used."""
    return probe.result(cfg, verdict, z=j.z, p_value=j.p, effect_ratio=j.ratio, null=null, **kw)
