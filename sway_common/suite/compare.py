"""Two adapters (or checkpoints) of one base compared, on one loaded base model.

Each adapter runs the same suite (the quick suite by default: each against its own
nulls); then the two are compared directly on the suite's target prompts:

- **distance**: the next-token JS between the two fine-tunes, prompt by prompt;
- **strength**: B's effect on the target prompts (JS from the base, on delta_kl's bounded
  scale) as a multiple of A's, as a ratio of sums over prompts;
- **direction**: where B sits against A's own path, A scaled by λ (λ = 0 the base, 1 A,
  2 twice A's update; scored while A is loaded, stacked): ``along`` is the λ whose view is
  closest to B in summed JS over prompts, ``elsewhere`` the JS left between B and that view
  as a share of B's JS from the base (0: B is A scaled; 1: nothing of A's path explains
  B). A path, not a straight line: a model's response bends as an update grows, so B = 2·A
  is rarely twice A's shift in any probability space. Beside it, ``cosine``: the cosine
  of the two straight shifts from the base, as vectors of square-root probabilities
  (``√p_ft − √p_base``, squared length twice the Hellinger distance);
- **harm**: each regression probe (general knowledge, held-out prose) item by item, B's
  change from the base minus A's (positive: B keeps more).

Every comparison carries a 95% bootstrap interval over prompts (items, chunks). The
verdict line reads them: "B is stronger on the target prompts, in the same direction as
A, and forgets less", or whatever they say.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from sway_common.backend.model_views import ModelViews
from sway_common.backend.views import ViewSpec
from sway_common.divergence import align_many, bounded_effect, divergence
from sway_common.probes.calibration_drift import CalibrationDriftConfig
from sway_common.probes.delta_kl import DeltaKLConfig
from sway_common.probes.external_perplexity import ExternalPerplexityConfig
from sway_common.probes.views import next_token_dists_in_views
from sway_common.stats import bootstrap_ci
from sway_common.suite.spec import SuiteSpec
from sway_common.types import SuiteResult, TokenDist

Interval = tuple[float, float, float]
"""(value, low, high): a figure and its 95% bootstrap interval over prompts."""

# Per-item changes each regression probe keeps in its evidence (B − A is taken on them).
HARM_ITEMS = {
    "calibration_drift": ("per_item", "nats per item"),
    "external_perplexity": ("per_chunk", "nats/byte per chunk"),
}
PATH = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
"""The λ of A's path that B is placed on (0: the base, 1: A)."""
SAME_DIRECTION = 0.1
"""At most this share of B's effect off A's path: B is A's direction."""
PARTLY = 0.5
SAME_DISTANCE = 0.02
"""A and B read as the same when the JS between them is below this share of their effects
and no harm probe tells them apart."""


@dataclass
class HarmRow:
    """One regression probe of both adapters, side by side."""

    name: str
    kind: str
    verdicts: tuple[str, str]
    raws: tuple[float | None, float | None]
    unit: str
    difference: Interval | None
    """Mean over items of B's change minus A's (positive: B keeps more); None when the
    items are missing (a probe that errored or skipped)."""
    floor: float = 0.0
    """A difference smaller than this is no difference (the probe's ``min_effect``)."""

    @property
    def says(self) -> str:
        """``more``, ``less`` or ``same``: what B forgets compared with A here. A difference
        counts when its interval excludes 0 and it is at least the floor."""
        if self.difference is None:
            return "same"
        value, low, high = self.difference
        if high < 0 and value <= -self.floor:
            return "more"
        return "less" if low > 0 and value >= self.floor else "same"


@dataclass
class Shift:
    """Two fine-tunes of one base compared prompt by prompt (:func:`measure`)."""

    js_a: list[float]
    """Per prompt: next-token JS from the base to A."""
    js_b: list[float]
    js_ab: list[float]
    """Per prompt: next-token JS between A and B."""
    distance: Interval
    """Mean JS between A and B over prompts."""
    strength: Interval | None
    """B's effect as a multiple of A's (None: A moves nothing)."""
    along: Interval
    """The λ of A's path closest to B (1: A itself, 2: twice A's update)."""
    elsewhere: Interval | None
    """JS between B and A's path at ``along``, as a share of B's JS from the base (None: B
    moves nothing)."""
    path: dict[float, float]
    """λ → mean JS between B and A scaled by λ."""
    cosine: Interval | None
    """Cosine of the straight shifts from the base (square-root probabilities)."""


@dataclass
class Comparison:
    """A against B, both of one base; ``verdict`` is the line that sums it up."""

    a: str
    b: str
    same_weights: bool
    prompts: list[str]
    shift: Shift
    harm: list[HarmRow]
    results: tuple[SuiteResult, SuiteResult]
    verdict: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "verdict": self.verdict,
            "same_weights": self.same_weights,
            "prompts": list(self.prompts),
            **asdict(self.shift),
            "harm": [{**asdict(h), "b_forgets": h.says} for h in self.harm],
            "results": {"a": self.results[0].to_dict(), "b": self.results[1].to_dict()},
        }


