"""attribution: which layers, module types or named parts of the adapter carry its effect?

The adapted modules are split into groups (``groups: layers`` one per decoder block,
``modules`` one per module type such as ``q_proj``, or a list of globs over module paths,
one group each). For every group two views of the one loaded model are scored on the
prompts: the adapter without that group (λ = 0 on its modules, the rest as trained) and
the group alone (λ = 0 on every other module). The effect of a view is delta_kl's: the
per-prompt next-token divergence from the base, on the scale delta_kl's effect ratio is
taken on (JS as ``bounded_effect``, KL as measured).

A group's share of the fine-tune's effect ``E`` is the mean of what leaving it out removes
and what it does alone, ``(E − E_without + E_alone) / 2E``: its Shapley value in the game
of the group against the rest. When the change in the logits is a sum of the groups'
changes and the effect is quadratic in it (small updates), these shares are exact and sum
to 1; what they miss is reported as the interaction, ``1 − Σ shares``. Shares need not sum
to 1, and globs that overlap or leave modules out are not a partition: said in the result.
Each share carries a 95% bootstrap interval over prompts.

Cost: ``2·G + 2`` views of each prompt (G groups), stacked into shared batches where the
backend can, so the blocks below the first adapted one run once per prompt. ``max_groups``
bounds G. Non-gating: it says where the effect is, not whether it is good.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from sway_common.adapters.weights import AdapterWeights
from sway_common.backend.views import ViewSpec
from sway_common.divergence import DivergenceKind, bounded_effect, divergence
from sway_common.stats import bootstrap_ci
from sway_common.types import ProbeResult, TokenDist, Verdict

from .base import (
    DEFAULT_PROMPTS,
    MIN_PROMPTS_FOR_INTERVAL,
    Probe,
    ProbeConfig,
    RunContext,
    register,
)
from .views import StackedViewsBackend

GROUPINGS = ("layers", "modules")
# A module path inside a numbered list of decoder blocks: "model.layers.22.self_attn.q_proj".
_IN_BLOCK = re.compile(r"^(?:.*\.)?(?P<blocks>[^.]+)\.(?P<index>\d+)\.")
SHOWN = 3
# The groups' effects alone add up to the whole within this much: no word about it.
ALONE_NOTED = 0.1


@dataclass
class AttributionConfig(ProbeConfig):
    groups: Any = "layers"
    """``layers`` (one group per decoder block), ``modules`` (one per module type), or a
    list of globs over module paths (one group each, e.g. ``"*.layers.2[0-9].*"``)."""
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    divergence: DivergenceKind = "js"
    top_k: int | None = None
    max_groups: int = 64
    """The most groups one run scores (each costs two views of every prompt)."""
    min_effect: float = 1e-3
    """Mean divergence (nats) below which the adapter moves too little to attribute."""


@runtime_checkable
class AttributableBackend(StackedViewsBackend, Protocol):
    """A backend whose adapted modules are known and whose views can scale a subset."""

    @property
    def adapter_weights(self) -> AdapterWeights | None: ...


def layer_label(path: str) -> str | None:
    """ "layers.10" for a module of block 10 of the ``layers`` list; None outside blocks."""
    m = _IN_BLOCK.match(path)
    return f"{m['blocks']}.{m['index']}" if m else None


def resolve_groups(paths: Sequence[str], groups: str | Sequence[str]) -> dict[str, list[str]]:
    """Group label → the module paths in it, in a stable order (blocks by index).

    ``layers``: a module outside every block list is a group of its own (its path).
    Globs: a glob matching no module raises ``ValueError`` naming it.
    """
    out: dict[str, list[str]] = {}
    if groups == "layers":
        for path in sorted(paths):
            out.setdefault(layer_label(path) or path, []).append(path)
        return dict(sorted(out.items(), key=lambda kv: _natural(kv[0])))
    if groups == "modules":
        for path in sorted(paths):
            out.setdefault(path.rsplit(".", 1)[-1], []).append(path)
        return out
    for glob in groups:
        matched = [p for p in sorted(paths) if fnmatch.fnmatchcase(p, glob)]
        if not matched:
            example = sorted(paths)[0] if paths else "none"
            raise ValueError(
                f"the glob {glob!r} matches no adapted module (module paths look like {example!r})"
            )
        out[glob] = matched
    return out


def _natural(label: str) -> tuple[Any, ...]:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", label))


def group_views(groups: Mapping[str, Sequence[str]], every: Sequence[str]) -> list[ViewSpec]:
    """Base, ft, then per group: without it (λ = 0 on it) and it alone (λ = 0 elsewhere)."""
    views = [ViewSpec("base"), ViewSpec("ft")]
    for members in groups.values():
        inside = frozenset(members)
        views.append(ViewSpec("scaled", lam=0.0, modules=inside))
        views.append(ViewSpec("scaled", lam=0.0, modules=frozenset(every) - inside))
    return views


@dataclass
class Shares:
    """Each group's share of the effect, its interval, and what the shares leave over."""

    share: list[float]
    interval: list[tuple[float, float] | None]
    without: list[float]
    """Share of the effect lost when the group is left out: ``1 − E_without / E``."""
    alone: list[float]
    """The group's effect alone as a share of the fine-tune's: ``E_alone / E``."""
    per_prompt: list[list[float | None]]
    """Groups × prompts: the share on each prompt (None where the fine-tune moved nothing)."""
    interaction: float


