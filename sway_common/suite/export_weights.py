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

**What storage alone does.** Storing a weight (a float dtype, MLX affine codes, a GGUF
type, bitsandbytes nf4/fp4/int8) changes it, and re-quantizing a base whose weights already sit on the grid (a
4-bit base, fused and re-quantized) can round a light delta away. Two numbers say how
much, each stored the way the export stores that module
(:meth:`~sway_common.weight_reader.Storage.requantize`: mlx's own affine recipe,
gguf's quantizers, bitsandbytes' own, or rounding to the dtype) and measured like the export:

- **faithful** ``e``: the share that ``W_B + ΔW`` keeps once stored: what a correct
  export in this format carries of this very delta;
- the **noise floor** ``f ± σ``: the off-delta of the run's first null deltas (at most
  :data:`~sway_common.suite.export_math.FLOOR_DRAWS`), random in
  direction and of the adapter's norm per module
  (:func:`~sway_common.backend.nulls.null_factors`, ``norm_matched``: the nulls the
  forward check calibrates with), stored the same way: the changes of its own that
  storing puts on any delta of this size, in units of its norm (re-quantizing the
  already-quantized base alone is nearly idempotent, so that is no floor).

**The rule.** The share decides; the floor only says what the export's own changes
are. A share in ``[min_share, 1/min_share]`` (0.8 .. 1.25 by default) PASSES, with its
off-delta read against the floor (within it: the format's noise; above it: the export
adds changes of its own). A share outside it FAILS, whatever the format: an export
that lost the delta does not behave like the fine-tune, even where the format is to
blame. When a faithful export in this format would keep no more (``e`` short of
``min_share`` too), the line says the format rounds a delta this small away and what
keeps it (fuse with ``--dequantize``, or more bits). A module *lost* its delta when its
own share is < 0.5; a FAIL names those modules. Otherwise a FAIL names the likely
cause: nothing carried (the base passed off as the export), an overshoot (merged
twice), or a partial share (the wrong scale when the cosine is high, else a lossy
conversion). A GGUF type numpy cannot re-quantize (the k-quants) has no faithful share
and no floor (llama.cpp's quantizer would be needed: out of scope).
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
from sway_common.suite.export_math import FLOOR_DRAWS
from sway_common.types import ProbeResult, Verdict
from sway_common.weight_reader import Storage, WeightReadError, WeightSource

NAME = "weight_delta"
LOST_BELOW = 0.5
SPREAD = 2.0
"""The noise floor's upper bound: its mean plus this many standard deviations over nulls."""
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
    """Mean off-delta (in units of their norm) of the null deltas stored the same way."""
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
    floor_values: list[float] = field(default_factory=list)
    """Each null's pooled off-delta."""

    @property
    def lost(self) -> list[str]:
        return [m.name for m in self.modules if m.lost]

    @property
    def floor_upper(self) -> float:
        return self.floor + SPREAD * self.floor_spread


def holds(share: float, min_share: float) -> bool:
    """The rule for one share (a module's or the overall one); see the module docstring."""
    return min_share <= share <= 1.0 / min_share


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
    ⟨stored ΔW, ΔW⟩ and each null's off-delta² once stored (None / empty: no
    re-quantizer; the nulls have the norm of ΔW, so ‖ΔW‖² is theirs too)."""

    dot: float
    ww: float
    ee: float
    off2: float
    faithful_dot: float | None = None
    null_off2: list[float] = field(default_factory=list)


def _stored(storage: Storage, w_b: F64, delta: F64) -> tuple[float, float]:
    """(⟨ΔS, delta⟩, ‖ΔS − s·delta‖²) where ΔS is what storing ``w_b + delta`` like the
    export leaves of ``delta`` and ``s`` its share."""
    stored = storage.requantize(w_b + delta).astype(np.float64) - w_b
    dot, dd = float(np.sum(stored * delta)), float(np.sum(delta * delta))
    off = stored - (dot / dd if dd > _TINY else 0.0) * delta
    return dot, float(np.sum(off * off))


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
        sums.faithful_dot = _stored(storage, w_b, dw)[0]
        norm = math.sqrt(ww)
        sums.null_off2 = [_stored(storage, w_b, _null_delta(m, f[name], norm))[1] for f in nulls]
    except NotImplementedError:  # a format numpy cannot redo (GGUF k-quants)
        sums.faithful_dot, sums.null_off2 = None, []
    return sums, storage


def _spread(shares: F64) -> tuple[float, float]:
    """(mean, standard deviation) of the null shares; NaN for both without a floor."""
    if shares.size == 0:
        return math.nan, math.nan
    return float(shares.mean()), float(shares.std(ddof=1)) if shares.size > 1 else 0.0


def _survival(name: str, s: _Sums, storage: Storage, min_share: float) -> ModuleSurvival:
    retained = s.dot / s.ww
    faithful = math.nan if s.faithful_dot is None else s.faithful_dot / s.ww
    floor, spread = _spread(np.sqrt(np.asarray(s.null_off2, dtype=np.float64) / s.ww))
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
        lost=retained < LOST_BELOW and not holds(retained, min_share),
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
    specs = NullCalibration(runs=runs).specs()[:FLOOR_DRAWS]
    nulls = [null_factors(adapter.modules, spec) for spec in specs]
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
    return _judge(modules, sums, len(nulls), min_share)


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
        shares = np.sqrt(np.sum([s.null_off2 for s in sums], axis=0) / ww)
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
        floor_values=[float(x) for x in shares],
    )
    passed, message = verdict_line(check)
    return replace(check, passed=passed, message=message)


def _carries(m: ModuleSurvival, min_share: float) -> bool:
    """A module that clearly carries its delta: it passes, with at least half of it."""
    return m.retained >= LOST_BELOW and holds(m.retained, min_share)


def _names(names: list[str], most: int = 3) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" (+{len(names) - most} more)" if len(names) > most else "")


def _noise(c: WeightCheck) -> str:
    """The export's own changes read against the noise floor ("" when negligible)."""
    if c.off_delta < NOISY:
        return ""
    if math.isnan(c.floor):
        return f"; it adds changes of its own {c.off_delta:.2g}×"
    floor = f"storing a random delta of this size {c.storage} does {c.floor:.3g}× ± {c.floor_spread:.1g}"
    if c.off_delta <= c.floor_upper:
        return f"; its own changes, {c.off_delta:.2g}× the delta's size, are the format's ({floor})"
    return f"; it adds changes of its own {c.off_delta:.3g}× the delta's size, beyond the noise floor ({floor})"


