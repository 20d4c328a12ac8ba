"""export-check's weight-space check: does the export's weight carry the adapter's ΔW?

No forward pass. For each adapted module, with ``W_B`` the base model's weight and
``W_E`` the export's (both dequantized, float64):

- ``ΔE = W_E − W_B``, what the export changed; ``ΔW`` the adapter's delta
  (LoRA ``scale · B·A``; DoRA the merged weight minus ``W_B``);
- **retained** ``s = ⟨ΔE, ΔW⟩ / ‖ΔW‖²``: the share of ΔW the export carries (1 a faithful
  fuse, 0 the base, 0.5 a merge at half scale, 2 a merge done twice);
- **cosine** ``⟨ΔE, ΔW⟩ / (‖ΔE‖·‖ΔW‖)`` and **off-delta** ``‖ΔE − s·ΔW‖ / ‖ΔW‖``: what the
  export changed that is not the adapter (rounding, quantization), in units of ‖ΔW‖.

Overall, each sum is pooled over modules, so the share is the ‖ΔW‖²-weighted mean.

**What storage alone keeps.** Storing a weight (a float dtype, MLX affine codes, a GGUF
type) changes it, and re-quantizing a base whose weights already sit on the grid (a
4-bit base, fused and re-quantized) can round a light delta away. Two numbers say how
much, each stored the way the export stores that module
(:meth:`~sway_common.weight_reader.Storage.requantize`: mlx's own affine recipe,
gguf's quantizers, or rounding to the dtype) and measured like the export:

- **faithful** ``e``: the share that ``W_B + ΔW`` keeps once stored: what a correct
  export in this format carries of this very delta;
- the **floor** ``f ± σ``: the same for ``runs`` null deltas, random in direction and of
  the adapter's norm per module (:func:`~sway_common.backend.nulls.null_factors`,
  ``norm_matched``: the nulls the forward check calibrates with); ``σ`` (standard
  deviation over draws) is how much the share moves with the delta's direction alone.
  The faithful share is the yardstick (it is what a correct export stores, whatever
  the delta's shape), with the floor's spread as its tolerance; the floor says how
  much of any delta of this size the format resolves (on the tiny test model, a 4-bit
  base and 1% of its trained delta: 9% faithful, a floor of 11% ± 0.3%).

**The rule.** With ``band = 3·max(σ, 0.01)``, a share PASSES when it is in
``[min_share, 1/min_share]`` (0.8 .. 1.25 by default; the message says "carry"), or at
least ``e − band`` and at most ``max(1/min_share, e + band)`` (the message says the
export keeps as much as its format allows: the loss is the format's, not the export's).
A module *lost* its delta when its own share is < 0.5 and fails its own test; when some
modules lost it while others carry theirs (pass, with ≥ 0.5: a fuse that skipped
modules), FAIL naming them, whatever the overall share. Otherwise the overall share decides; a FAIL names the
likely cause: nothing carried (the base passed off as the export), an overshoot (merged
twice), or a partial share (the wrong scale when the cosine is high, else a lossy
conversion). A GGUF type numpy cannot re-quantize (the k-quants) has no faithful share
and no floor: the share alone decides, against ``min_share``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from sway_common.adapters import AdapterWeights, LoraModule
from sway_common.backend.nulls import NullFactors, null_factors
from sway_common.probes.context import NullCalibration
from sway_common.types import ProbeResult, Verdict
from sway_common.weight_reader import Storage, WeightReadError, WeightSource

NAME = "weight_delta"
LOST_BELOW = 0.5
BAND = 3.0
MIN_SPREAD = 0.01
NOISY = 0.25
"""An off-delta this large (in units of ‖ΔW‖, export-check's default --max-residual) is
said in a passing line: the export carries ΔW but adds changes of its own (quantization)."""
_TINY = 1e-30

F64 = NDArray[np.float64]


@dataclass(frozen=True)
class ModuleSurvival:
    """One adapted module: how much of its ΔW the export's weight carries."""

    name: str
    retained: float
    cosine: float
    off_delta: float
    delta_norm: float
    faithful: float
    """The share ``W_B + ΔW`` keeps when stored like the export stores this module."""
    floor: float
    """Mean share of the null deltas stored the same way."""
    floor_spread: float
    storage: str
    lost: bool = False


@dataclass(frozen=True)
class WeightCheck:
    """The weight-space verdict over all adapted modules."""

    modules: list[ModuleSurvival]
    retained: float
    cosine: float
    off_delta: float
    faithful: float
    floor: float
    floor_spread: float
    runs: int
    storage: str
    min_share: float
    passed: bool = False
    message: str = ""
    floor_shares: list[float] = field(default_factory=list)

    @property
    def lost(self) -> list[str]:
        return [m.name for m in self.modules if m.lost]

    @property
    def band(self) -> float:
        return BAND * max(self.floor_spread, MIN_SPREAD)


def holds(share: float, faithful: float, spread: float, min_share: float) -> bool:
    """The rule for one share (a module's or the overall one); see the module docstring."""
    if min_share <= share <= 1.0 / min_share:
        return True
    if math.isnan(faithful):
        return False
    band = BAND * max(spread, MIN_SPREAD)
    return faithful - band <= share <= max(1.0 / min_share, faithful + band)


def _adapter_delta(m: LoraModule, w_base: F64) -> F64:
    """ΔW in float64: ``scale·B·A``; for DoRA, the merged weight minus the base."""
    delta = m.scale * (m.b.astype(np.float64) @ m.a.astype(np.float64))
    if m.magnitude is None:
        return delta
    w = w_base + delta
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    return (m.magnitude.astype(np.float64)[:, None] / np.maximum(norms, _TINY)) * w - w_base


def _null_delta(m: LoraModule, factors: NullFactors, norm: float) -> F64:
    a, b = factors
    d = m.scale * (b.astype(np.float64) @ a.astype(np.float64))
    drawn = float(np.linalg.norm(d))
    return d * (norm / drawn) if drawn > 0 else d


def _read_pair(
    name: str, m: LoraModule, base: WeightSource, export: WeightSource
) -> tuple[F64, F64, Storage]:
    w_b, _ = base.module_weight(name, m.shape)
    if w_b.shape != m.shape:
        raise WeightReadError(
            f"the base model's {name} is {w_b.shape}, the adapter's {m.shape}: the adapter "
            "belongs to another base model"
        )
    w_e, storage = export.module_weight(name, w_b.shape)
    if w_e.shape != w_b.shape:
        raise WeightReadError(f"the export's {name} is {w_e.shape}, the base model's {w_b.shape}")
    return w_b.astype(np.float64), w_e.astype(np.float64), storage


@dataclass
class _Sums:
    """One module's inner products, pooled later: ⟨ΔE,ΔW⟩, ‖ΔW‖², ‖ΔE‖², ‖ΔE − sΔW‖²,
    ⟨stored ΔW, ΔW⟩ and each null's ⟨stored ΔN, ΔN⟩ (None / empty: no re-quantizer)."""

    dot: float
    ww: float
    ee: float
    off2: float
    faithful_dot: float | None = None
    null_dots: list[float] = field(default_factory=list)


def _stored_dot(storage: Storage, w_b: F64, delta: F64) -> float:
    """⟨ΔS, delta⟩ where ΔS is what storing ``w_b + delta`` like the export changes."""
    stored = storage.requantize(w_b + delta).astype(np.float64) - w_b
    return float(np.sum(stored * delta))


def _measure(
    name: str, m: LoraModule, base: WeightSource, export: WeightSource, nulls: list[Any]
) -> tuple[_Sums, Storage]:
    w_b, w_e, storage = _read_pair(name, m, base, export)
    dw = _adapter_delta(m, w_b)
    de = w_e - w_b
    ww, dot = float(np.sum(dw * dw)), float(np.sum(de * dw))
    off = de - (dot / ww if ww > _TINY else 0.0) * dw
    sums = _Sums(dot, ww, float(np.sum(de * de)), float(np.sum(off * off)))
    if ww <= _TINY:
        return sums, storage
    try:
        sums.faithful_dot = _stored_dot(storage, w_b, dw)
        norm = math.sqrt(ww)
        sums.null_dots = [_stored_dot(storage, w_b, _null_delta(m, f[name], norm)) for f in nulls]
    except NotImplementedError:  # a format numpy cannot redo (GGUF k-quants)
        sums.faithful_dot, sums.null_dots = None, []
    return sums, storage


def _spread(shares: F64) -> tuple[float, float]:
    """(mean, standard deviation) of the null shares; NaN for both without a floor."""
    if shares.size == 0:
        return math.nan, math.nan
    return float(shares.mean()), float(shares.std(ddof=1)) if shares.size > 1 else 0.0


def _survival(name: str, s: _Sums, storage: Storage, min_share: float) -> ModuleSurvival:
    retained = s.dot / s.ww
    faithful = math.nan if s.faithful_dot is None else s.faithful_dot / s.ww
    floor, spread = _spread(np.asarray(s.null_dots, dtype=np.float64) / s.ww)
    return ModuleSurvival(
        name=name,
        retained=retained,
        cosine=s.dot / max(math.sqrt(s.ee * s.ww), _TINY),
        off_delta=math.sqrt(s.off2 / s.ww),
        delta_norm=math.sqrt(s.ww),
        faithful=faithful,
        floor=floor,
        floor_spread=spread,
        storage=storage.describe(),
        lost=retained < LOST_BELOW and not holds(retained, faithful, spread, min_share),
    )


def check_weights(
    adapter: AdapterWeights,
    base: WeightSource,
    export: WeightSource,
    *,
    runs: int = 8,
    min_share: float = 0.8,
) -> WeightCheck:
    """Measure how much of the adapter's ΔW the export's weights carry, and judge it.

    Raises :class:`WeightReadError` for weights that cannot be read or compared, and
    when the adapter changes no weight (ΔW = 0 everywhere: nothing to carry).
    """
    nulls = [null_factors(adapter.modules, spec) for spec in NullCalibration(runs=runs).specs()]
    sums: list[_Sums] = []
    modules: list[ModuleSurvival] = []
    for name in sorted(adapter.modules):
        s, storage = _measure(name, adapter.modules[name], base, export, nulls)
        if s.ww <= _TINY:
            continue  # an untrained module (B = 0): nothing to carry
        sums.append(s)
        modules.append(_survival(name, s, storage, min_share))
    if not sums:
        raise WeightReadError(
            "the adapter changes no weight (ΔW = 0 in every module): nothing for an export "
            "to keep; check the adapter path"
        )
    return _judge(modules, sums, runs, min_share)


def _judge(
    modules: list[ModuleSurvival], sums: list[_Sums], runs: int, min_share: float
) -> WeightCheck:
    ww = sum(s.ww for s in sums)
    dot = sum(s.dot for s in sums)
    faithful_dots = [s.faithful_dot for s in sums]
    faithful = math.nan
    shares = np.zeros(0)
    if all(d is not None for d in faithful_dots):
        faithful = sum(d for d in faithful_dots if d is not None) / ww
        shares = np.sum([s.null_dots for s in sums], axis=0) / ww
    floor, spread = _spread(shares)
    kinds = sorted({m.storage for m in modules})
    check = WeightCheck(
        modules=modules,
        retained=dot / ww,
        cosine=dot / max(math.sqrt(sum(s.ee for s in sums) * ww), _TINY),
        off_delta=math.sqrt(sum(s.off2 for s in sums) / ww),
        faithful=faithful,
        floor=floor,
        floor_spread=spread,
        runs=runs,
        storage=kinds[0] if len(kinds) == 1 else "mixed " + "/".join(kinds),
        min_share=min_share,
        floor_shares=[float(x) for x in shares],
    )
    passed, message = verdict_line(check)
    return replace(check, passed=passed, message=message)


def _carries(m: ModuleSurvival, min_share: float) -> bool:
    """A module that clearly carries its delta: it passes, with at least half of it."""
    return m.retained >= LOST_BELOW and holds(m.retained, m.faithful, m.floor_spread, min_share)


def _names(names: list[str], most: int = 3) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" (+{len(names) - most} more)" if len(names) > most else "")


