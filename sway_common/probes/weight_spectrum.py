"""weight_spectrum: what kind of change the adapter made to its base's weights, and where.

No forward pass: per adapted module, from the LoRA factors and the base weight's cached
top-k SVD (:mod:`sway_common.spectrum`), the update's size relative to ``W``
(Frobenius and spectral), its stable and entropy-effective ranks, the rank holding 90%
of its energy, how much of it lies in ``W``'s top-k singular directions (output and
input side), and its intruder dimensions (Shuttleworth et al. 2024: top singular
vectors of ``W + ΔW`` with no close counterpart among ``W``'s, which track forgetting).

Each figure, per module and pooled over the adapter, is set against the same seeded null
adapters every calibrated probe uses, in both modes: ``fixed`` (factors at the init
scale) and ``norm_matched`` (each module's ΔW at the adapter's norm, which fixes
``rel_fro``: no z there). A trained adapter's update is low-rank and shaped; a random one
of its norm is spread over all r directions, so the ranks tell them apart.

Modules *stand out* when their ``‖ΔW‖/‖W‖`` is far from the adapter's other modules'
(robust z of its log, median and MAD over modules, beyond ``standout_z``), when their ΔW
is zero, or when they have more intruder dimensions than every null draw of their norm.

It never gates and adds nothing to the score: PASS says it measured (its claim is
nothing), SKIP that there are no base weights to read (a backend not loaded from a
model dir, a weight format the reader refuses).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from sway_common.adapters.weights import AdapterWeights, split_layer_name
from sway_common.backend.nulls import NullSpec
from sway_common.protocols import DescribedBackend
from sway_common.spectrum.base import BaseSpectra, SketchSettings
from sway_common.spectrum.figures import (
    MODES,
    FigureOptions,
    Figures,
    ModuleFigures,
    adapter_figures,
    against_nulls,
    null_figures,
    pooled,
)
from sway_common.spectrum.svd import FIGURES
from sway_common.stats import format_z
from sway_common.types import ProbeResult, Verdict
from sway_common.weight_reader import WeightReadError

from .base import Probe, ProbeConfig, RunContext, register
from .context import NullCalibration

# Robust z: 0.6745·(x − median)/MAD is a standard normal's z for normal data.
MAD_TO_Z = 0.6745
SHOWN_STANDOUTS = 4
LABELS = {
    "rel_fro": "‖ΔW‖_F/‖W‖_F",
    "rel_spec": "‖ΔW‖₂/‖W‖₂",
    "stable_rank": "stable rank",
    "eff_rank": "effective rank",
    "rank90": "rank for 90% energy",
    "align_out": "share in W's top output directions",
    "align_in": "share in W's top input directions",
    "intruders": "intruder dims",
}


@dataclass
class WeightSpectrumConfig(ProbeConfig):
    top_k: int = 32
    """``W``'s top singular directions kept (randomized SVD, cached per base)."""
    top_n: int = 10
    """Top singular vectors of ``W + ΔW`` checked for intruders."""
    intruder_cos: float = 0.5
    """An intruder has |cos| below this with every one of ``W``'s top-k vectors."""
    standout_z: float = 3.5
    """Robust z (over modules) of log ‖ΔW‖/‖W‖ beyond which a module stands out."""
    runs: int | None = None
    """Null draws; None: the suite's null calibration's (its seeds and init scale)."""


