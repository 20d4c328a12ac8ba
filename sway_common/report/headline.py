"""The one line a person acts on: is this adapter above noise, and by how much?"""

from __future__ import annotations

from sway_common.models import HALF_PRECISION
from sway_common.stats import format_z
from sway_common.types import ProbeResult, SuiteResult, Verdict


def _n_prompts(p: ProbeResult) -> int:
    return len(p.evidence.get("per_prompt", []) or p.evidence.get("prompts", []))


def _adapter_line(result: SuiteResult) -> str:
    """Summarise the suite's first delta_kl result (falling back to the overall verdict)."""
    if result.meta.get("interrupted"):
        done = sum(p.verdict is not Verdict.SKIP for p in result.probes)
        return f"interrupted after {done} of {len(result.probes)} probes: no verdict on the adapter"
    if result.meta.get("headline"):  # a command that judges something else (export-check)
        return str(result.meta["headline"])
    if result.probes and result.probes[0].kind == "preflight":
        first = result.probes[0]
        if first.verdict is Verdict.FAIL:  # a no-op adapter: a finding, not a broken run
            return first.message
        return f"adapter could not be evaluated: {first.message}"
    dk = next((p for p in result.probes if p.kind == "delta_kl"), None)
    if dk is None:
        return f"suite verdict {result.verdict.value}"
    n = _n_prompts(dk)
    on = f"on {n} prompt{'s' if n != 1 else ''}"
    z_shown = format_z(dk.z, dk.null.n if dk.null else None)
    if dk.verdict is Verdict.ERROR:
        return f"adapter could not be evaluated: {dk.message}"
    if dk.verdict is Verdict.PASS and dk.z is not None:
        ratio = (
            f" ({dk.effect_ratio:.3g}× a random adapter of the same size)"
            if dk.effect_ratio
            else ""
        )
        return f"adapter is {z_shown} above its null {on}{ratio}"
    if dk.verdict is Verdict.PASS:
        return f"adapter moves the model {on} (no null calibration: fixed threshold only)"
    if dk.z is not None and dk.z >= 3 and dk.raw is not None:
        return (
            f"adapter is {z_shown} above its null {on} but its effect is negligible "
            f"(mean divergence {dk.raw:.2g} nats): it barely changes the model"
            if dk.evidence.get("fail_reason", "floor") == "floor"
            else f"adapter is {z_shown} above its null {on} but {dk.message.split(', but ')[-1]}"
            + _rounding_hint(result)
        )
    z = f" (z={z_shown} {on})" if dk.z is not None else f" {on}"
    return f"adapter is indistinguishable from a null adapter{z}{_rounding_hint(result)}"


def _rounding_hint(result: SuiteResult) -> str:
    """In half precision, rounding moves the model under every adapter, nulls included,
    and can hide a light one (docs/statistics.md): say so, and what to run instead."""
    dtype = result.meta.get("dtype")
    if dtype not in HALF_PRECISION:
        return ""
    return f"; run in {dtype}, whose rounding moves every adapter: try --dtype float32"


REGRESSION_KINDS = ("calibration_drift", "external_perplexity")


def headline(result: SuiteResult) -> str:
    """The adapter line, then whether general knowledge survived (when the suite checked)."""
    line = _adapter_line(result)
    clause = _knowledge_clause(result)
    return f"{line}; {clause}" if clause else line


def _knowledge_clause(result: SuiteResult) -> str | None:
    checks = [
        p
        for p in result.probes
        if p.kind in REGRESSION_KINDS and p.verdict in (Verdict.PASS, Verdict.WARN, Verdict.FAIL)
    ]
    if not checks:
        return None
    lost = [p for p in checks if p.verdict is Verdict.FAIL]
    if lost:
        return "but it lost general knowledge: " + ", ".join(map(_regression_facts, lost))
    return "general knowledge kept (" + ", ".join(map(_regression_facts, checks)) + ")"


def _regression_facts(p: ProbeResult) -> str:
    ev = p.evidence
    if p.kind == "calibration_drift":
        known = ev.get("known_items", ev.get("items", 0))
        if not known:
            return "no fact the base knows to lose"
        return (
            f"{ev.get('fraction_regressed', 0.0):.0%} of {known} known facts regressed, "
            f"mean {ev.get('mean_delta') or 0.0:+.2g} nats"
        )
    return f"held-out prose perplexity {ev.get('perplexity_change', 0.0):+.1%}"