def _format_limit(c: WeightCheck) -> str:
    """Why a short share may be the format's, and what keeps the delta ("" when not)."""
    if math.isnan(c.faithful):
        return f" (numpy cannot re-quantize {c.storage}: no faithful share to compare)"
    if c.faithful >= c.min_share:
        return f" (a faithful {c.storage} export keeps {c.faithful:.0%} of it)"
    return (
        f": storing it {c.storage} rounds a delta this small away (a faithful export in this "
        f"format keeps only {c.faithful:.0%}); fuse with --dequantize, or keep more bits"
    )


def verdict_line(c: WeightCheck) -> tuple[bool, str]:
    """(passed, the one line that says what the export's weights did with ΔW)."""
    share, most, modules = c.retained, 1.0 / c.min_share, c.modules
    lost = f"{len(c.lost)} of {len(modules)} adapted modules lost their delta ({_names(c.lost)})"
    if c.lost and any(_carries(m, c.min_share) for m in modules):
        return False, (
            f"{lost} in the export's weights; {share:.0%} retained overall: a fuse that "
            "skipped them?"
        )
    if holds(share, c.min_share):
        return True, (
            f"the export's weights carry the adapter's delta: {share:.0%} retained over "
            f"{len(modules)} modules (cosine {c.cosine:.2f}){_noise(c)}"
        )
    where = f"; {lost}" if c.lost else ""
    if abs(share) < 0.1:
        why = "the base passed off as the export, or a fuse without the adapter?"
        if c.faithful < c.min_share:  # False for NaN (no faithful share)
            why = f"the base passed off as the export? Or{_format_limit(c)[1:]}"
        return False, (
            f"the export's weights do not carry the adapter's delta: {share:.0%} retained"
            f"{where}: {why}"
        )
    if share > most:
        return False, (
            f"the export's weights carry {share:.0%} of the adapter's delta, at most "
            f"{most:.0%}: merged twice, or at the wrong scale?"
        )
    if not math.isnan(c.faithful) and c.faithful < c.min_share:
        return False, (
            f"the export's weights keep only {share:.0%} of the adapter's delta{where}"
            f"{_format_limit(c)}"
        )
    cause = "merged at the wrong scale?" if c.cosine >= 0.9 else "a lossy conversion?"
    return False, (
        f"the export's weights keep only {share:.0%} of the adapter's delta, at least "
        f"{c.min_share:.0%} expected{where}{_format_limit(c)}: {cause}"
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
            "floor_upper": check.floor_upper,
            "floor_values": check.floor_values,
            "runs": check.runs,
            "storage": check.storage,
            "min_share": check.min_share,
            "lost": check.lost,
            "modules": [asdict(m) for m in check.modules],
        },
    )
