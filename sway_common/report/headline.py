"""The one line a person acts on: is this adapter above noise, and by how much?"""

from __future__ import annotations

from sway_common.stats import format_z
from sway_common.types import ProbeResult, SuiteResult, Verdict


def _n_prompts(p: ProbeResult) -> int:
    return len(p.evidence.get("per_prompt", []) or p.evidence.get("prompts", []))


def headline(result: SuiteResult) -> str:
    """Summarise the suite's first delta_kl result (falling back to the overall verdict)."""
    if result.meta.get("interrupted"):
        done = sum(p.verdict is not Verdict.SKIP for p in result.probes)
        return f"interrupted after {done} of {len(result.probes)} probes: no verdict on the adapter"
    if result.probes and result.probes[0].kind == "preflight":
        return f"adapter could not be evaluated: {result.probes[0].message}"
    dk = next((p for p in result.probes if p.kind == "delta_kl"), None)
    if dk is None:
        return f"suite verdict {result.verdict.value}"
    n = _n_prompts(dk)
    on = f"on {n} prompt{'s' if n != 1 else ''}"
    z_shown = format_z(dk.z, dk.null.n if dk.null else None)
    if dk.verdict is Verdict.ERROR:
        return f"adapter could not be evaluated: {dk.message}"
    if dk.verdict is Verdict.PASS and dk.z is not None:
        ratio = f" ({dk.effect_ratio:.3g}× a random adapter of the same size)" if dk.effect_ratio else ""
        return f"adapter is {z_shown} above its null {on}{ratio}"
    if dk.verdict is Verdict.PASS:
        return f"adapter moves the model {on} (no null calibration: fixed threshold only)"
    if dk.z is not None and dk.z >= 3 and dk.raw is not None:
        return (
            f"adapter is {z_shown} above its null {on} but its effect is negligible "
            f"(mean divergence {dk.raw:.2g} nats): it barely changes the model"
            if dk.evidence.get("fail_reason", "floor") == "floor"
            else f"adapter is {z_shown} above its null {on} but {dk.message.split(', but ')[-1]}"
        )
    z = f" (z={z_shown} {on})" if dk.z is not None else f" {on}"
    return f"adapter is indistinguishable from a null adapter{z}"