def effect_scale(kind: DivergenceKind) -> Any:
    """delta_kl's effect scale: JS bounded (``bounded_effect``), KL as measured."""
    return bounded_effect if kind == "js" else float


def shares(full: np.ndarray, without: np.ndarray, alone: np.ndarray, *, seed: int) -> Shares:
    """Shares from per-prompt effects: ``full`` (P,), ``without`` and ``alone`` (G, P)."""
    total = float(full.sum())
    if total <= 0:
        raise ValueError("the fine-tune has no effect on these prompts: nothing to attribute")

    def share_of(g: int, idx: np.ndarray) -> float:
        t = float(full[idx].sum())
        moved = float((full[idx] - without[g, idx]).sum() + alone[g, idx].sum())
        return moved / (2 * t) if t > 0 else float("nan")

    every = np.arange(full.size)
    share = [share_of(g, every) for g in range(without.shape[0])]
    interval: list[tuple[float, float] | None] = []
    for g in range(without.shape[0]):
        if full.size < MIN_PROMPTS_FOR_INTERVAL:
            interval.append(None)
            continue

        def resampled(idx: np.ndarray, g: int = g) -> float:
            return _finite_or(share_of(g, idx.astype(np.int64)), share[g])

        interval.append(bootstrap_ci(every.astype(np.float64), seed=seed, stat=resampled))
    per_prompt = [
        [
            float((full[i] - without[g, i] + alone[g, i]) / (2 * full[i])) if full[i] > 0 else None
            for i in range(full.size)
        ]
        for g in range(without.shape[0])
    ]
    return Shares(
        share=share,
        interval=interval,
        without=[1.0 - float(without[g].sum()) / total for g in range(without.shape[0])],
        alone=[float(alone[g].sum()) / total for g in range(without.shape[0])],
        per_prompt=per_prompt,
        interaction=1.0 - sum(share),
    )


