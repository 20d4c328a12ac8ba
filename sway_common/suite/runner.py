"""Run a suite: preflight → seed → null calibration → probes in order → SuiteResult.

Guarantees the reports rely on:

- a backend that fails its finite check yields one ERROR result and nothing else runs,
  so a NaN adapter can never PASS;
- a probe that raises becomes an ERROR result and the rest still run;
- Ctrl-C stops between probes and returns what finished (remaining probes SKIP);
- the overall verdict cannot be PASS while a gating probe FAILs or ERRORs.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any, Protocol

import numpy as np

from sway_common import __version__
from sway_common.backend.model_views import ModelViews
from sway_common.null_cache import NullCache
from sway_common.probes import REGISTRY, RunContext
from sway_common.probes.base import DivergenceConfig
from sway_common.probes.null_adapter import NullAdapterConfig
from sway_common.protocols import (
    DescribedBackend,
    DifferentialBackend,
    NoopCheckable,
    NullCalibratedBackend,
    PreflightCheckable,
)
from sway_common.suite.inputs import context_check
from sway_common.suite.spec import SuiteSpec
from sway_common.types import ProbeResult, SuiteResult, Verdict

DEFAULT_WEIGHTS = {"adherence": 1.0, "ablation": 1.0}


class SuiteProgress(Protocol):
    """Where the runner reports progress; the app supplies a display (see report.progress).

    ``run_suite(progress=...)`` takes a factory called with the number of probes that
    returns a context manager yielding one of these.
    """

    def probe(self, label: str) -> None:
        """A probe starts; ``label`` names it and its place in the suite."""

    def note(self, message: str) -> None:
        """A step inside the running probe."""

    def advance(self) -> None:
        """The running probe finished."""


def seed_everything(seed: int) -> None:
    """Seed Python's and numpy's global random generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)


def preflight(backend: object) -> ProbeResult | None:
    """One result when the backend is broken (ERROR) or its adapter is a no-op (FAIL)."""
    if not isinstance(backend, PreflightCheckable):
        return None
    verdict = Verdict.ERROR
    try:
        ok, reason = backend.preflight_finite_check()
        if ok and isinstance(backend, NoopCheckable):
            # A no-op adapter is a verdict on the adapter (FAIL), not a broken run (ERROR).
            ok, reason = backend.preflight_noop_check()
            verdict = Verdict.FAIL
    except Exception as e:  # a crash in the check is as disqualifying as a failed check
        ok, reason, verdict = False, f"preflight crashed: {type(e).__name__}: {e}", Verdict.ERROR
    if ok:
        return None
    return ProbeResult(
        name="preflight",
        kind="preflight",
        verdict=verdict,
        category="preflight",
        message=f"{reason}; no probe was run",
        gating=True,
    )


def _ordered(spec: SuiteSpec, calibrated: bool) -> list[Any]:
    """Null calibration first (added with defaults if the suite has none), then the rest."""
    nulls = [c for c in spec.probes if isinstance(c, NullAdapterConfig)]
    rest = [c for c in spec.probes if not isinstance(c, NullAdapterConfig)]
    if not nulls and calibrated:
        nulls = [NullAdapterConfig(name="null_baseline", kind="null_adapter")]
    shared = next((c.prompts for c in rest if isinstance(c, DivergenceConfig) and c.enabled), None)
    if shared:  # measured where delta_kl measures: one set of null forwards serves both
        nulls = [c if c.prompts else replace(c, prompts=list(shared)) for c in nulls]
    return nulls[:1] + rest + nulls[1:]


def _run_one(cfg: Any, ctx: RunContext) -> ProbeResult:
    start = time.perf_counter()
    probe = REGISTRY[cfg.kind]()
    if not cfg.enabled:
        result = probe.result(cfg, Verdict.SKIP, message="disabled in the spec")
    else:
        try:
            result = probe.run(cfg, ctx)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            result = probe.result(cfg, Verdict.ERROR, message=f"{type(e).__name__}: {e}")
    result.duration_s = time.perf_counter() - start
    return result


def composite(
    results: list[ProbeResult], weights: dict[str, float] | None = None
) -> tuple[float | None, dict[str, float]]:
    """Weighted mean of probe scores per category, then across categories."""
    sums: dict[str, list[float]] = {}
    for r in results:
        if r.score is None or r.verdict is Verdict.SKIP:
            continue
        s = sums.setdefault(r.category, [0.0, 0.0])
        s[0] += r.weight * r.score
        s[1] += r.weight
    cats = {c: v[0] / v[1] for c, v in sums.items() if v[1] > 0}
    w = {**DEFAULT_WEIGHTS, **(weights or {})}
    total = sum(w.get(c, 1.0) for c in cats)
    score = sum(w.get(c, 1.0) * s for c, s in cats.items()) / total if total > 0 else None
    return score, cats