@register
class WeightSpectrumProbe(Probe):
    kind = "weight_spectrum"
    claim = "nothing: it reports where the adapter changed its base's weights and how (ranks, alignment, intruder dimensions) against random adapters of its shape, with no forward pass"
    category = "diagnostic"
    gating = False
    Config = WeightSpectrumConfig

    def check(self, cfg: WeightSpectrumConfig) -> list[str]:
        problems = super().check(cfg)
        if cfg.top_k < 1 or cfg.top_n < 1:
            problems.append("top_k, top_n: must be >= 1")
        elif cfg.top_n > cfg.top_k:
            problems.append("top_n: must be <= top_k (W's vectors the intruders are sought among)")
        if not 0 < cfg.intruder_cos < 1:
            problems.append("intruder_cos: must lie strictly between 0 and 1")
        if not cfg.standout_z > 0:
            problems.append("standout_z: must be > 0")
        if cfg.runs is not None and cfg.runs < 2:
            problems.append("runs: needs at least 2 null draws to estimate a spread")
        return problems

    def run(self, cfg: WeightSpectrumConfig, ctx: RunContext) -> ProbeResult:
        start = time.perf_counter()
        source = _source(ctx.backend)
        if isinstance(source, str):
            return self.result(cfg, Verdict.SKIP, message=source)
        weights, model_dir = source
        cache = ctx.null_cache.root if ctx.null_cache is not None else None
        spectra = BaseSpectra(model_dir, cache, SketchSettings(top_k=cfg.top_k))
        modules = weights.modules
        try:
            bases = {}
            for i, (name, m) in enumerate(sorted(modules.items())):
                if spectra.computed and i % 16 == 0:
                    ctx.progress(f"base spectra {i}/{len(modules)}")
                bases[name] = spectra.get(name, m.shape)
        except WeightReadError as e:
            first = (str(e).strip().splitlines() or ["unreadable"])[0]
            return self.result(cfg, Verdict.SKIP, message=f"no base weights to compare: {first}")
        opts = FigureOptions(cfg.top_n, cfg.intruder_cos)
        real = adapter_figures(modules, bases, opts)
        calibration = ctx.null or NullCalibration()
        runs = cfg.runs or calibration.runs
        specs = [NullSpec(calibration.seed_base + i, calibration.init_scale) for i in range(runs)]
        key = ["weight_spectrum", cfg.top_k, cfg.top_n, cfg.intruder_cos, spectra.settings.key("")]
        nulls = [
            _cached(ctx, spec, key, partial(null_figures, modules, bases, spec, opts))
            for spec in specs
        ]
        base_fro = {n: b.fro for n, b in bases.items()}
        report = _report(real, nulls, base_fro, weights, cfg)
        report.update(
            runs=runs,
            init_scale=calibration.init_scale,
            top_k=cfg.top_k,
            top_n=cfg.top_n,
            intruder_cos=cfg.intruder_cos,
            base_svds_computed=spectra.computed,
            seconds=time.perf_counter() - start,
        )
        adapter = report["adapter"]
        return self.result(
            cfg,
            Verdict.PASS if adapter["figures"] else Verdict.SKIP,
            raw=adapter["figures"]["rel_fro"] if adapter["figures"] else None,
            message=_message(report, len(modules)),
            evidence=report,
        )


def _source(backend: object) -> tuple[AdapterWeights, Path] | str:
    """The loaded adapter and the model dir its base weights are read from, or why not."""
    weights = getattr(backend, "adapter_weights", None)
    if not isinstance(weights, AdapterWeights):
        return "no adapter is loaded: nothing to measure"
    info = backend.info if isinstance(backend, DescribedBackend) else {}
    model_dir = info.get("model_dir")
    if not model_dir or not Path(str(model_dir)).is_dir():
        return "the backend was not loaded from a model dir: no base weights to read"
    return weights, Path(str(model_dir))


