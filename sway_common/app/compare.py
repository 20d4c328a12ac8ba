"""`sway-mlx compare`: two adapters or checkpoints of one base, on one loaded base model."""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import AbstractContextManager

import click
from rich.console import Console

from sway_common.app.inputs import (
    check_adapter_paths,
    check_adapters,
    check_model,
    check_output,
)
from sway_common.app.options import (
    backend_option,
    exit_interrupted,
    fail,
    file_option,
    no_cache_option,
    null_cache,
    read_prompts,
    runs_option,
    safety_options,
    seed_option,
)
from sway_common.app.platform import MODEL_BACKEND_KINDS
from sway_common.app.run import build_or_fail
from sway_common.backend.model_views import ModelViews
from sway_common.report.comparison import render_comparison, write_comparison_json
from sway_common.report.progress import suite_progress
from sway_common.suite.compare import compare_adapters
from sway_common.suite.inputs import context_problem
from sway_common.suite.runner import SuiteProgress, run_suite
from sway_common.suite.spec import ModelSpec, SuiteSpec, quick_suite
from sway_common.types import SuiteResult


@click.command("compare")
@click.argument("adapter_a", metavar="A", type=click.Path())
@click.argument("adapter_b", metavar="B", type=click.Path())
@click.option("--model", required=True, help="The base model of both (local HF dir or hub id).")
@file_option(
    "--prompts",
    "prompts_file",
    "Target prompts, one per line: what the adapters were trained for (default: generic ones).",
)
@runs_option("Null adapters drawn for each adapter.")
@file_option("--json", "json_path", "Write the comparison (and both suite results) as JSON here.")
@backend_option(MODEL_BACKEND_KINDS)
@seed_option
@no_cache_option
@safety_options
def compare_cmd(
    adapter_a: str,
    adapter_b: str,
    model: str,
    prompts_file: str | None,
    runs: int,
    json_path: str | None,
    backend: str,
    seed: int | None,
    no_cache: bool,
    allow_pickle: bool,
    trust_remote_code: bool,
) -> None:
    """Compare adapters A and B of one base model: which moves the target prompts more,
    in which direction, and which forgets more.

    \b
      sway-mlx compare --model HuggingFaceTB/SmolLM2-135M-Instruct run1/ run2/ --prompts p.txt
    \b
    The base loads once. Each adapter runs the quick suite (as `eval --model M
    --adapter-path A` does: against its own null adapters, plus the general-knowledge and
    held-out-prose checks); then A and B are compared on the target prompts: the JS
    between them, B's effect as a multiple of A's, which point of A's own path (A's
    update scaled by 0 to 4) B is closest to and how much of B's effect lies off that
    path, and item by item what each keeps of general knowledge and prose. Each has a
    95% interval over prompts (items). Ends in one line, e.g. "B is stronger on the
    target prompts, in the same direction as A, and forgets less". Cost: two quick
    suites, then A's path (11 views of each prompt, stacked) and B once more (cached).
    Exit 0 when compared, 2 on bad input or an error.
    """
    check_adapter_paths((adapter_a, adapter_b))
    check_output(json_path, "--json")
    prompts = read_prompts(prompts_file)
    if backend != "dummy":
        check_model(model, allow_pickle=allow_pickle)
        check_adapters([adapter_a, adapter_b], allow_pickle=allow_pickle)
    base = ModelSpec(base=model, adapter=adapter_a)
    spec = quick_suite(prompts, runs=runs, seed=seed or 0, model=base)
    loaded = build_or_fail(
        base, backend, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
    )
    if problem := context_problem(spec, loaded):
        loaded.close()
        fail(problem)
    try:
        comparison = compare_adapters(
            loaded, spec, adapter_b, _runner(spec, no_cache), a_path=adapter_a
        )
    except KeyboardInterrupt:
        exit_interrupted("interrupted: nothing written (a comparison needs both adapters)")
    except (OSError, ValueError) as e:
        fail(f"cannot compare: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    finally:
        loaded.close()
    if json_path:
        write_comparison_json(comparison, json_path)
    render_comparison(comparison, Console())
    sys.exit(0)


def _runner(spec: SuiteSpec, no_cache: bool) -> Callable[[ModelViews, str], SuiteResult]:
    """Runs ``spec`` on the backend's adapter, with a progress bar on a terminal."""
    cache = null_cache(no_cache)

    def run(backend: ModelViews, label: str) -> SuiteResult:
        def progress(total: int) -> AbstractContextManager[SuiteProgress]:
            return suite_progress(total)

        result = run_suite(
            spec,
            backend=backend,
            progress=progress if sys.stderr.isatty() else None,
            null_cache=cache,
        )
        if result.meta.get("interrupted"):
            raise KeyboardInterrupt
        return result

    return run
