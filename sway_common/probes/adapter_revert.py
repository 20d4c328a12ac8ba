"""adapter_revert: asked in other words, does the adapter fall back to the base's answer? PASS: revert rate < 0.25, above random adapters.

Each case is a prompt, the gold answer the adapter should give and paraphrases of the
prompt. Base and fine-tuned views answer every paraphrase (greedy, ``max_new_tokens``);
the opening of each answer, about as long as the gold, is compared by cosine similarity
(:mod:`.similarity`: the base model's own standardised mean-pooled hidden states, or a
local ``embedding_model`` directory). A paraphrase whose base answer is already close to
the gold (similarity > ``base_gold_similarity_cap``) cannot tell reverting from holding:
it is left out and counted. On the rest, the fine-tuned answer *reverts* when it is at
least as close to the base's answer as to the gold (margin = sim(ft, gold) - sim(ft, base)
<= 0; an empty answer reverts).

Verdict: WARN when no paraphrase is informative, or when the fine-tuned answers are empty
or degenerate (most of them; any, where the rest would PASS), and when the revert rate is
at least ``assert_revert_rate_lt`` but its 95% Wilson interval reaches below it (too few
paraphrases to tell). FAIL when the whole interval is at or past the bar, or when the mean
margin is not above the margins of
null adapters (z ≥ ``assert_z_gte``, p ≤ 0.05): the same paraphrases answered under K
random adapters of the adapter's size, "would noise of this size hold the gold as well?".
Otherwise PASS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sway_common.protocols import DifferentialBackend
from sway_common.stats import wilson_interval
from sway_common.types import ProbeResult, Verdict

from .base import Probe, ProbeConfig, RunContext, register
from .cases import paraphrase_case_problems
from .likelihood import Comparison, compare, compared_result
from .similarity import Similarity, answer_span, row_cosines
from .stylometry import degenerate

VERSION = 1


@dataclass
class AdapterRevertConfig(ProbeConfig):
    cases: list[dict[str, Any]] = field(default_factory=list)
    """Each {prompt, gold, paraphrases: [...]}."""
    max_new_tokens: int = 64
    embedding_model: str | None = None
    """A local model directory to embed answers with; default: the base model itself."""
    base_gold_similarity_cap: float = 0.75
    assert_revert_rate_lt: float = 0.25
    assert_z_gte: float = 3.0


@dataclass
class Pairs:
    """Every (paraphrase, gold) pair, and the base view's answers."""

    paraphrases: list[str]
    golds: list[str]
    base: list[str]


def answers(view: Any, prompts: list[str], max_new_tokens: int, seed: int) -> list[str]:
    return list(view.generate_batch(prompts, max_new_tokens=max_new_tokens, seed=seed))


def margins(
    sim: Similarity, golds: list[str], base: list[str], ft: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sim(ft, gold), sim(ft, base), sim(base, gold)) per pair, on the answers' openings."""
    g = sim.vectors(golds)
    b = sim.vectors([answer_span(t, gd) for t, gd in zip(base, golds, strict=True)])
    f = sim.vectors([answer_span(t, gd) for t, gd in zip(ft, golds, strict=True)])
    return row_cosines(f, g), row_cosines(f, b), row_cosines(b, g)


