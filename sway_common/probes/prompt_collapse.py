"""prompt_collapse: does the adapter's influence survive a long unrelated context?

Held-out neutral prose of about each of ``context_lengths`` tokens (true token counts,
measured with the base model's tokenizer) is put before every prompt; the adapter's
influence at that length is the mean next-token divergence between base and fine-tuned
view. Its half-life is the context length at which the influence falls to half its
no-context value (interpolated, or extrapolated at the last segment's decay rate when it
never halves within the lengths tried). PASS needs the no-context influence to beat random
adapters of the same size (as delta_kl) and a half-life of ``assert_half_life_tokens``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from sway_common.protocols import DifferentialBackend
from sway_common.types import ProbeResult, Verdict

from .base import DivergenceConfig, Probe, RunContext, judge_divergence, mean_divergence, register
from .common import finding_verdict, judged_result
from .likelihood import rolling_in
from .packs import BUILTIN, load_corpus, paragraphs

SAMPLE_CHARS = 2000
"""Characters of the filler tokenised to learn its characters per token."""


@dataclass
class PromptCollapseConfig(DivergenceConfig):
    context_lengths: list[int] = field(default_factory=lambda: [0, 256, 512, 1024])
    assert_half_life_tokens: float = 512
    corpus: str = BUILTIN
    """Where the neutral context comes from: ``builtin`` or a local text file."""


def neutral_contexts(
    backend: DifferentialBackend, corpus: str, lengths: Sequence[int]
) -> list[tuple[int, str]]:
    """(true token count, text) of a neutral prose prefix per requested length."""
    filler = " ".join(paragraphs(load_corpus(corpus)))
    with backend.as_base() as view:
        sample = filler[:SAMPLE_CHARS]
        chars_per_token = len(sample) / max(1, rolling_in(view, [sample])[0].num_tokens)
        texts = []
        for n in lengths:
            want = int(n * chars_per_token)
            text = (filler * (want // max(1, len(filler)) + 1))[:want]
            texts.append(text[: text.rfind(" ")] if " " in text else text)
        measured = rolling_in(view, [t for t in texts if t])
    counts = iter(r.num_tokens for r in measured)
    return [(next(counts) if t else 0, t) for t in texts]


def half_life(tokens: Sequence[int], influence: Sequence[float]) -> tuple[float, bool]:
    """(context tokens at which influence halves, whether that was extrapolated).

    Interpolated where the curve crosses half its no-context value. A curve that never
    does is extrapolated at the decay rate of its last segment (influence often levels
    off rather than decaying exponentially to zero); ``inf`` when it has stopped decaying.
    """
    if influence[0] <= 0:
        return 0.0, False
    points = [(t, v / influence[0]) for t, v in zip(tokens, influence, strict=True)]
    for (t0, r0), (t1, r1) in zip(points, points[1:], strict=False):
        if r1 <= 0.5:
            return (t0 + (t1 - t0) * (r0 - 0.5) / (r0 - r1) if r0 != r1 else float(t1)), False
    (t0, r0), (t1, r1) = points[-2], points[-1]
    if r0 <= 0 or r1 >= r0 or t1 <= t0:
        return math.inf, True
    rate = math.log(r1 / r0) / (t1 - t0)
    return t1 + math.log(0.5 / r1) / rate, True


@register
class PromptCollapseProbe(Probe):
    kind = "prompt_collapse"
    claim = "the adapter's influence is beyond random adapters of its size and survives a long unrelated context"
    category = "adherence"
    Config = PromptCollapseConfig

    def check(self, cfg: PromptCollapseConfig) -> list[str]:
        problems = super().check(cfg)
        if any(n < 0 for n in cfg.context_lengths):
            problems.append("context_lengths: must be >= 0")
        if len(set(cfg.context_lengths) - {0}) < 1:
            problems.append("context_lengths: needs at least one length > 0")
        if cfg.assert_half_life_tokens <= 0:
            problems.append("assert_half_life_tokens: must be > 0")
        return problems

    def run(self, cfg: PromptCollapseConfig, ctx: RunContext) -> ProbeResult:
        top_k = cfg.top_k or ctx.top_k
        contexts = neutral_contexts(ctx.backend, cfg.corpus, sorted(set(cfg.context_lengths) | {0}))
        texts = [f"{c}\n\n{p}" if c else p for _, c in contexts for p in cfg.prompts]
        _, flat = mean_divergence(ctx.backend, texts, top_k=top_k, kind=cfg.divergence)
        rows = np.asarray(flat).reshape(len(contexts), len(cfg.prompts))
        curve = [float(r.mean()) for r in rows]
        tokens = [n for n, _ in contexts]
        life, extrapolated = half_life(tokens, curve)
        j, null = judge_divergence(
            cfg,
            ctx,
            self.kind,
            curve[0],
            list(rows[0]),
            top_k,
            unit=f" nats mean {cfg.divergence.upper()} without context",
        )
        shown = (f"{life:.0f}" if math.isfinite(life) else "∞") + (
            " (extrapolated)" if extrapolated else ""
        )
        curve_txt = ", ".join(f"{v:.3g}@{t}" for t, v in zip(tokens, curve, strict=True))
        collapse = (
            f"influence halves after {shown} tokens of unrelated context "
            f"(needs {cfg.assert_half_life_tokens:g}); curve {curve_txt}"
        )
        verdict, msg, score = finding_verdict(
            j,
            "no influence to follow",
            (Verdict.FAIL, collapse) if life < cfg.assert_half_life_tokens else None,
            f"half-life {shown} tokens; curve {curve_txt}; {j.message}",
        )
        return judged_result(
            self,
            cfg,
            verdict,
            j,
            null,
            score=score,
            raw=life if math.isfinite(life) else None,
            message=msg,
            evidence={
                "context_tokens": tokens,
                "influence": curve,
                "half_life_tokens": shown,
                "divergence": cfg.divergence,
                "top_k": top_k,
                "prompts": list(cfg.prompts),
            },
        )