def decide(
    results: list[ProbeResult], score: float | None, threshold: float
) -> tuple[Verdict, str]:
    """The suite's verdict and what decided it, in words ("gating delta_kl failed")."""
    gating = [r for r in results if r.gating]

    def named(verdicts: tuple[Verdict, ...], among: list[ProbeResult]) -> str:
        return ", ".join(r.name for r in among if r.verdict in verdicts)

    if errored := named((Verdict.ERROR,), gating):
        return Verdict.ERROR, f"gating {errored} errored"
    if failed := named((Verdict.FAIL,), gating):
        return Verdict.FAIL, f"gating {failed} failed"
    if score is not None and score < threshold:
        return Verdict.FAIL, "every gating probe passed, the composite did not"
    if not any(r.verdict is Verdict.PASS for r in gating):
        return Verdict.WARN, "no gating probe passed (all skipped or warned)"
    if flagged := named((Verdict.WARN, Verdict.FAIL, Verdict.ERROR), results):
        return Verdict.WARN, f"every gating probe passed; {flagged} did not"
    return Verdict.PASS, "every probe passed"


def overall_verdict(results: list[ProbeResult], score: float | None, threshold: float) -> Verdict:
    return decide(results, score, threshold)[0]


def run_suite(
    spec: SuiteSpec,
    *,
    backend: DifferentialBackend,
    threshold: float | None = None,
    progress: Callable[[int], AbstractContextManager[SuiteProgress]] | None = None,
    on_result: Callable[[ProbeResult], None] | None = None,
    null_cache: NullCache | None = None,
) -> SuiteResult:
    started = time.time()
    threshold = spec.defaults.coverage_threshold if threshold is None else threshold
    meta: dict[str, Any] = {
        "spec": spec.source,
        "seed": spec.defaults.seed,
        "sway_version": __version__,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        **(backend.info if isinstance(backend, DescribedBackend) else {}),
    }

    def finish(results: list[ProbeResult], **extra: Any) -> SuiteResult:
        score, cats = composite(results, spec.defaults.score_weights)
        meta.update(extra, duration_s=round(time.time() - started, 3))
        verdict = overall_verdict(results, score, threshold)
        if extra.get("interrupted"):
            verdict = Verdict.ERROR  # an incomplete run is never a verdict on the adapter
        return SuiteResult(
            probes=results,
            verdict=verdict,
            score=score,
            category_scores=cats,
            threshold=threshold,
            meta=meta,
        )

    failed = preflight(backend) or context_check(spec, backend)
    if failed is not None:
        return finish([failed])

    seed_everything(spec.defaults.seed)
    if isinstance(backend, ModelViews):  # the model checks that no prompt decides
        backend.check_store = null_cache
    calibrated = isinstance(backend, NullCalibratedBackend)
    null = spec.null_calibration() if calibrated else None
    if null is not None:
        meta["null"] = {"runs": null.runs, "mode": null.mode, "init_scale": null.init_scale}
    configs = _ordered(spec, calibrated)
    results: list[ProbeResult] = []

    shown_cm = progress(len(configs)) if progress is not None else nullcontext(None)
    with shown_cm as shown:
        ctx = RunContext(
            backend=backend,
            seed=spec.defaults.seed,
            top_k=spec.defaults.top_k,
            null=null,
            null_cache=null_cache,
        )
        if shown is not None:
            ctx.progress = shown.note
        for i, cfg in enumerate(configs):
            if shown is not None:
                shown.probe(f"{cfg.name} ({i + 1}/{len(configs)})")
            try:
                result = _run_one(cfg, ctx)
            except KeyboardInterrupt:
                for rest in configs[i:]:
                    results.append(
                        ProbeResult(
                            name=rest.name,
                            kind=rest.kind,
                            verdict=Verdict.SKIP,
                            category="other",
                            gating=False,
                            message="not run: interrupted",
                        )
                    )
                return finish(results, interrupted=True)
            results.append(result)
            if on_result is not None:
                on_result(result)
            if shown is not None:
                shown.advance()
    return finish(results)