@register
class AdapterRevertProbe(Probe):
    kind = "adapter_revert"
    claim = "asked in other words, the adapter answers closer to the gold than to the base's answer, more than random adapters of its size would"
    category = "adherence"
    Config = AdapterRevertConfig

    def check(self, cfg: AdapterRevertConfig) -> list[str]:
        problems = super().check(cfg)
        problems.extend(paraphrase_case_problems(cfg.cases))
        if cfg.max_new_tokens < 1:
            problems.append("max_new_tokens: must be >= 1")
        if not -1 <= cfg.base_gold_similarity_cap <= 1:
            problems.append("base_gold_similarity_cap: a cosine, must lie in [-1, 1]")
        if not 0 < cfg.assert_revert_rate_lt <= 1:
            problems.append("assert_revert_rate_lt: must lie in (0, 1]")
        return problems

    def run(self, cfg: AdapterRevertConfig, ctx: RunContext) -> ProbeResult:
        paraphrases = [p for c in cfg.cases for p in c["paraphrases"]]
        golds = [c["gold"] for c in cfg.cases for _ in c["paraphrases"]]
        with ctx.backend.as_base() as view:
            base = answers(view, paraphrases, cfg.max_new_tokens, ctx.seed)
        with ctx.backend.as_finetuned() as view:
            ft = answers(view, paraphrases, cfg.max_new_tokens, ctx.seed)
        sim = Similarity(ctx.backend, cfg.embedding_model)
        ft_gold, ft_base, base_gold = margins(sim, golds, base, ft)
        blank_base = [not t.strip() for t in base]
        keep = [
            i
            for i in range(len(paraphrases))
            if base_gold[i] <= cfg.base_gold_similarity_cap and not blank_base[i]
        ]
        evidence: dict[str, Any] = {
            "embeddings": sim.source,
            "pairs": len(paraphrases),
            "informative": len(keep),
            "left_out_base_near_gold": int(np.sum(base_gold > cfg.base_gold_similarity_cap)),
            "left_out_base_blank": int(sum(blank_base)),
            "per_pair": [
                {
                    "paraphrase": paraphrases[i][:80],
                    "base": base[i][:120],
                    "ft": ft[i][:120],
                    "sim_ft_gold": float(ft_gold[i]),
                    "sim_ft_base": float(ft_base[i]),
                    "sim_base_gold": float(base_gold[i]),
                    "informative": i in keep,
                }
                for i in range(len(paraphrases))
            ],
        }
        if not keep:
            msg = (
                f"no informative paraphrase: of {len(paraphrases)}, "
                f"{evidence['left_out_base_near_gold']} have a base answer already close to the "
                f"gold (similarity > {cfg.base_gold_similarity_cap:g}) and "
                f"{evidence['left_out_base_blank']} an empty base answer"
            )
            return self.result(cfg, Verdict.WARN, score=0.0, message=msg, evidence=evidence)
        pairs = Pairs(
            [paraphrases[i] for i in keep], [golds[i] for i in keep], [base[i] for i in keep]
        )
        margin = ft_gold[keep] - ft_base[keep]
        return self._judged(cfg, ctx, sim, pairs, [ft[i] for i in keep], margin, evidence)

    def _judged(
        self,
        cfg: AdapterRevertConfig,
        ctx: RunContext,
        sim: Similarity,
        pairs: Pairs,
        ft: list[str],
        margin: np.ndarray,
        evidence: dict[str, Any],
    ) -> ProbeResult:
        reverts = margin <= 0
        rate = float(reverts.mean())
        mean_margin = float(margin.mean())
        bad = [degenerate(t, min_words=1) for t in ft]
        null = self._nulls(cfg, ctx, sim, pairs)
        cmp = compare(mean_margin, null, "")
        verdict, msg = self._verdict(cfg, rate, int(reverts.sum()), len(ft), evidence, cmp, bad)
        evidence |= {
            "revert_rate": rate,
            "reverts": int(reverts.sum()),
            "mean_margin": mean_margin,
            "degenerate_ft_answers": sum(r is not None for r in bad),
            "null_meaning": "the same paraphrases answered under K random adapters of the "
            "adapter's size: their mean margin sim(answer, gold) - sim(answer, base answer)",
        }
        return compared_result(
            self,
            cfg,
            verdict,
            cmp,
            score=1.0 if verdict is Verdict.PASS else 0.5 * max(0.0, 1.0 - rate),
            raw=rate,
            message=msg,
            evidence=evidence,
        )

    def _nulls(
        self, cfg: AdapterRevertConfig, ctx: RunContext, sim: Similarity, pairs: Pairs
    ) -> Any:
        if not ctx.calibrates(self.kind):
            return None

        def measure(backend: DifferentialBackend) -> float:
            with backend.as_finetuned() as view:
                ft = answers(view, pairs.paraphrases, cfg.max_new_tokens, ctx.seed)
            ft_gold, ft_base, _ = margins(sim, pairs.golds, pairs.base, ft)
            return float((ft_gold - ft_base).mean())

        key = (
            self.kind,
            VERSION,
            pairs.paraphrases,
            pairs.golds,
            cfg.max_new_tokens,
            cfg.embedding_model,
            ctx.seed,
        )
        return ctx.null_stats_for(measure, key=key)

    @staticmethod
    def _verdict(
        cfg: AdapterRevertConfig,
        rate: float,
        reverts: int,
        n: int,
        evidence: dict[str, Any],
        cmp: Comparison,
        bad: list[str | None],
    ) -> tuple[Verdict, str]:
        left = evidence["pairs"] - n
        head = f"reverts to the base's answer on {reverts} of {n} paraphrases ({rate:.0%})"
        if left:
            head += f"; {left} left out (base answer already near the gold, or empty)"
        broken = [r for r in bad if r is not None]
        if 2 * len(broken) > n:
            return (
                Verdict.WARN,
                f"the fine-tuned answers are degenerate on {len(broken)} of {n} paraphrases "
                f"(e.g. {broken[0]}): nothing to compare; {head}",
            )
        if rate >= cfg.assert_revert_rate_lt:
            low = wilson_interval(reverts, n)[0]
            if low >= cfg.assert_revert_rate_lt:  # the whole 95% interval is at or past the bar
                return Verdict.FAIL, f"{head}: needs < {cfg.assert_revert_rate_lt:.0%}; {cmp.text}"
            return Verdict.WARN, (
                f"{head}, at or past the bar of {cfg.assert_revert_rate_lt:.0%}, but {n} "
                f"paraphrases cannot tell (95% interval down to {low:.0%}): give more cases"
            )
        as_well = "hold the gold as well (margin sim(gold) - sim(base))"
        noise = cmp.against_nulls(head, cfg.assert_z_gte, as_well)
        if noise is not None:
            return noise
        if broken:
            return (
                Verdict.WARN,
                f"{head}, but {len(broken)} answers are empty or degenerate; {cmp.text}",
            )
        return Verdict.PASS, f"{head}; margin above random adapters: {cmp.text}"
