"""paraphrase_invariance: does what the adapter learned carry over to reworded questions?

Each case is a prompt, its gold answer and paraphrases of the prompt. The lift is the
change in log p(gold) from base to fine-tuned view per gold token (true token counts of
the gold after each prompt); the verbatim lift is on the original prompts, the paraphrase
lift on the rewordings, and their ratio the generalisation ratio. A PASS needs a verbatim
lift of at least ``min_verbatim_lift`` nats/token (or half of what the base left to gain,
-log p(gold) per token, where that is less), above random adapters of the same size
(z against the nulls), and with ``intent: generalize`` a ratio of at least
``min_generalization_ratio``; ``intent: memorize`` inverts that last rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from sway_common.protocols import DifferentialBackend
from sway_common.types import ProbeResult, Verdict

from .base import Probe, ProbeConfig, RunContext, register
from .cases import paraphrase_case_problems
from .likelihood import compare, compared_result, completion_tokens, logprob_delta, null_values

# Where the base already gives the gold most of its probability, the verbatim lift asked
# for is this share of what is left to gain (-log p per token), if that is less.
HEADROOM_SHARE = 0.5


@dataclass
class ParaphraseInvarianceConfig(ProbeConfig):
    cases: list[dict[str, Any]] = field(default_factory=list)
    """Each {prompt, gold, paraphrases: [...]}."""
    intent: Literal["generalize", "memorize"] = "generalize"
    min_verbatim_lift: float = 0.2
    min_generalization_ratio: float = 0.5
    assert_z_gte: float = 3.0


def _pairs(cases: list[dict[str, Any]]) -> tuple[list[str], list[str], list[int]]:
    """Originals first, then every paraphrase; owner[i] is the case of the i-th paraphrase."""
    prompts = [c["prompt"] for c in cases]
    golds = [c["gold"] for c in cases]
    owner = []
    for i, c in enumerate(cases):
        for para in c["paraphrases"]:
            prompts.append(para)
            golds.append(c["gold"])
            owner.append(i)
    return prompts, golds, owner


@register
class ParaphraseInvarianceProbe(Probe):
    kind = "paraphrase_invariance"
    claim = "what the adapter learned lifts the gold answers beyond random adapters of its size and carries over to reworded questions"
    category = "adherence"
    Config = ParaphraseInvarianceConfig

    def check(self, cfg: ParaphraseInvarianceConfig) -> list[str]:
        problems = super().check(cfg)
        problems.extend(paraphrase_case_problems(cfg.cases))
        return problems

    def run(self, cfg: ParaphraseInvarianceConfig, ctx: RunContext) -> ProbeResult:
        prompts, golds, owner = _pairs(cfg.cases)
        n = len(cfg.cases)
        tokens = completion_tokens(ctx.backend, prompts, golds)
        base, delta = logprob_delta(ctx.backend, prompts, golds)
        lift = delta / tokens
        verbatim = float(lift[:n].mean())
        # A lift cannot exceed what the base left to gain: -log p(gold) per token.
        headroom = float(np.mean(-base[:n] / tokens[:n]))
        bar = min(cfg.min_verbatim_lift, HEADROOM_SHARE * headroom)
        per_case_para = [float(np.mean(lift[n:][np.asarray(owner) == i])) for i in range(n)]
        paraphrase = float(np.mean(per_case_para))
        ratio = paraphrase / verbatim if verbatim > 0 else None

        def measure(backend: DifferentialBackend) -> float:
            return float((logprob_delta(backend, prompts[:n], golds[:n])[1] / tokens[:n]).mean())

        null = null_values(ctx, self.kind, measure, prompts[:n], golds[:n], tokens[:n].tolist())
        cmp = compare(verbatim, null, " nats/token")
        verdict, msg = self._judge(cfg, verbatim, paraphrase, ratio, cmp, bar)
        return compared_result(
            self,
            cfg,
            verdict,
            cmp,
            score=1.0 if verdict is Verdict.PASS else 0.0,
            raw=ratio,
            message=msg,
            evidence={
                "intent": cfg.intent,
                "verbatim_lift": verbatim,
                "paraphrase_lift": paraphrase,
                "generalization_ratio": ratio,
                "base_headroom": headroom,
                "verbatim_lift_needed": bar,
                "per_case_verbatim": [float(x) for x in lift[:n]],
                "per_case_paraphrase": per_case_para,
                "gold_tokens": [int(t) for t in tokens],
            },
        )

    @staticmethod
    def _judge(
        cfg: ParaphraseInvarianceConfig,
        verbatim: float,
        paraphrase: float,
        ratio: float | None,
        cmp: Any,
        bar: float,
    ) -> tuple[Verdict, str]:
        lifts = f"verbatim lift {verbatim:+.3g}, paraphrase lift {paraphrase:+.3g} nats/token"
        if verbatim < bar:
            needs = f"{bar:.3g}" + (
                f": half of the {2 * bar:.3g} the base left to gain"
                if bar < cfg.min_verbatim_lift
                else ""
            )
            return Verdict.FAIL, f"{lifts}: the adapter did not learn the answers (needs {needs})"
        if cmp.null is not None and not cmp.beats(cfg.assert_z_gte):
            return (
                Verdict.FAIL,
                f"{lifts}, no more than random adapters of its size give: {cmp.text}",
            )
        general = ratio is not None and ratio >= cfg.min_generalization_ratio
        shown = (
            f"{lifts}, ratio {ratio:.2f} (threshold {cfg.min_generalization_ratio:g}); {cmp.text}"
        )
        if cfg.intent == "generalize":
            return (
                (Verdict.PASS, f"generalises: {shown}")
                if general
                else (Verdict.FAIL, f"memorised the wording, not the fact: {shown}")
            )
        return (
            (Verdict.PASS, f"memorised as intended: {shown}")
            if not general
            else (Verdict.FAIL, f"generalises where memorising was intended: {shown}")
        )