def _listed(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None else [interval[0], interval[1]]


def _finite_or(x: float, fallback: float) -> float:
    # A resample of prompts that all had zero effect: that draw says nothing new.
    return x if np.isfinite(x) else fallback


@register
class AttributionProbe(Probe):
    kind = "attribution"
    claim = "reports which groups of modules carry the adapter's effect (each group's share with an interval over prompts); it judges nothing beyond a measurable effect"
    category = "attribution"
    gating = False
    Config = AttributionConfig

    def check(self, cfg: AttributionConfig) -> list[str]:
        problems = super().check(cfg)
        g = cfg.groups
        if isinstance(g, str):
            if g not in GROUPINGS:
                problems.append(
                    f"groups: {g!r} is not one of {', '.join(GROUPINGS)}, nor a list of globs"
                )
        elif not isinstance(g, list) or not g or not all(isinstance(x, str) and x for x in g):
            problems.append(
                "groups: give 'layers', 'modules', or a non-empty list of module-path globs"
            )
        elif len(set(g)) < len(g):
            problems.append("groups: a glob is listed twice")
        if cfg.max_groups < 1:
            problems.append("max_groups: must be >= 1")
        if cfg.min_effect < 0:
            problems.append("min_effect: must be >= 0")
        return problems

    def run(self, cfg: AttributionConfig, ctx: RunContext) -> ProbeResult:
        backend = ctx.backend
        if not isinstance(backend, AttributableBackend) or backend.adapter_weights is None:
            return self.result(
                cfg, Verdict.SKIP, message="backend has no views of a subset of the modules"
            )
        every = sorted(backend.adapter_weights.modules)
        groups = resolve_groups(every, cfg.groups)
        if len(groups) > cfg.max_groups:
            raise ValueError(
                f"{len(groups)} groups exceed max_groups={cfg.max_groups} (each costs 2 views "
                "of every prompt): merge them with globs or raise max_groups"
            )
        views = group_views(groups, every)
        top_k = cfg.top_k or ctx.top_k
        ctx.progress(f"{len(views)} views ({len(groups)} groups × 2, base, ft)")
        dists = backend.next_token_dist_views(views, list(cfg.prompts), top_k=top_k)
        js = _divergences(dists, cfg.divergence)
        scale = effect_scale(cfg.divergence)
        effect = np.vectorize(scale, otypes=[np.float64])(js)
        raw = float(js[1].mean())
        evidence = self._evidence(cfg, groups, every, views, effect, raw, ctx.seed, top_k)
        if raw < cfg.min_effect or not effect[1].sum() > 0:
            msg = (
                f"the adapter moves these prompts too little to attribute: {raw:.3g} nats "
                f"mean {cfg.divergence.upper()} < {cfg.min_effect:g}"
            )
            return self.result(cfg, Verdict.WARN, raw=raw, message=msg, evidence=evidence)
        return self.result(
            cfg, Verdict.PASS, raw=raw, message=_message(evidence), evidence=evidence
        )

    @staticmethod
    def _evidence(
        cfg: AttributionConfig,
        groups: Mapping[str, Sequence[str]],
        every: Sequence[str],
        views: Sequence[ViewSpec],
        effect: np.ndarray,
        raw: float,
        seed: int,
        top_k: int,
    ) -> dict[str, Any]:
        covered = [p for members in groups.values() for p in members]
        evidence: dict[str, Any] = {
            "grouping": cfg.groups,
            "divergence": cfg.divergence,
            "effect_scale": "bounded JS" if cfg.divergence == "js" else "KL",
            "top_k": top_k,
            "prompts": list(cfg.prompts),
            "mean_divergence": raw,
            "partition": len(covered) == len(set(covered)) == len(every),
            "unattributed_modules": sorted(set(every) - set(covered)),
            "cost": {
                "views": len(views),
                "prompt_forwards": len(views) * len(cfg.prompts),
                "note": "2 views per group plus base and ft, stacked in shared batches where the backend can",
            },
        }
        if not effect[1].sum() > 0:
            evidence["groups"] = []
            return evidence
        n = len(groups)
        s = shares(effect[1], effect[2 : 2 + 2 * n : 2], effect[3 : 3 + 2 * n : 2], seed=seed)
        evidence["groups"] = [
            {
                "group": label,
                "modules": len(members),
                "share": s.share[g],
                "interval": _listed(s.interval[g]),
                "without": s.without[g],
                "alone": s.alone[g],
            }
            for g, (label, members) in enumerate(groups.items())
        ]
        evidence["interaction"] = s.interaction
        evidence["alone_sum"] = sum(s.alone)
        evidence["per_prompt_share"] = s.per_prompt
        return evidence


def _divergences(dists: list[list[TokenDist]], kind: DivergenceKind) -> np.ndarray:
    """Views × prompts: each view's divergence from the base view (the first)."""
    base = dists[0]
    return np.array(
        [[divergence(a, b, kind=kind) for a, b in zip(base, q, strict=True)] for q in dists],
        dtype=np.float64,
    )


def _message(evidence: dict[str, Any]) -> str:
    rows = sorted(evidence["groups"], key=lambda r: -r["share"])
    shown = []
    for r in rows[:SHOWN]:
        iv = r["interval"]
        span = f" [{iv[0]:.0%}–{iv[1]:.0%}]" if iv is not None else ""
        shown.append(f"{r['group']} {r['share']:.0%}{span}")
    more = f" (+{len(rows) - SHOWN} more)" if len(rows) > SHOWN else ""
    leftover = f"interaction {evidence['interaction']:+.0%} (what the shares leave over)"
    alone = evidence["alone_sum"]
    if abs(alone - 1.0) > ALONE_NOTED:
        how = "overlap: each does part of another's work" if alone > 1 else "need each other"
        leftover += f"; each group alone, summed: {alone:.0%} of the effect (the groups {how})"
    if not evidence["partition"]:
        leftover += "; the groups overlap or leave modules out, so shares need not add up"
    return f"share of the effect: {', '.join(shown)}{more}; {leftover}"
