"""style_fingerprint: does the adapter write like its document? PASS: shift ≥ 0.25 toward the doc, above random adapters.

Base and fine-tuned views continue each prompt (greedy, ``max_new_tokens``); each
continuation and each chunk of the document (``doc_reference`` text, or a file in
``doc``) becomes a vector of writing habits (:mod:`.stylometry`: sentence length, word
length, vocabulary, punctuation, line breaks, lists, numbers, capitals). The shift is the
fine-tuned continuation's move from the base's, projected on the base→document direction:
0 = still writes like the base, 1 = all the way to the document, negative = away.

Verdict: WARN when the continuations are empty or degenerate (most of either view's; any of
the fine-tuned view's would otherwise PASS) or when the document's style is no different
from the base's (nothing to move toward). FAIL when the shift is below ``assert_shift_gte``
or not above the shifts of null adapters (z ≥ ``assert_z_gte``, p ≤ 0.05): the same
generation under K random adapters of the adapter's size, "would noise of this size move
the style as far?". A shift that passes both but, paired prompt by prompt with the nulls,
has a 95% bootstrap interval reaching 0 is real on average yet not on every prompt: WARN.
Otherwise PASS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from sway_common.backend.scoring import text_hash
from sway_common.protocols import DifferentialBackend
from sway_common.stats import bootstrap_ci
from sway_common.types import ProbeResult, Verdict

from . import stylometry as st
from .base import DEFAULT_PROMPTS, Probe, ProbeConfig, RunContext, register
from .likelihood import Comparison, compare, compared_result
from .packs import is_named_file, read_text

MIN_DOC_GAP = 1.0
"""The document must differ from the base's writing by at least one within-writer spread."""


@dataclass
class StyleFingerprintConfig(ProbeConfig):
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    doc_reference: str = ""
    """The text whose style the adapter should take on (typically the training document)."""
    doc: str | None = None
    """A Markdown or text file to read the reference from instead (relative to the spec)."""
    max_new_tokens: int = 128
    assert_shift_gte: float = 0.25
    assert_z_gte: float = 3.0
    extended: Literal["auto", "on", "off"] = "auto"
    """Accepted for dlm-sway specs; the numpy features are the only ones here."""


def continuations(view: Any, prompts: Sequence[str], max_new_tokens: int, seed: int) -> list[str]:
    return list(view.generate_batch(list(prompts), max_new_tokens=max_new_tokens, seed=seed))


def _null_rows(shifts: list[float | None]) -> list[float]:
    """A null's per-prompt shifts, finite: a degenerate continuation takes the null's own mean."""
    valid = [s for s in shifts if s is not None]
    fill = float(np.mean(valid)) if valid else 0.0
    return [fill if s is None else s for s in shifts]