def _yardstick(c: WeightCheck) -> str:
    """What storage alone keeps, in words (the faithful share, the random floor)."""
    if math.isnan(c.faithful):
        return f"numpy cannot re-quantize {c.storage}: no floor"
    return (
        f"a faithful {c.storage} export keeps {c.faithful:.0%} of it, "
        f"{c.floor:.0%} ± {c.floor_spread:.0%} of a random delta this size"
    )


def verdict_line(c: WeightCheck) -> tuple[bool, str]:
    """(passed, the one line that says what the export's weights did with ΔW)."""
    share, most, modules = c.retained, 1.0 / c.min_share, c.modules
    if c.lost and any(_carries(m, c.min_share) for m in modules):
        return False, (
            f"{len(c.lost)} of {len(modules)} adapted modules lost their delta in the "
            f"export's weights ({_names(c.lost)}; {share:.0%} retained overall): a fuse "
            "that skipped them?"
        )
    if c.min_share <= share <= most:
        noise = ""
        if c.off_delta >= NOISY:
            noise = (
                f"; in these weights it adds changes of its own {c.off_delta:.2g}× the delta's size"
            )
        return True, (
            f"the export's weights carry the adapter's delta: {share:.0%} retained over "
            f"{len(modules)} modules (cosine {c.cosine:.2f}){noise}"
        )
    if holds(share, c.faithful, c.floor_spread, c.min_share):
        return True, (
            f"the export's weights keep {share:.0%} of the adapter's delta, as much as its "
            f"format allows ({_yardstick(c)}): the loss is the format's, not the export's"
        )
    if abs(share) < 0.1:
        return False, (
            f"the export's weights do not carry the adapter's delta: {share:.0%} retained "
            f"({_yardstick(c)}): the base passed off as the export, or a fuse without the "
            "adapter?"
        )
    if share > most:
        return False, (
            f"the export's weights carry {share:.0%} of the adapter's delta, at most "
            f"{most:.0%}: merged twice, or at the wrong scale?"
        )
    cause = "merged at the wrong scale?" if c.cosine >= 0.9 else "a lossy conversion?"
    return False, (
        f"the export's weights keep only {share:.0%} of the adapter's delta, at least "
        f"{c.min_share:.0%} expected ({_yardstick(c)}): {cause}"
    )


def weight_result(check: WeightCheck, *, gating: bool = True) -> ProbeResult:
    """The check as a probe result (category ``export``), for every report writer."""
    score = check.retained if check.retained <= 1.0 else 1.0 / check.retained
    return ProbeResult(
        name=NAME,
        kind=NAME,
        verdict=Verdict.PASS if check.passed else Verdict.FAIL,
        category="export",
        score=float(min(max(score, 0.0), 1.0)) if gating else None,
        raw=check.retained,
        message=check.message,
        gating=gating,
        evidence={
            "retained": check.retained,
            "cosine": check.cosine,
            "off_delta": check.off_delta,
            "faithful": check.faithful,
            "floor": check.floor,
            "floor_spread": check.floor_spread,
            "band": check.band,
            "floor_shares": check.floor_shares,
            "runs": check.runs,
            "storage": check.storage,
            "min_share": check.min_share,
            "lost": check.lost,
            "modules": [asdict(m) for m in check.modules],
        },
    )
