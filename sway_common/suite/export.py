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

import resource
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from sway_common import __version__
from sway_common.backend.model_views import ModelViews
from sway_common.divergence import divergence
from sway_common.null_cache import NullCache
from sway_common.probes.base import DivergenceConfig, judge_divergence
from sway_common.probes.context import NullCalibration, RunContext
from sway_common.probes.likelihood import logprobs_in
from sway_common.protocols import PreflightCheckable, ScoringModel
from sway_common.stats import format_z
from sway_common.suite.export_math import (
    ExportCriteria,
    Retention,
    format_multiple,
    logprob_retention,
    next_token_retention,
    score,
    what_happened,
)
from sway_common.suite.runner import composite, overall_verdict, preflight, seed_everything
from sway_common.types import ProbeResult, SuiteResult, TokenDist, Verdict

CATEGORY = "export"


class ExportModel(Protocol):
    """The export: a model whose base view is all that is read."""

    def as_base(self) -> AbstractContextManager[ScoringModel]: ...


def peak_memory(*backends: object) -> dict[str, int | None]:
    """Peak resident memory of this process and the framework's own allocator peak."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is bytes on macOS, KiB on Linux.
    rss_bytes = int(rss if sys.platform == "darwin" else rss * 1024)
    framework = None
    for b in backends:
        value = b.peak_memory_bytes() if isinstance(b, ModelViews) else None
        framework = value if value is not None else framework
    return {"peak_rss_bytes": rss_bytes, "framework_peak_bytes": framework}


def check_same_tokens(backend: ModelViews, export: ExportModel, texts: Sequence[str]) -> None:
    """Raise ValueError when the two models cannot be compared token for token."""
    if not isinstance(export, ModelViews):
        return  # a stand-in export: nothing to compare
    va, vb = backend.vocab_size, export.vocab_size
    if va and vb and va != vb:
        raise ValueError(f"the export's vocabulary has {vb} tokens, the base model's {va}")
    ta, tb = backend.tokenizer, export.tokenizer
    if ta is None or tb is None:
        return
    for text in texts:
        if ta(text)["input_ids"] != tb(text)["input_ids"]:
            raise ValueError(
                f"the export's tokenizer encodes {text[:40]!r} differently from the base "
                "model's; compare models that share one tokenizer"
            )


# Config fields that must agree for an export to be "the same model" (any nesting level).
_SAME_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def _text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    inner = cfg.get("text_config")
    return {**cfg, **inner} if isinstance(inner, dict) else cfg


def config_mismatch(base: dict[str, Any], export: dict[str, Any]) -> str | None:
    """Why the export cannot be a version of the base model (config.json dicts), or None."""
    a, b = _text_config(base), _text_config(export)
    for name in _SAME_FIELDS:
        if name in a and name in b and a[name] != b[name]:
            return f"the export's {name} is {b[name]!r}, the base model's {a[name]!r}"
    return None


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
    name: str, r: Retention, c: ExportCriteria, null_mean: float | None, evidence: dict[str, Any]
) -> ProbeResult:
    ok, line = what_happened(r, c)
    if null_mean and ok:
        line += f" ({format_multiple(r.residual_raw / null_mean)} what a random adapter of its size does)"
    evidence = {
        "retention": r.retention,
        "retention_interval": list(r.interval),
        "residual": r.residual,
        "lost": r.lost,
        "noise": r.noise,
        "effect": r.effect,
        "residual_raw": r.residual_raw,
        "residual_vs_null": r.residual_raw / null_mean if null_mean else None,
        "per_prompt_retention": r.per_prompt,
        "min_retention": c.min_retention,
        "max_residual": c.max_residual,
        **evidence,
    }
    return _result(
        name,
        Verdict.PASS if ok else Verdict.FAIL,
        line,
        raw=r.retention,
        score=score(r),
        evidence=evidence,
    )


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
        return first.message + where.get(first.name, "")
    nt, comp = by_name.get("export_next_token"), by_name.get("export_completion")
    line = nt.message if nt is not None else "the export keeps the fine-tune"
    if comp is not None and comp.raw is not None and comp.verdict is Verdict.PASS:
        line += f"; {comp.raw:.0%} on its own completions"
    # A non-gating check that failed (the weight check) is said, not hidden.
    for r in results:
        if not r.gating and r.verdict in failed:
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
) -> SuiteResult:
    """Measure how much of ``backend``'s fine-tune ``export`` keeps, on ``prompts``.

    ``extra``: results measured before (export-check's weight check), listed first.
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
    nt = next_token_retention(js_bf, js_be, js_ef, seed=seed)
    results.append(
        _retention_result(
            "export_next_token",
            nt,
            criteria,
            null_mean,
            {
                "js_base_ft": js_bf,
                "js_base_export": js_be,
                "js_export_ft": js_ef,
                "top_k": top_k,
                "prompts": prompts,
            },
        )
    )
    results.append(
        _completion_result(backend, export, prompts, criteria, seed, max_new_tokens, progress)
    )
    return _finish(results, meta, criteria, started, backend, export, extra=extra)


def _completion_result(
    backend: Any,
    export: ExportModel,
    prompts: list[str],
    criteria: ExportCriteria,
    seed: int,
    max_new_tokens: int,
    progress: Callable[[str], None],
) -> ProbeResult:
    progress(f"completions: the fine-tune writes {len(prompts)}")
    with backend.as_finetuned() as ft:
        completions = [ft.generate(p, max_new_tokens=max_new_tokens) for p in prompts]
    progress("completions: scored by base, fine-tune and export")
    lp_b = _logprobs(backend.as_base, prompts, completions)
    lp_f = _logprobs(backend.as_finetuned, prompts, completions)
    lp_e = _logprobs(export.as_base, prompts, completions)
    evidence = {
        "completions": completions,
        "logprob_base": lp_b,
        "logprob_ft": lp_f,
        "logprob_export": lp_e,
        "max_new_tokens": max_new_tokens,
    }
    try:
        r = logprob_retention(lp_b, lp_f, lp_e, seed=seed)
    except ValueError as e:
        return _result("export_completion", Verdict.SKIP, str(e), evidence=evidence)
    return _retention_result("export_completion", r, criteria, None, evidence)
