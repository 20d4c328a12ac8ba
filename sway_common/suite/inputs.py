"""Checks of a suite's inputs against the loaded model, before any probe runs.

A prompt longer than the model's context window is refused, not truncated: a cut
prompt would measure something the user did not write, and an uncut one runs for
minutes past what the model was trained on (a ~6000-token prompt at a 2048 window
ran silently for over five minutes). Long texts belong in a corpus or a doc, which
are scored in windows.
"""

from __future__ import annotations

from collections.abc import Iterator

from sway_common.backend.model_views import ModelViews
from sway_common.suite.spec import SuiteSpec
from sway_common.types import ProbeResult, Verdict


def suite_prompts(spec: SuiteSpec) -> Iterator[tuple[str, str]]:
    """(probe name, prompt) for every prompt an enabled probe asks next-token questions on."""
    for cfg in spec.probes:
        prompts = getattr(cfg, "prompts", None)
        if cfg.enabled and isinstance(prompts, list | tuple):
            yield from ((cfg.name, p) for p in prompts if isinstance(p, str))


def context_problem(spec: SuiteSpec, backend: object) -> str | None:
    """One line naming the first prompt longer than the context window, and the fix."""
    limit = backend.prompt_limit if isinstance(backend, ModelViews) else None
    if not isinstance(backend, ModelViews) or limit is None or limit < 1:
        return None
    for name, prompt in suite_prompts(spec):
        n = backend.token_count(prompt)
        if n > limit:
            shown = prompt[:40].replace("\n", " ") + ("…" if len(prompt) > 40 else "")
            return (
                f"a prompt of probe {name!r} ({shown!r}) has {n} tokens, more than the "
                f"model's context window of {limit}; shorten it below {limit} tokens "
                "(long texts go in a corpus or doc, which are scored in windows)"
            )
    return None


def context_check(spec: SuiteSpec, backend: object) -> ProbeResult | None:
    """:func:`context_problem` as the one ERROR result of a run that cannot start."""
    problem = context_problem(spec, backend)
    if problem is None:
        return None
    return ProbeResult(
        name="inputs",
        kind="preflight",
        verdict=Verdict.ERROR,
        category="preflight",
        message=f"{problem}; no probe was run",
        gating=True,
    )
