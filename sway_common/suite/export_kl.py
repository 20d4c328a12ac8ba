"""The divergence statistics llama.cpp's ``--kl-divergence`` reports, for an export.

Over every token position of each prompt followed by the fine-tune's own greedy
completion (position ``t`` predicts token ``t + 1``), with top-k slices and their tail
mass (:func:`~sway_common.divergence.align`):

- ``KL(F‖E)``, the fine-tune's distribution against the export's: mean, median, 99th
  percentile and max per prompt and pooled over all positions (llama.cpp pools tokens
  the same way: a long prompt weighs more);
- top-1 agreement: the share of positions where both give the same most probable token;
- beside them the same figures for the base, ``KL(F‖B)`` (what losing the whole fine-tune
  costs: the scale the export's figures read against) and base against export.

A mean hides the few positions where a lossy export goes wrong; p99 and max show them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from sway_common.divergence import divergence
from sway_common.types import ProbeResult, TokenDist, Verdict

NAME = "export_kl"
PAIRS = {
    "ft_export": "fine-tune ‖ export",
    "ft_base": "fine-tune ‖ base",
    "base_export": "base ‖ export",
}


@dataclass(frozen=True)
class KLSummary:
    """KL(P‖Q) over some token positions, and how often P and Q agree on the top token."""

    mean: float
    median: float
    p99: float
    max: float
    top1: float
    """Share of positions whose most probable token is the same in P and Q."""
    positions: int


def _summary(kl: np.ndarray, same: np.ndarray) -> KLSummary:
    if kl.size == 0:
        nan = float("nan")
        return KLSummary(nan, nan, nan, nan, nan, 0)
    return KLSummary(
        mean=float(kl.mean()),
        median=float(np.median(kl)),
        p99=float(np.percentile(kl, 99)),
        max=float(kl.max()),
        top1=float(same.mean()),
        positions=int(kl.size),
    )


def position_kl(p: Sequence[TokenDist], q: Sequence[TokenDist]) -> tuple[np.ndarray, np.ndarray]:
    """Per position: KL(p‖q) in nats, and whether both put the same token on top."""
    if len(p) != len(q):
        raise ValueError(f"{len(p)} positions against {len(q)}: the texts tokenize differently")
    kl = np.array([divergence(b, a, kind="kl") for a, b in zip(p, q, strict=True)], np.float64)
    same = np.array(
        [int(a.token_ids[0]) == int(b.token_ids[0]) for a, b in zip(p, q, strict=True)], bool
    )
    return kl, same


@dataclass(frozen=True)
class PairStats:
    """One pair of views: each prompt's summary and the pooled one."""

    per_prompt: list[KLSummary]
    pooled: KLSummary


def pair_stats(p: Sequence[Sequence[TokenDist]], q: Sequence[Sequence[TokenDist]]) -> PairStats:
    """KL(p‖q) statistics per text (``p[i]``, ``q[i]``: one text's positions) and pooled."""
    rows = [position_kl(a, b) for a, b in zip(p, q, strict=True)]
    pooled_kl = np.concatenate([k for k, _ in rows]) if rows else np.zeros(0)
    pooled_same = np.concatenate([s for _, s in rows]) if rows else np.zeros(0, bool)
    return PairStats([_summary(k, s) for k, s in rows], _summary(pooled_kl, pooled_same))


def kl_result(
    base: Sequence[Sequence[TokenDist]],
    ft: Sequence[Sequence[TokenDist]],
    export: Sequence[Sequence[TokenDist]],
    *,
    top_k: int,
) -> ProbeResult:
    """The statistics as a probe result: reported, never gating (the retention measures
    decide); its message says the pooled figures of fine-tune against export and base."""
    stats = {
        "ft_export": pair_stats(ft, export),
        "ft_base": pair_stats(ft, base),
        "base_export": pair_stats(base, export),
    }
    fe, fb = stats["ft_export"].pooled, stats["ft_base"].pooled
    message = (
        f"KL(fine-tune‖export) over {fe.positions} positions of the prompts and the "
        f"fine-tune's completions: mean {fe.mean:.3g}, median {fe.median:.3g}, p99 "
        f"{fe.p99:.3g}, max {fe.max:.3g} nats; same top token {fe.top1:.1%} "
        f"(the base: mean {fb.mean:.3g}, p99 {fb.p99:.3g} nats, same top token {fb.top1:.1%})"
    )
    return ProbeResult(
        name=NAME,
        kind=NAME,
        verdict=Verdict.PASS,
        category="export",
        raw=fe.mean,
        message=message,
        gating=False,
        evidence={
            "top_k": top_k,
            **{
                name: {
                    "pooled": asdict(s.pooled),
                    "per_prompt": [asdict(x) for x in s.per_prompt],
                }
                for name, s in stats.items()
            },
        },
    )


@runtime_checkable
class PositionScoring(Protocol):
    """A view that gives the distribution at every position of a text."""

    def position_dist_batch(
        self, texts: Sequence[str], *, top_k: int = 256
    ) -> list[list[TokenDist]]: ...


class _Views(Protocol):
    def as_base(self) -> AbstractContextManager[Any]: ...


def measure_kl(
    backend: Any,
    export: _Views,
    prompts: Sequence[str],
    completions: Sequence[str],
    top_k: int,
    progress: Callable[[str], None] = lambda _msg: None,
) -> ProbeResult | None:
    """The statistics over each prompt followed by its completion, in the base and
    fine-tuned views of ``backend`` and the base view of ``export`` (None: a stand-in
    export whose view cannot give per-position distributions)."""
    texts = [p + c for p, c in zip(prompts, completions, strict=True)]
    progress("every position: base, fine-tune and export")
    dists = []
    for opener in (backend.as_base, backend.as_finetuned, export.as_base):
        with opener() as view:
            if not isinstance(view, PositionScoring):
                return None
            dists.append(view.position_dist_batch(texts, top_k=top_k))
    return kl_result(*dists, top_k=top_k)
