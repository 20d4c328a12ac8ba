"""section_internalization: which sections of the training document did the adapter take in?

The document named by ``doc`` (Markdown or plain text) is split at its headings. For each
section, the gain is the change in mean log-prob per token from base to fine-tuned view;
the leak is the same gain on held-out prose the adapter never saw (a generic shift that
helps any text). A section passes when its gain beats the leak by ``per_section_threshold``
nats/token; PASS needs at least ``assert_passing_section_frac`` of the sections passing
and a mean section-minus-leak gain above random adapters of the same size (z).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sway_common.protocols import DifferentialBackend
from sway_common.types import ProbeResult, Verdict

from .base import Probe, ProbeConfig, RunContext, register
from .likelihood import compare, compared_result, null_values, per_token, rolling_gain
from .packs import BUILTIN, chunks, is_named_file, load_corpus, read_text, sections, spread

SECTION_KIND = "prose"
"""Every section of a Markdown or text document is prose; dlm-sway's other kinds
(instruction, preference blocks of a .dlm file) have no counterpart here."""


@dataclass
class SectionInternalizationConfig(ProbeConfig):
    doc: str | None = None
    """The Markdown or plain-text document the adapter was trained on."""
    include_kinds: list[str] = field(default_factory=list)
    """Section kinds to judge; empty means all. Sections read from ``doc`` are 'prose'."""
    per_section_threshold: float = 0.05
    assert_passing_section_frac: float = 0.5
    max_prose_chars: int = 2000
    corpus: str = BUILTIN
    """Held-out prose that measures the leak: ``builtin`` or a local text file."""
    leak_chunks: int = 4
    assert_z_gte: float = 3.0


def _leak_texts(cfg: SectionInternalizationConfig) -> list[str]:
    return spread(chunks(load_corpus(cfg.corpus), cfg.max_prose_chars), cfg.leak_chunks)


def specific_gains(
    backend: DifferentialBackend, texts: list[str], n_sections: int
) -> tuple[np.ndarray, float]:
    """(per-section gain minus leak, leak), gains in nats/token; sections come first in ``texts``."""
    gains, counts = rolling_gain(backend, texts)
    per_section = per_token(gains[:n_sections], counts[:n_sections])
    leak = float(gains[n_sections:].sum() / max(1, counts[n_sections:].sum()))
    return per_section - leak, leak


@register
class SectionInternalizationProbe(Probe):
    kind = "section_internalization"
    claim = "the adapter took in at least half of its document's sections, beyond held-out prose and beyond random adapters of its size"
    category = "adherence"
    Config = SectionInternalizationConfig

    def check(self, cfg: SectionInternalizationConfig) -> list[str]:
        problems = super().check(cfg)
        for name in ("doc", "corpus"):
            value = getattr(cfg, name)
            if is_named_file(value):
                try:
                    read_text(value)
                except ValueError as e:
                    problems.append(f"{name}: {e}")
        if cfg.max_prose_chars < 64:
            problems.append("max_prose_chars: must be >= 64")
        if cfg.leak_chunks < 1:
            problems.append("leak_chunks: must be >= 1")
        return problems

    def run(self, cfg: SectionInternalizationConfig, ctx: RunContext) -> ProbeResult:
        if cfg.doc is None:
            return self.result(
                cfg,
                Verdict.SKIP,
                message="no doc: name the training document "
                "(Markdown or plain text) in the probe's `doc:` field",
            )
        if cfg.include_kinds and SECTION_KIND not in cfg.include_kinds:
            return self.result(
                cfg,
                Verdict.SKIP,
                message=f"include_kinds {cfg.include_kinds} "
                f"leaves nothing: sections of a document are {SECTION_KIND!r}",
            )
        found = [(t, b[: cfg.max_prose_chars]) for t, b in sections(read_text(cfg.doc))]
        if not found:
            return self.result(cfg, Verdict.SKIP, message=f"{cfg.doc} holds no text")
        texts = [b for _, b in found] + _leak_texts(cfg)
        n = len(found)
        specific, leak = specific_gains(ctx.backend, texts, n)
        passing = specific >= cfg.per_section_threshold
        frac = float(passing.mean())
        mean_specific = float(specific.mean())
        null = null_values(
            ctx, self.kind, lambda b: float(specific_gains(b, texts, n)[0].mean()), texts, n
        )
        cmp = compare(mean_specific, null, " nats/token")
        head = (
            f"{int(passing.sum())} of {n} sections gain > {cfg.per_section_threshold:g} nats/token "
            f"over held-out prose (leak {leak:+.3g}; mean section gain over leak {mean_specific:+.3g})"
        )
        verdict, msg = self._judge(cfg, frac, head, cmp)
        return compared_result(
            self,
            cfg,
            verdict,
            cmp,
            score=1.0 if verdict is Verdict.PASS else frac * 0.5,
            raw=frac,
            message=msg,
            evidence=self._evidence(found, specific, passing, leak),
        )

    @staticmethod
    def _judge(
        cfg: SectionInternalizationConfig, frac: float, head: str, cmp: Any
    ) -> tuple[Verdict, str]:
        if frac < cfg.assert_passing_section_frac:
            return Verdict.FAIL, f"{head}; needs {cfg.assert_passing_section_frac:.0%} of sections"
        if cmp.null is not None and not cmp.beats(cfg.assert_z_gte):
            return Verdict.FAIL, f"{head}, but random adapters of its size do as well: {cmp.text}"
        return Verdict.PASS, f"{head}; {cmp.text}"

    @staticmethod
    def _evidence(
        found: list[tuple[str, str]], specific: np.ndarray, passing: np.ndarray, leak: float
    ) -> dict[str, Any]:
        return {
            "leak": leak,
            "sections": [
                {"title": t, "gain_over_leak": float(s), "passed": bool(ok), "chars": len(b)}
                for (t, b), s, ok in zip(found, specific, passing, strict=True)
            ],
        }