def _cached(
    ctx: RunContext, spec: NullSpec, key: list[Any], compute: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """One null draw's figures in both modes, from the null cache when a run on the same
    model and settings kept them: each mode under its own draw's key (a ``fixed`` draw
    does not depend on the trained values, a ``norm_matched`` one does)."""
    info = dict(ctx.backend.info) if isinstance(ctx.backend, DescribedBackend) else {}
    cache = ctx.null_cache
    names = {
        mode: cache.key(info, replace(spec, mode=mode).draw(), key) if cache else None
        for mode in MODES
    }
    found: dict[str, Any] = {
        mode: cache.get(name) if cache and name else None for mode, name in names.items()
    }
    if all(isinstance(v, dict) for v in found.values()):
        return found
    ctx.progress(f"null seed {spec.seed}")
    value = compute()
    for mode, name in names.items():
        if cache is not None and name:
            cache.put(name, value[mode])
    return value


def _report(
    real: ModuleFigures,
    nulls: list[dict[str, Any]],
    base_fro: dict[str, float],
    weights: AdapterWeights,
    cfg: WeightSpectrumConfig,
) -> dict[str, Any]:
    """The evidence: the adapter's pooled figures and every module's, against the nulls."""
    pooled_nulls: dict[str, list[Figures | None]] = {
        mode: [pooled(n[mode], base_fro) for n in nulls] for mode in MODES
    }
    mine = pooled(real, base_fro)
    outliers = standouts(real, nulls, cfg.standout_z)
    rows = []
    for name in sorted(real, key=_layer_order):
        _prefix, layer, kind = split_layer_name(name)
        per_null: dict[str, list[Figures | None]] = {
            mode: [n[mode].get(name) for n in nulls] for mode in MODES
        }
        compared = against_nulls(real[name], per_null)
        rows.append(
            {
                "module": name,
                "layer": layer,
                "type": kind,
                "rank": weights.modules[name].rank,
                "figures": real[name],
                "z": {m: {f: c["z"] for f, c in compared[m].items()} for m in compared},
                "stands_out": outliers.get(name, []),
            }
        )
    return {
        "figure_names": list(FIGURES),
        "adapter": {"figures": mine, "nulls": against_nulls(mine, pooled_nulls)},
        "modules": rows,
        "standouts": [{"module": n, "reasons": r} for n, r in outliers.items()],
        "dora": weights.dora,
    }


def _layer_order(name: str) -> tuple[int, str]:
    _prefix, layer, kind = split_layer_name(name)
    return (-1 if layer is None else layer, kind)


def standouts(
    real: ModuleFigures, nulls: list[dict[str, Any]], threshold: float
) -> dict[str, list[str]]:
    """Why each module that stands out does, by module (in layer order)."""
    out: dict[str, list[str]] = {}
    live = {n: f for n, f in real.items() if f is not None}
    logs = {n: math.log(f["rel_fro"]) for n, f in live.items() if 0 < f["rel_fro"] < math.inf}
    if len(logs) >= 3:
        med = float(np.median(list(logs.values())))
        mad = float(np.median([abs(v - med) for v in logs.values()]))
        for name, v in logs.items():
            z = MAD_TO_Z * (v - med) / mad if mad > 0 else 0.0
            if abs(z) >= threshold:
                size = "large" if z > 0 else "small"
                out.setdefault(name, []).append(
                    f"{size} update: {math.exp(v - med):.2g}× the median module's ‖ΔW‖/‖W‖"
                )
    for name, f in sorted(real.items(), key=lambda kv: _layer_order(kv[0])):
        if f is None:
            out.setdefault(name, []).append("ΔW = 0: trained to nothing")
            continue
        drawn = [n["norm_matched"].get(name) for n in nulls]
        most = max((d["intruders"] for d in drawn if d is not None), default=0.0)
        if f["intruders"] > most:
            out.setdefault(name, []).append(
                f"{f['intruders']:.0f} intruder dimension{'s' if f['intruders'] != 1 else ''} "
                f"(random updates of its norm: at most {most:.0f})"
            )
    return {n: out[n] for n in sorted(out, key=_layer_order)}


def _message(report: dict[str, Any], n_modules: int) -> str:
    """One line: the size, the figures furthest from random updates of the adapter's norm,
    the intruders, and the modules that stand out."""
    adapter = report["adapter"]
    mine = adapter["figures"]
    if mine is None:
        return f"every one of the {n_modules} modules has ΔW = 0: nothing to measure"
    matched = adapter["nulls"].get("norm_matched", {})
    size = mine["rel_fro"]
    shown = f"{100 * size:.2g}% of" if size < 1 else f"{size:.2g}×"
    parts = [f"{n_modules} modules, ‖ΔW‖_F {shown} ‖W‖_F"]
    scored = [(abs(c["z"]), f) for f, c in matched.items() if c["z"] is not None]
    for _, fig in sorted(scored, reverse=True)[:2]:
        c = matched[fig]
        parts.append(
            f"{LABELS[fig]} {mine[fig]:.3g} (random of its norm {c['mean']:.3g}, "
            f"z={format_z(c['z'], report['runs'])})"
        )
    if "intruders" not in [f for _, f in sorted(scored, reverse=True)[:2]]:
        parts.append(
            f"{mine['intruders']:.0f} intruder dims (random of its norm "
            f"{matched['intruders']['mean']:.2g})"
        )
    out = report["standouts"]
    if out:
        names = ", ".join(o["module"] for o in out[:SHOWN_STANDOUTS])
        more = f" (+{len(out) - SHOWN_STANDOUTS} more)" if len(out) > SHOWN_STANDOUTS else ""
        parts.append(f"stand out: {names}{more}")
    else:
        parts.append("no module stands out")
    if report["dora"]:
        parts.append("DoRA: the direction update only")
    return "; ".join(parts)