def target_prompts(spec: SuiteSpec) -> list[str]:
    """The prompts the adapters are compared on: the suite's first delta_kl probe's."""
    for cfg in spec.probes:
        if isinstance(cfg, DeltaKLConfig) and cfg.enabled:
            return list(cfg.prompts)
    raise ValueError("the suite has no enabled delta_kl probe: no target prompts to compare on")


RunSuite = Callable[[ModelViews, str], SuiteResult]
"""Runs the suite on the backend's current adapter; the str labels it (``A``, ``B``)."""


def compare_adapters(
    backend: ModelViews, spec: SuiteSpec, b_path: str | Path, run: RunSuite, *, a_path: str = ""
) -> Comparison:
    """A (the backend's adapter now) against B (swapped in with ``set_adapter``)."""
    prompts, top_k = target_prompts(spec), spec.defaults.top_k
    result_a = run(backend, "A")
    views = [ViewSpec("base")] + [ViewSpec("scaled", lam=lam) for lam in PATH]
    base, *path = next_token_dists_in_views(backend, views, prompts, top_k=top_k)
    hash_a = backend.adapter_hash
    backend.set_adapter(b_path)
    result_b = run(backend, "B")
    (ft_b,) = next_token_dists_in_views(backend, [ViewSpec("ft")], prompts, top_k=top_k)
    out = Comparison(
        a=a_path,
        b=str(b_path),
        same_weights=hash_a == backend.adapter_hash,
        prompts=prompts,
        shift=measure(base, dict(zip(PATH, path, strict=True)), ft_b, seed=spec.defaults.seed),
        harm=harm_rows(result_a, result_b, seed=spec.defaults.seed, floors=harm_floors(spec)),
        results=(result_a, result_b),
    )
    out.verdict = verdict(out)
    return out


def measure(
    base: Sequence[TokenDist],
    path: Mapping[float, Sequence[TokenDist]],
    ft_b: Sequence[TokenDist],
    *,
    seed: int,
) -> Shift:
    """B against A on the same prompts: ``base`` and ``ft_b`` hold each prompt's next-token
    distribution in that view, ``path[λ]`` in A scaled by λ (``path[1.0]`` is A; ``path[0.0]``
    should be the base)."""
    ft_a = path[1.0]
    js_a = [divergence(p, q) for p, q in zip(base, ft_a, strict=True)]
    js_b = [divergence(p, q) for p, q in zip(base, ft_b, strict=True)]
    js_ab = [divergence(p, q) for p, q in zip(ft_a, ft_b, strict=True)]
    e_a = np.array([bounded_effect(x) for x in js_a])
    e_b = np.array([bounded_effect(x) for x in js_b])
    lams = sorted(path)
    # λ × prompts: how far B is from each point of A's path.
    off = np.array(
        [[divergence(p, q) for p, q in zip(path[lam], ft_b, strict=True)] for lam in lams]
    )
    moved = np.asarray(js_b)
    n = len(js_a)

    def closest(i: NDArray[np.int64]) -> int:
        return int(np.argmin(off[:, i].sum(axis=1)))

    elsewhere = None
    if moved.sum() > 0:
        elsewhere = _ratio_of(lambda i: off[closest(i), i].sum(), lambda i: moved[i].sum(), n, seed)
    dots, norm_a, norm_b = shift_products(base, ft_a, ft_b)
    cosine = None
    if norm_a.sum() > 0 and norm_b.sum() > 0:
        cosine = _statistic(
            lambda i: float(dots[i].sum() / math.sqrt(norm_a[i].sum() * norm_b[i].sum())), n, seed
        )
    return Shift(
        js_a=js_a,
        js_b=js_b,
        js_ab=js_ab,
        distance=_statistic(lambda i: float(np.mean(np.asarray(js_ab)[i])), n, seed),
        strength=_ratio(e_b, e_a, seed) if e_a.sum() > 0 else None,
        along=_statistic(lambda i: float(lams[closest(i)]), n, seed),
        elsewhere=elsewhere,
        path={lam: float(row.mean()) for lam, row in zip(lams, off, strict=True)},
        cosine=cosine,
    )