@register
class StyleFingerprintProbe(Probe):
    kind = "style_fingerprint"
    claim = "the adapter's continuations moved toward its document's writing habits, further than random adapters of its size move them"
    category = "adherence"
    Config = StyleFingerprintConfig

    def check(self, cfg: StyleFingerprintConfig) -> list[str]:
        problems = super().check(cfg)
        if cfg.max_new_tokens < 8:
            problems.append("max_new_tokens: must be >= 8 (a style needs a few sentences)")
        if cfg.doc_reference.strip() and cfg.doc:
            problems.append("doc: give doc_reference (text) or doc (a file), not both")
        if is_named_file(cfg.doc):
            try:
                read_text(cfg.doc)
            except ValueError as e:
                problems.append(f"doc: {e}")
        if not 0 < cfg.assert_shift_gte <= 1:
            problems.append("assert_shift_gte: must lie in (0, 1]")
        return problems

    def run(self, cfg: StyleFingerprintConfig, ctx: RunContext) -> ProbeResult:
        doc = read_text(cfg.doc) if cfg.doc else cfg.doc_reference
        chunks = st.document_chunks(doc, cfg.max_new_tokens * 3 // 4)
        doc_rows = [st.features(c) for c in chunks if st.degenerate(c) is None]
        if not doc_rows:
            return self.result(
                cfg,
                Verdict.SKIP,
                message="no reference text: set doc_reference (the document's text) or doc (its file)",
            )
        with ctx.backend.as_base() as view:
            base_texts = continuations(view, cfg.prompts, cfg.max_new_tokens, ctx.seed)
        with ctx.backend.as_finetuned() as view:
            ft_texts = continuations(view, cfg.prompts, cfg.max_new_tokens, ctx.seed)
        base_rows = {
            i: st.features(t) for i, t in enumerate(base_texts) if st.degenerate(t) is None
        }
        evidence: dict[str, Any] = {
            "features": list(st.FEATURES),
            "base_samples": [t[:200] for t in base_texts],
            "ft_samples": [t[:200] for t in ft_texts],
            "doc_chunks": len(doc_rows),
        }
        blocked = self._unmeasurable(cfg.prompts, base_texts, ft_texts, base_rows)
        if blocked is not None:
            return self.result(cfg, Verdict.WARN, score=0.0, message=blocked, evidence=evidence)
        fr = st.frame(np.stack(list(base_rows.values())), np.stack(doc_rows))
        evidence |= {
            "base_features": fr.base.tolist(),
            "doc_features": fr.doc.tolist(),
            "scale": fr.scale.tolist(),
            "doc_gap": fr.gap,
        }
        if fr.gap < MIN_DOC_GAP:
            msg = (
                f"the document's style is already the base's (gap {fr.gap:.2f} < {MIN_DOC_GAP:g} "
                "within-writer spreads): no direction to move in; give a reference that reads differently"
            )
            return self.result(cfg, Verdict.WARN, score=0.0, message=msg, evidence=evidence)
        per_prompt = st.per_prompt_shifts(fr, ft_texts, base_rows)
        return self._judged(cfg, ctx, fr, base_rows, per_prompt, doc, evidence)

    def _judged(
        self,
        cfg: StyleFingerprintConfig,
        ctx: RunContext,
        fr: st.StyleFrame,
        base_rows: dict[int, np.ndarray],
        per_prompt: list[float | None],
        doc: str,
        evidence: dict[str, Any],
    ) -> ProbeResult:
        valid = {i: s for i, s in enumerate(per_prompt) if s is not None}
        shift = float(np.mean(list(valid.values())))
        null, rows = self._nulls(cfg, ctx, fr, base_rows, doc)
        cmp = compare(shift, null, "")
        # Paired with the nulls on the same prompt: what the prompt itself invites cancels.
        diffs = [s - float(np.mean([r[i] for r in rows])) for i, s in valid.items()] if rows else []
        interval = None
        if diffs:
            interval = bootstrap_ci(diffs, seed=ctx.seed) if len(diffs) > 1 else (diffs[0],) * 2
        bad = len(per_prompt) - len(valid)
        verdict, msg = self._verdict(cfg, shift, cmp, diffs, interval, bad, len(per_prompt))
        evidence |= {
            "shift": shift,
            "per_prompt_shift": per_prompt,
            "null_meaning": "the same continuations under K random adapters of the adapter's "
            "size: how far noise of that size moves the style toward the document",
            "paired_interval": interval,
            "degenerate_ft_samples": bad,
        }
        score = float(np.clip(shift / cfg.assert_shift_gte, 0.0, 1.0))
        return compared_result(
            self,
            cfg,
            verdict,
            cmp,
            score=score if verdict is Verdict.PASS else 0.5 * score,
            raw=shift,
            message=msg,
            evidence=evidence,
        )

    def _nulls(
        self,
        cfg: StyleFingerprintConfig,
        ctx: RunContext,
        fr: st.StyleFrame,
        base_rows: dict[int, np.ndarray],
        doc: str,
    ) -> tuple[Any, list[list[float]]]:
        if not ctx.calibrates(self.kind):
            return None, []

        def measure(backend: DifferentialBackend) -> list[float]:
            with backend.as_finetuned() as view:
                texts = continuations(view, cfg.prompts, cfg.max_new_tokens, ctx.seed)
            return _null_rows(st.per_prompt_shifts(fr, texts, base_rows))

        key = (
            self.kind,
            st.FEATURES_VERSION,
            list(cfg.prompts),
            cfg.max_new_tokens,
            text_hash(doc),
            ctx.seed,
        )
        return ctx.null_per_prompt(measure, key=key)

    @staticmethod
    def _unmeasurable(
        prompts: Sequence[str],
        base_texts: list[str],
        ft_texts: list[str],
        base_rows: dict[int, np.ndarray],
    ) -> str | None:
        """Why no shift can be measured: most continuations of a view are degenerate."""
        for label, texts in (("fine-tuned", ft_texts), ("base", base_texts)):
            reasons = [(p, st.degenerate(t)) for p, t in zip(prompts, texts, strict=True)]
            bad = [(p, r) for p, r in reasons if r is not None]
            if 2 * len(bad) > len(texts) or (label == "base" and not base_rows):
                p, r = bad[0]
                return (
                    f"the {label} view's continuations are degenerate on {len(bad)} of "
                    f"{len(texts)} prompts (e.g. {p!r}: {r}): no style to measure"
                )
        return None

    @staticmethod
    def _verdict(
        cfg: StyleFingerprintConfig,
        shift: float,
        cmp: Comparison,
        diffs: list[float],
        interval: tuple[float, float] | None,
        bad: int,
        n: int,
    ) -> tuple[Verdict, str]:
        head = f"style shift {shift:+.2f} toward the document (0 = base, 1 = document)"
        if shift < cfg.assert_shift_gte:
            where = "still writes like the base" if shift < 0.1 else "moved too little"
            if shift < -0.1:
                where = "moved away from the document"
            return Verdict.FAIL, f"{head}: {where} (needs {cfg.assert_shift_gte:g}); {cmp.text}"
        noise = cmp.against_nulls(head, cfg.assert_z_gte, "move the style as far")
        if noise is not None:
            return noise
        if interval is not None and interval[0] <= 0:
            beyond = sum(d > 0 for d in diffs)
            return (
                Verdict.WARN,
                f"{head}, {cmp.text}; but not on every prompt: beyond its nulls on {beyond} of "
                f"{len(diffs)} (paired interval {interval[0]:+.2f}…{interval[1]:+.2f})",
            )
        if bad:
            return (
                Verdict.WARN,
                f"{head}, but {bad} of {n} fine-tuned continuations are empty or degenerate; {cmp.text}",
            )
        return Verdict.PASS, f"{head}; {cmp.text}"
