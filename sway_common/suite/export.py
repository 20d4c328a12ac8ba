"""export-check: does an exported model (fused, merged, re-quantized, converted) still
carry the fine-tune that the live adapter gives?

Three models take part, two of them loaded: the differential backend holds the base and
the live adapter (base and fine-tune are views of one copy), and the export is a second
model, built without an adapter, of which only the base view is read. Per prompt:

1. next-token distributions of base, fine-tune and export → retention by projection and
   the residual split into lost effect and the export's own noise
   (:mod:`sway_common.suite.export_math` defines both precisely);
2. the fine-tune's own greedy completion of each prompt, scored by all three → the same
   retention on completion log-probs;
3. the adapter's effect against K norm-matched null adapters (the delta_kl judgement): a
   retention means something only if the adapter itself moves these prompts; the null
   mean is also the yardstick the residual is shown against.

The result is a :class:`SuiteResult`, so every report writer works unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any

import numpy as np

from sway_common import __version__
from sway_common.backend.model_views import ModelViews
from sway_common.divergence import divergence
from sway_common.null_cache import NullCache
from sway_common.probes.base import DivergenceConfig, judge_divergence
from sway_common.probes.context import NullCalibration, RunContext
from sway_common.probes.likelihood import logprobs_in
from sway_common.protocols import PreflightCheckable, ScoringModel
from sway_common.stats import format_z
from sway_common.suite.export_floor import Floor, FloorModels, floor_evidence, measure_floor
from sway_common.suite.export_kl import measure_kl
from sway_common.suite.export_math import (
    ExportCriteria,
    Retention,
    after_floor,
    format_multiple,
    logprob_retention,
    next_token_retention,
    score,
    what_happened,
)
from sway_common.suite.export_models import (
    ExportModel,
    check_same_tokens,
    peak_memory,
)
from sway_common.suite.runner import composite, overall_verdict, preflight, seed_everything
from sway_common.types import ProbeResult, SuiteResult, TokenDist, Verdict

CATEGORY = "export"


def _dists(
    opener: Callable[[], AbstractContextManager[ScoringModel]], prompts: Sequence[str], top_k: int
) -> list[TokenDist]:
    with opener() as view:
        return view.next_token_dist_batch(prompts, top_k=top_k)


def _logprobs(
    opener: Callable[[], AbstractContextManager[ScoringModel]],
    prompts: Sequence[str],
    completions: Sequence[str],
) -> list[float]:
    with opener() as view:
        return [float(x) for x in logprobs_in(view, prompts, completions)]


def _js(a: Sequence[TokenDist], b: Sequence[TokenDist]) -> list[float]:
    return [divergence(x, y, kind="js") for x, y in zip(a, b, strict=True)]


def _result(name: str, verdict: Verdict, message: str, **kw: Any) -> ProbeResult:
    return ProbeResult(
        name=name, kind=name, verdict=verdict, category=CATEGORY, message=message, gating=True, **kw
    )


def _retention_result(
    name: str,
    r: Retention,
    c: ExportCriteria,
    null_mean: float | None,
    evidence: dict[str, Any],
    floor: Floor | None = None,
) -> ProbeResult:
    unit = " nats mean JS" if name == "export_next_token" else " nats of log-prob"
    bounds = (floor.mean, floor.upper) if floor is not None else None
    kept = floor.kept_mean if floor is not None else None
    at = floor.at if floor is not None else "null"
    verdict, line = what_happened(r, c, bounds, unit, at, kept)
    judged = after_floor(r, kept)
    if null_mean and verdict is Verdict.PASS:
        line += f" ({format_multiple(r.residual_raw / null_mean)} what a random adapter of its size does)"
    evidence = {
        "retention": r.retention,
        "retention_interval": list(r.interval),
        "retention_after_floor": None if judged is r else judged.retention,
        "residual": r.residual,
        "lost": r.lost,
        "noise": r.noise,
        "effect": r.effect,
        "residual_raw": r.residual_raw,
        "residual_vs_null": r.residual_raw / null_mean if null_mean else None,
        "per_prompt_retention": r.per_prompt,
        "min_retention": c.min_retention,
        "max_residual": c.max_residual,
        "noise_floor": floor_evidence(floor),
        **evidence,
    }
    return _result(name, verdict, line, raw=r.retention, score=score(judged), evidence=evidence)


def _adapter_effect(
    prompts: Sequence[str], js_bf: list[float], ctx: RunContext, top_k: int, floor: float
) -> ProbeResult:
    """The adapter's own effect on these prompts, against its nulls for scale.

    Only the floor gates: a retention needs an effect to retain, not a learned direction
    (the export of any adapter should keep it). ERROR below the floor.
    """
    cfg = DivergenceConfig(name="adapter_effect", kind="delta_kl", prompts=list(prompts))
    raw = sum(js_bf) / len(js_bf)
    j, null = judge_divergence(cfg, ctx, "delta_kl", raw, js_bf, top_k, unit=" nats mean JS")
    versus = f", {j.ratio:.3g}× a random adapter of its size" if j.ratio is not None else ""
    if j.z is not None:
        versus += f" (z={format_z(j.z, null.n if null else None)})"
    verdict = Verdict.PASS
    message = f"the live adapter moves these prompts by {raw:.3g} nats mean JS{versus}"
    if j.verdict is not Verdict.PASS and null is not None:
        # Still measured: the export should keep whatever the adapter does. But said.
        verdict = Verdict.WARN
        message = (
            f"the live adapter itself does not beat its nulls: it moves these prompts by "
            f"{raw:.3g} nats mean JS{versus}, not clearly more than a random adapter of its "
            "size; the export's retention is of an effect that may not be learned"
        )
    if raw < floor:
        verdict = Verdict.ERROR
        message = (
            f"the live adapter barely moves these prompts ({raw:.2g} nats mean JS, "
            f"below {floor:g}): a retention would measure rounding; give --prompts "
            "about what it was trained on"
        )
    return ProbeResult(
        name="adapter_effect",
        kind="adapter_effect",
        verdict=verdict,
        category=CATEGORY,
        raw=raw,
        z=j.z,
        p_value=j.p,
        effect_ratio=j.ratio,
        null=null,
        message=message,
        gating=True,
        evidence={
            "per_prompt": js_bf,
            "prompts": list(prompts),
            "top_k": top_k,
            "min_effect": floor,
            "judgement": j.verdict.value,
        },
    )


def _headline(results: list[ProbeResult]) -> str:
    by_name = {r.name: r for r in results}
    failed = (Verdict.FAIL, Verdict.ERROR)
    bad = [r for r in results if r.gating and r.verdict in failed]
    if bad:
        first = bad[0]
        where = {"export_next_token": " (next tokens)", "export_completion": " (completions)"}
        line = first.message + where.get(first.name, "")
        # The weight check names the modules that lost the delta: worth the same line.
        weights = by_name.get("weight_delta")
        if weights is not None and weights.verdict in failed and first is not weights:
            line += f"; in the weights: {weights.message}"
        return line
    nt, comp = by_name.get("export_next_token"), by_name.get("export_completion")
    line = nt.message if nt is not None else "the export keeps the fine-tune"
    if comp is not None and comp.raw is not None and comp.verdict is Verdict.PASS:
        line += f"; {comp.raw:.0%} on its own completions"
        line += {
            "corrected": " once the noise floor is taken out",
            "included": ", noise included",
        }.get(comp.evidence.get("noise_in_retention", ""), "")
    # A non-gating check that failed (the weight check), or a gating one that warned,
    # is said, not hidden.
    for r in results:
        warned = r.gating and r.verdict is Verdict.WARN and r is not nt
        if (not r.gating and r.verdict in failed) or warned:
            line += f"; but {r.message}"
    return line


def _finish(
    results: list[ProbeResult],
    meta: dict[str, Any],
    criteria: ExportCriteria,
    started: float,
    *backends: Any,
    extra: Sequence[ProbeResult] = (),
) -> SuiteResult:
    results = [*extra, *results]
    score_, cats = composite(results)
    verdict = overall_verdict(results, score_, criteria.min_retention)
    meta.update(
        duration_s=round(time.time() - started, 3),
        memory=peak_memory(*backends),
        headline=_headline(results),
    )
    return SuiteResult(
        probes=results,
        verdict=verdict,
        score=score_,
        category_scores=cats,
        threshold=criteria.min_retention,
        meta=meta,
    )


def _export_broken(export: Any) -> ProbeResult | None:
    if not isinstance(export, PreflightCheckable):
        return None
    ok, reason = export.preflight_finite_check()
    if ok:
        return None
    return _result(
        "export_preflight",
        Verdict.FAIL,
        f"the exported model is broken: {reason.replace('base view ', '')}",
    )


def check_export(
    backend: ModelViews,
    export: ExportModel,
    prompts: Sequence[str],
    *,
    criteria: ExportCriteria | None = None,
    runs: int = 8,
    seed: int = 0,
    top_k: int = 256,
    max_new_tokens: int = 24,
    null_cache: NullCache | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
    meta: dict[str, Any] | None = None,
    extra: Sequence[ProbeResult] = (),
    floor: FloorModels | None = None,
) -> SuiteResult:
    """Measure how much of ``backend``'s fine-tune ``export`` keeps, on ``prompts``.

    ``extra``: results measured before (export-check's weight check), listed first.
    ``floor``: the noise floor's weights (:func:`~sway_common.suite.export_floor.floor_models`,
    drawn with this run's nulls), measured where the export is a loaded model.
    """
    criteria = criteria or ExportCriteria()
    started = time.time()
    meta = {
        "command": "export-check",
        "seed": seed,
        "sway_version": __version__,
        **backend.info,
        **(meta or {}),
    }
    prompts = list(prompts)
    progress("preflight")
    check_same_tokens(backend, export, prompts)
    failed = preflight(backend) or _export_broken(export)
    if failed is not None:
        return _finish([failed], meta, criteria, started, backend, export, extra=extra)
    seed_everything(seed)

    progress("next tokens: base and fine-tune")
    base_d = _dists(backend.as_base, prompts, top_k)
    ft_d = _dists(backend.as_finetuned, prompts, top_k)
    progress("next tokens: export")
    exp_d = _dists(export.as_base, prompts, top_k)
    js_bf, js_be, js_ef = _js(base_d, ft_d), _js(base_d, exp_d), _js(exp_d, ft_d)

    ctx = RunContext(
        backend=backend,
        seed=seed,
        top_k=top_k,
        null=NullCalibration(runs=runs),
        null_cache=null_cache,
        progress=progress,
    )
    effect = _adapter_effect(prompts, js_bf, ctx, top_k, criteria.min_effect)
    results = [effect]
    if effect.verdict is Verdict.ERROR:
        return _finish(results, meta, criteria, started, backend, export, extra=extra)
    null_mean = effect.null.mean if effect.null is not None else None
    progress(f"completions: the fine-tune writes {len(prompts)}")
    with backend.as_finetuned() as ft:
        completions = [ft.generate(p, max_new_tokens=max_new_tokens) for p in prompts]
    floors = None
    if floor is not None and not floor.missing and isinstance(export, ModelViews):
        progress(f"noise floor: {len(floor.specs)} random deltas stored the export's way")
        try:
            floors = measure_floor(backend, export, floor, prompts, completions, top_k)
        except ValueError as e:  # a layer this runtime cannot give other weights
            floor = replace(floor, missing=f"no noise floor: {e}")
    nt = next_token_retention(js_bf, js_be, js_ef, seed=seed)
    evidence = {"js_base_ft": js_bf, "js_base_export": js_be, "js_export_ft": js_ef}
    nt_result = _retention_result(
        "export_next_token",
        nt,
        criteria,
        null_mean,
        {**evidence, "top_k": top_k, "prompts": prompts},
        floors[0] if floors else None,
    )
    if floor is not None and floor.missing:
        nt_result.message += f" ({floor.missing})"
        nt_result.evidence["noise_floor_missing"] = floor.missing
    results.append(nt_result)
    results.append(
        _completion_result(backend, export, prompts, completions, criteria, seed, progress, floors)
    )
    stats = measure_kl(backend, export, prompts, completions, top_k, progress)
    if stats is not None:
        results.append(stats)
    return _finish(results, meta, criteria, started, backend, export, extra=extra)


def _completion_result(
    backend: Any,
    export: ExportModel,
    prompts: list[str],
    completions: list[str],
    criteria: ExportCriteria,
    seed: int,
    progress: Callable[[str], None],
    floors: tuple[Floor, Floor] | None,
) -> ProbeResult:
    """Retention on the fine-tune's own completions. Any zero-mean noise lowers their
    log-probs (log-sum-exp is convex), so with a floor the export's log-probs are
    corrected by the shift the floor's models show, and the line says so; without one
    the line says the figure includes the export's noise."""
    progress("completions: scored by base, fine-tune and export")
    lp_b = _logprobs(backend.as_base, prompts, completions)
    lp_f = _logprobs(backend.as_finetuned, prompts, completions)
    lp_e = _logprobs(export.as_base, prompts, completions)
    evidence: dict[str, Any] = {
        "completions": completions,
        "logprob_base": lp_b,
        "logprob_ft": lp_f,
        "logprob_export": lp_e,
    }
    floor = None
    lp_kept = lp_e
    exact = floors is not None and not np.any(floors[1].values)
    if exact:
        floors = None  # stored in float32: no noise to take out
    if floors is not None:
        shift = floors[1]
        lp_kept = [e - d for e, d in zip(lp_e, shift.per_prompt, strict=True)]
        evidence.update(noise_shift=shift.per_prompt, logprob_export_corrected=lp_kept)
        floor = Floor(np.abs(shift.values), shift.storage, shift.at)
    try:
        r = logprob_retention(lp_b, lp_f, lp_kept, seed=seed)
        if floors is not None:
            evidence["retention_uncorrected"] = logprob_retention(lp_b, lp_f, lp_e).retention
    except ValueError as e:
        return _result("export_completion", Verdict.SKIP, str(e), evidence=evidence)
    result = _retention_result("export_completion", r, criteria, None, evidence, floor)
    noise = "corrected" if floors is not None else "none" if exact else "included"
    result.evidence["noise_in_retention"] = noise
    result.message += {
        "corrected": " (corrected for the noise floor's shift)",
        "included": " (includes the export's noise, which lowers it)",
        "none": "",
    }[noise]
    return result
