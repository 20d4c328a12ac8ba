"""preference_flip: does the adapter now prefer the answers its author marked as chosen?

Each triple is a prompt, a chosen and a rejected completion; its margin is
log p(chosen) - log p(rejected). Among the triples the base model gets wrong (margin <= 0)
the flip rate is the share the fine-tuned view gets right. PASS needs a flip rate of at
least ``assert_flip_rate_gte`` and a mean margin gain on those triples above random
adapters of the same size (z against the nulls). FAIL needs the whole 95% interval of the
rate below the bar; a low rate on few triples WARNs, and so do fewer base-wrong triples
than ``min_triples_for_decision``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from sway_common.protocols import DifferentialBackend
from sway_common.stats import wilson_interval
from sway_common.types import ProbeResult, Verdict

from .base import Probe, ProbeConfig, RunContext, register
from .likelihood import compare, compared_result, logprob_delta, null_values

TRIPLE_KEYS = ("prompt", "chosen", "rejected")


@dataclass
class PreferenceFlipConfig(ProbeConfig):
    triples: list[dict[str, str]] = field(default_factory=list)
    assert_flip_rate_gte: float = 0.7
    min_triples_for_decision: int = 3
    assert_z_gte: float = 3.0


def margins(
    backend: DifferentialBackend, triples: list[dict[str, str]]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(base margin, fine-tuned minus base margin) per triple, chosen and rejected in one batch."""
    prompts = [t["prompt"] for t in triples] * 2
    completions = [t["chosen"] for t in triples] + [t["rejected"] for t in triples]
    base, delta = logprob_delta(backend, prompts, completions)
    n = len(triples)
    return base[:n] - base[n:], delta[:n] - delta[n:]


@register
class PreferenceFlipProbe(Probe):
    kind = "preference_flip"
    claim = "the adapter now prefers the chosen answers where the base preferred the rejected ones, with a margin gain beyond random adapters of its size"
    category = "adherence"
    Config = PreferenceFlipConfig

    def check(self, cfg: PreferenceFlipConfig) -> list[str]:
        problems = super().check(cfg)
        if not cfg.triples:
            problems.append("triples: needs at least one {prompt, chosen, rejected}")
        for i, t in enumerate(cfg.triples):
            missing = [k for k in TRIPLE_KEYS if not isinstance(t.get(k), str)]
            extra = sorted(set(t) - set(TRIPLE_KEYS))
            if missing:
                problems.append(f"triples[{i}]: needs {', '.join(missing)} (strings)")
            if extra:
                problems.append(f"triples[{i}]: unknown field(s) {', '.join(extra)}")
        if cfg.min_triples_for_decision < 1:
            problems.append("min_triples_for_decision: must be >= 1")
        return problems

    def run(self, cfg: PreferenceFlipConfig, ctx: RunContext) -> ProbeResult:
        base_margin, gain = margins(ctx.backend, cfg.triples)
        wrong = base_margin <= 0
        n_wrong = int(wrong.sum())
        evidence = {
            "triples": len(cfg.triples),
            "base_wrong": n_wrong,
            "base_margin": [float(m) for m in base_margin],
            "margin_gain": [float(g) for g in gain],
        }
        if n_wrong < cfg.min_triples_for_decision:
            msg = (
                f"the base model already prefers the chosen answer in {len(cfg.triples) - n_wrong} "
                f"of {len(cfg.triples)} triples; {n_wrong} base-wrong triple(s) are too few to "
                f"decide (needs {cfg.min_triples_for_decision})"
            )
            return self.result(cfg, Verdict.WARN, score=0.5, message=msg, evidence=evidence)

        flip_rate = float(np.mean(base_margin[wrong] + gain[wrong] > 0))
        raw_gain = float(gain[wrong].mean())
        null = null_values(
            ctx,
            self.kind,
            lambda b: float(margins(b, cfg.triples)[1][wrong].mean()),
            cfg.triples,
            wrong.tolist(),
        )
        cmp = compare(raw_gain, null, " nats")
        head = f"flipped {flip_rate:.0%} of {n_wrong} base-wrong triples (mean margin gain {raw_gain:+.3g} nats)"
        upper = wilson_interval(int(round(flip_rate * n_wrong)), n_wrong)[1]
        if upper < cfg.assert_flip_rate_gte:
            verdict, msg = (
                Verdict.FAIL,
                f"{head}; needs {cfg.assert_flip_rate_gte:.0%} (95% interval up to {upper:.0%})",
            )
        elif flip_rate < cfg.assert_flip_rate_gte:
            # Few triples cannot show the rate is below the bar: say so rather than FAIL.
            verdict, msg = (
                Verdict.WARN,
                f"{head}: below {cfg.assert_flip_rate_gte:.0%}, but {n_wrong} triples leave the "
                f"rate uncertain (95% interval up to {upper:.0%})",
            )
        elif cmp.null is not None and not cmp.beats(cfg.assert_z_gte):
            verdict, msg = (
                Verdict.FAIL,
                f"{head}, but random adapters of its size move margins as much: {cmp.text}",
            )
        else:
            verdict, msg = Verdict.PASS, f"{head}; {cmp.text}"
        score = (
            1.0 if verdict is Verdict.PASS else 0.5 * min(1.0, flip_rate / cfg.assert_flip_rate_gte)
        )
        evidence.update(flip_rate=flip_rate)
        return compared_result(
            self,
            cfg,
            verdict,
            cmp,
            score=score,
            raw=flip_rate,
            message=msg,
            evidence=evidence,
        )
