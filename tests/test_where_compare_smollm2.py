"""End to end on SmolLM2-135M: where an adapter's effect lives, and two adapters compared.

One HF backend is loaded for the module and adapters are swapped in with ``set_adapter``
(base-view scores stay cached across the swaps). HF, not MLX: the trained adapters below
are PEFT ones that other e2e modules train too (one cached training serves all), and on
a 2-core CPU torch scored the anchor spec faster than MLX (docs/benchmarks.md).

- attribution: a LoRA on q/v of all 30 blocks, briefly trained, with B scaled by 0.1
  outside blocks 20-29 must be attributed >= 80% to blocks 20-29; with q_proj's B scaled
  by 0.1 the effect must sit on v_proj;
- compare (what ``sway-mlx compare`` runs: the quick suite on each adapter, then A against
  B on the target prompts): a 16-step adapter ranks above the 1-step one of its recipe
  on the prompts it was trained for (that pair runs only the suite's nulls and
  delta_kl); of a healthy and an overfit adapter the overfit one is named as forgetting
  more, whichever of the two is A;
- history on those real results: two equal runs pass, healthy then overfit regresses.

Run with ``pytest -m slow``.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fixtures_build
import numpy as np
import pytest
from adapter_variants import edited_peft
from click.testing import CliRunner
from rich.console import Console
from test_generation_e2e import CASES as LEDGER_CASES
from test_generation_e2e import LOG, RECIPE
from test_generation_e2e import PROMPTS as LEDGER_PROMPTS
from test_likelihood_e2e import DEMO_PROMPTS
from test_likelihood_e2e import _trained as likelihood_adapter

from sway_common.app.cli import app
from sway_common.app.demo import demo_document, document_chunks
from sway_common.null_cache import NullCache
from sway_common.probes import RunContext
from sway_common.probes.attribution import AttributionConfig, AttributionProbe
from sway_common.report.comparison import render_comparison
from sway_common.report.files import write_json
from sway_common.suite.compare import Comparison, compare_adapters
from sway_common.suite.runner import run_suite
from sway_common.suite.spec import ModelSpec, quick_suite
from sway_common.types import SuiteResult, Verdict

pytestmark = [pytest.mark.slow, pytest.mark.hf]

ATTRIBUTION_PROMPTS = DEMO_PROMPTS[:4]
# What the ledger adapters were trained to write: openings of dated log entries.
LEDGER_TARGETS = [*LEDGER_PROMPTS, *(c["prompt"] for c in LEDGER_CASES), "Entry for 12 July 1861:"]
HARROWGATE_TARGETS = DEMO_PROMPTS[:6]
# Null adapters per suite: the fewest that give a spread (the verdicts asserted below
# have margins far beyond it; the compare's own measures use no nulls).
RUNS = 2
STRENGTH_ONLY = ("null_adapter", "delta_kl")
LATE = re.compile(r"\.layers\.2\d\.")  # blocks 20-29 of SmolLM2's 30
LATE_GLOBS = ["*.layers.[0-9].*", "*.layers.1[0-9].*", "*.layers.2[0-9].*"]


def _scaled_b(src: Path, dst: Path, scale: Callable[[str], bool], factor: float) -> Path:
    def edit(t: dict[str, np.ndarray]) -> None:
        for k in t:
            if "lora_B" in k and scale(k):
                t[k] = (t[k] * factor).astype(t[k].dtype)

    return edited_peft(src, dst, edit)


def _ledger_adapter(model_dir: Path, steps: int) -> Path:
    # test_generation_e2e's recipe (its 16-step adapter is the same cached training).
    return fixtures_build.trained_adapter(
        "hf", model_dir, LOG, steps=steps, rank=RECIPE["rank"], alpha=RECIPE["alpha"],
        learning_rate=RECIPE["lr"], targets=["q_proj", "v_proj"], num_layers=RECIPE["layers"],
        seed=0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def adapters(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # Every block: 6 AdamW steps of 2 demo paragraphs at the demo's rate (~1.3 s a step on
    # a 2-core CPU; the demo's 16 steps of all 6 paragraphs over all 30 blocks took 88 s). Adam's first steps move
    # every block's B by about as much, so the unscaled adapter spreads its effect over the
    # blocks, and scaling decides where it lives.
    every = fixtures_build.trained_adapter(
        "hf", smollm2_dir, document_chunks(demo_document()), steps=6, rank=8, alpha=16.0,
        learning_rate=3e-3, targets=["q_proj", "v_proj"], num_layers=30, batch_size=2,
        max_tokens=64, seed=0,
    )  # fmt: skip
    losses = fixtures_build.train_losses(every)
    assert losses[-1] < losses[0] - 0.5, f"the every-block adapter did not train: {losses}"
    overfit = likelihood_adapter(smollm2_dir, "overfit")
    losses = fixtures_build.train_losses(overfit)
    assert losses[-1] < 1.0, f"the overfit adapter did not overfit: {losses}"
    root = tmp_path_factory.mktemp("where_compare")
    return {
        "every": every,
        "late": _scaled_b(every, root / "late", lambda k: not LATE.search(k), 0.1),
        "q_tenth": _scaled_b(every, root / "q_tenth", lambda k: "q_proj" in k, 0.1),
        "one_step": _ledger_adapter(smollm2_dir, 1),
        "sixteen_steps": _ledger_adapter(smollm2_dir, RECIPE["steps"]),
        "healthy": likelihood_adapter(smollm2_dir, "healthy"),
        "overfit": overfit,
    }


@pytest.fixture(scope="module")
def backend(smollm2_dir: Path, adapters: dict[str, Path]):
    from sway_hf.backend import HFDifferentialBackend

    b = HFDifferentialBackend(smollm2_dir, adapters["every"], device="cpu")
    yield b
    b.close()


def _attribution(backend: Any, adapter: Path, groups: Any) -> dict[str, Any]:
    backend.set_adapter(adapter)
    cfg = AttributionConfig(
        name="where", kind="attribution", groups=groups, prompts=ATTRIBUTION_PROMPTS
    )
    t = time.perf_counter()
    result = AttributionProbe().run(cfg, RunContext(backend=backend))
    print(
        f"\n[{adapter.name} {groups}] {time.perf_counter() - t:.1f}s {result.verdict.value}: {result.message}"
    )
    assert result.verdict is Verdict.PASS, result.message
    return {g["group"]: g["share"] for g in result.evidence["groups"]}


def test_blocks_20_to_29_carry_the_effect_when_the_rest_is_scaled_down(
    backend, adapters: dict[str, Path]
) -> None:
    """B × 0.1 outside blocks 20-29: per block (30 groups, 62 views of each prompt) and as
    one group against the rest (a glob), >= 80% of the effect is on blocks 20-29."""
    per_block = _attribution(backend, adapters["late"], "layers")
    late = {g: s for g, s in per_block.items() if LATE.search(f".{g}.")}
    early = {g: s for g, s in per_block.items() if g not in late}
    assert len(late) == 10 and len(early) == 20, per_block
    print(f"blocks 20-29: {sum(late.values()):.3f} of {sum(per_block.values()):.3f} summed")
    # With 30 groups the shares need not add up to 1 (the probe reports the interaction),
    # so the late blocks' shares are summed, and each late block must outrank every early one.
    assert sum(late.values()) >= 0.8, per_block
    assert min(late.values()) > max(early.values()), per_block
    # As one group against blocks 0-9 and 10-19 the shares add up (interaction ~0).
    scaled = _attribution(backend, adapters["late"], LATE_GLOBS)
    assert scaled["*.layers.2[0-9].*"] >= 0.8, scaled
    # Not the model's anatomy: unscaled, the same adapter has most of its effect elsewhere.
    unscaled = _attribution(backend, adapters["every"], LATE_GLOBS)
    assert unscaled["*.layers.2[0-9].*"] < 0.5, unscaled


def test_scaling_q_proj_down_puts_the_effect_on_v_proj(backend, adapters: dict[str, Path]) -> None:
    before = _attribution(backend, adapters["every"], "modules")
    after = _attribution(backend, adapters["q_tenth"], "modules")
    assert after["v_proj"] > after["q_proj"], f"v_proj should hold more share than q_proj: {after}"
    # v_proj already held more before: the scaling is what cut q_proj's share.
    assert after["q_proj"] < before["q_proj"] / 2, (
        f"q_proj's share should halve: {before} → {after}"
    )


def _comparer(
    model_dir: Path, backend: Any, adapters: dict[str, Path]
) -> Callable[..., Comparison]:
    """``compare(a, b, prompts, kinds)``: what ``sway-mlx compare`` does on the loaded
    backend (the quick suite on A, A's path, B swapped in, the quick suite on B), keeping
    each suite result (by adapter, prompts and probe kinds) for the next comparison."""
    results: dict[tuple[Any, ...], SuiteResult] = {}
    cache = NullCache(os.environ["SWAY_MLX_NULL_CACHE"])

    def compare(a: str, b: str, prompts: list[str], kinds: tuple[str, ...] = ()) -> Comparison:
        model = ModelSpec(base=str(model_dir), adapter=str(adapters[a]))
        spec = quick_suite(prompts, runs=RUNS, model=model)
        spec.probes = [p for p in spec.probes if not kinds or p.kind in kinds]

        def run(views: Any, _label: str) -> SuiteResult:
            key = (views.adapter_hash, tuple(prompts), kinds)
            if key not in results:
                results[key] = run_suite(spec, backend=views, null_cache=cache)
            return results[key]

        started = time.perf_counter()
        backend.set_adapter(adapters[a])
        out = compare_adapters(backend, spec, adapters[b], run, a_path=a)
        out.b = b  # labels, not cache paths, in the table below
        shown = io.StringIO()
        render_comparison(out, Console(file=shown, width=120))
        print(f"\n[compare {a} {b}: {time.perf_counter() - started:.1f} s]\n{shown.getvalue()}")
        return out

    return compare


@pytest.fixture(scope="module")
def comparisons(smollm2_dir: Path, backend, adapters: dict[str, Path]) -> dict[str, Comparison]:
    compare = _comparer(smollm2_dir, backend, adapters)
    return {
        # B's strength against A comes from A's path and B's view, not from the suite: the
        # quick suite's nulls and delta_kl only (with its harm probes this pair took 51 s
        # instead of 4 s on a 2-core CPU).
        "steps": compare("one_step", "sixteen_steps", LEDGER_TARGETS, STRENGTH_ONLY),
        "forget": compare("healthy", "overfit", HARROWGATE_TARGETS),
        # Both suites are kept: only A's path (11 views of 6 prompts) is scored again.
        "forget_swapped": compare("overfit", "healthy", HARROWGATE_TARGETS),
    }


def test_compare_ranks_16_steps_above_1(comparisons: dict[str, Comparison]) -> None:
    c = comparisons["steps"]
    assert c.verdict.startswith("B is stronger on the target prompts"), c.verdict
    assert c.shift.strength is not None and c.shift.strength[1] > 1.0, c.shift.strength
    assert np.mean(c.shift.js_b) > np.mean(c.shift.js_a)


def _verdicts(result: SuiteResult, category: str) -> set[Verdict]:
    return {p.verdict for p in result.probes if p.category == category}


def test_compare_names_the_overfit_adapter_as_forgetting_more(
    comparisons: dict[str, Comparison],
) -> None:
    c = comparisons["forget"]
    healthy, overfit = c.results
    # The labels hold: both move their target prompts beyond their nulls, the healthy one
    # keeps what the regression probes check, the overfit one FAILs them.
    for result in c.results:
        assert next(p for p in result.probes if p.kind == "delta_kl").verdict is Verdict.PASS
    assert _verdicts(healthy, "regression") == {Verdict.PASS}
    assert Verdict.FAIL in _verdicts(overfit, "regression")
    assert c.harm and all(h.says == "more" for h in c.harm), [
        (h.name, h.difference) for h in c.harm
    ]
    assert c.verdict.endswith("and forgets more (general_knowledge, held_out_prose)"), c.verdict
    swapped = comparisons["forget_swapped"]
    assert swapped.harm and all(h.says == "less" for h in swapped.harm)
    assert swapped.verdict.endswith("and forgets less (general_knowledge, held_out_prose)")


def test_history_on_real_runs(comparisons: dict[str, Comparison], tmp_path: Path) -> None:
    """The two quick-suite results as ``eval --json`` files: equal runs pass, the overfit
    run after the healthy one regresses on a gating harm probe."""
    healthy, overfit = comparisons["forget"].results
    paths = {}
    for name, result in (("healthy", healthy), ("again", healthy), ("overfit", overfit)):
        paths[name] = str(tmp_path / f"{name}.json")
        write_json(result, paths[name])
    assert json.loads(Path(paths["overfit"]).read_text())["verdict"] == "FAIL"
    same = CliRunner().invoke(app, ["history", paths["healthy"], paths["again"]])
    assert same.exit_code == 0, same.output
    assert "no regression (again vs healthy)" in same.output
    worse = CliRunner().invoke(app, ["history", paths["healthy"], paths["overfit"]])
    assert worse.exit_code == 1, worse.output
    assert "REGRESSED (overfit vs healthy): gating general_knowledge FAIL in overfit" in " ".join(
        worse.output.split()
    )