def shift_products(
    base: Sequence[TokenDist], ft_a: Sequence[TokenDist], ft_b: Sequence[TokenDist]
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Per prompt: (A's shift · B's shift, |A's shift|², |B's shift|²), each shift the
    square-root probabilities' change from the base on one aligned support."""
    rows = []
    for p0, pa, pb in zip(base, ft_a, ft_b, strict=True):
        r0, ra, rb = (np.sqrt(x) for x in align_many(p0, pa, pb))
        ua, ub = ra - r0, rb - r0
        rows.append((float(ua @ ub), float(ua @ ua), float(ub @ ub)))
    arr = np.array(rows, dtype=np.float64).reshape(-1, 3)
    return arr[:, 0], arr[:, 1], arr[:, 2]


def _statistic(stat: Callable[[NDArray[np.int64]], float], n: int, seed: int) -> Interval:
    """``stat`` of every prompt and its bootstrap interval over prompts (resampled indices)."""
    every = np.arange(n)
    value = stat(every)
    if n < 2:
        return value, value, value

    def resampled(idx: NDArray[np.float64]) -> float:
        x = stat(idx.astype(np.int64))
        return x if math.isfinite(x) else value

    low, high = bootstrap_ci(every.astype(np.float64), seed=seed, stat=resampled)
    return value, low, high


def _mean(values: NDArray[np.float64], seed: int) -> Interval:
    return _statistic(lambda i: float(values[i].mean()), values.size, seed)


def _ratio(num: NDArray[np.float64], den: NDArray[np.float64], seed: int) -> Interval:
    """Σ num / Σ den over prompts, with its interval (a resample with Σ den = 0 says nothing)."""
    return _ratio_of(lambda i: num[i].sum(), lambda i: den[i].sum(), len(num), seed)


def _ratio_of(
    num: Callable[[NDArray[np.int64]], float],
    den: Callable[[NDArray[np.int64]], float],
    n: int,
    seed: int,
) -> Interval:
    def ratio(i: NDArray[np.int64]) -> float:
        d = float(den(i))
        return float(num(i)) / d if d > 0 else math.nan

    return _statistic(ratio, n, seed)


def harm_rows(
    a: SuiteResult, b: SuiteResult, *, seed: int, floors: Mapping[str, float] | None = None
) -> list[HarmRow]:
    """The regression probes both results hold, B's per-item change minus A's; ``floors``:
    the smallest difference that counts, by probe name."""
    theirs = {p.name: p for p in b.probes}
    rows = []
    for pa in a.probes:
        pb = theirs.get(pa.name)
        if pa.category != "regression" or pb is None or pb.kind != pa.kind:
            continue
        key, unit = HARM_ITEMS.get(pa.kind, ("", ""))
        items_a, items_b = pa.evidence.get(key), pb.evidence.get(key)
        difference = None
        if items_a and items_b and len(items_a) == len(items_b):
            diff = np.asarray(items_b, dtype=np.float64) - np.asarray(items_a, dtype=np.float64)
            difference = _mean(diff, seed)
        rows.append(
            HarmRow(
                pa.name,
                pa.kind,
                (pa.verdict.value, pb.verdict.value),
                (pa.raw, pb.raw),
                unit,
                difference,
                (floors or {}).get(pa.name, 0.0),
            )
        )
    return rows


def harm_floors(spec: SuiteSpec) -> dict[str, float]:
    """Each regression probe's ``min_effect``: below it, the probe takes a change for none."""
    kinds = (CalibrationDriftConfig, ExternalPerplexityConfig)
    return {cfg.name: cfg.min_effect for cfg in spec.probes if isinstance(cfg, kinds)}


def verdict(c: Comparison) -> str:
    """The line a comparison ends in, from its intervals."""
    if c.same_weights:
        return "A and B are the same: their weights are identical"
    s = c.shift
    told_apart = [h.name for h in c.harm if h.says != "same"]
    effect = float(min(np.mean(s.js_a), np.mean(s.js_b)))
    if not told_apart and effect > 0 and s.distance[0] <= SAME_DISTANCE * effect:
        return (
            f"A and B are the same on the target prompts: the JS between them is "
            f"{s.distance[0] / effect:.1%} of their effect, and no harm probe tells them apart"
        )
    return f"{_strength(s)}, {_direction(s)}, and {_forgetting(c.harm)}"


def _strength(s: Shift) -> str:
    if s.strength is None:
        return "A does not move the target prompts, so B's strength has no reference"
    r, low, high = s.strength
    shown = f"{_times(r)} A's effect [{_times(low)}–{_times(high)}]"
    if low > 1:
        return f"B is stronger on the target prompts ({shown})"
    if high < 1:
        return f"B is weaker on the target prompts ({shown})"
    return f"B is about as strong as A on the target prompts ({shown})"


def _times(x: float) -> str:
    return f"{x:.0f}×" if x >= 100 else f"{x:.2g}×"


def _direction(s: Shift) -> str:
    if s.elsewhere is None:
        return "in no direction (B does not move the target prompts)"
    off, lam = s.elsewhere[0], s.along[0]
    further = " or more (the path's end)" if s.path and lam >= max(s.path) else ""
    where = f"closest to A scaled by {lam:g}{further}; {off:.0%} of B's effect off A's path"
    if off <= SAME_DIRECTION:
        return f"in the same direction as A ({where})"
    if off <= PARTLY:
        return f"partly in A's direction ({where})"
    return f"elsewhere than A ({where})"


def _forgetting(harm: Sequence[HarmRow]) -> str:
    if not harm:
        return "no harm probe to compare what they forget"
    more = [h.name for h in harm if h.says == "more"]
    less = [h.name for h in harm if h.says == "less"]
    if more and less:
        return f"forgets more on {', '.join(more)} and less on {', '.join(less)}"
    if more:
        return f"forgets more ({', '.join(more)})"
    if less:
        return f"forgets less ({', '.join(less)})"
    return "forgets about as much (no harm probe tells them apart)"
