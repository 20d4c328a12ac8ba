"""`sway-mlx compare`: two adapters of one base, each against its nulls and against each other.

On the tiny Llama and its trained PEFT adapter, on both backends: the adapter against a
copy of itself reads "the same", against itself with B doubled "B is stronger, in the
same direction as A"; the measures themselves on distributions built by hand.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from adapter_variants import b_scaled
from click.testing import CliRunner
from fixtures_build import TINY_PROMPTS as PROMPTS
from test_stacked_views import make_backend

from sway_common.app.cli import app
from sway_common.backend.model_views import ModelViews
from sway_common.suite.compare import HarmRow, compare_adapters, measure
from sway_common.suite.runner import run_suite
from sway_common.suite.spec import quick_suite
from sway_common.types import SuiteResult, TokenDist


@pytest.fixture(scope="module")
def copies(tiny_peft_adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    copy = root / "copy"
    shutil.copytree(tiny_peft_adapter, copy)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return {
        "copy": copy,
        "double": b_scaled(tiny_peft_adapter, root / "double", factor=2.0),
        "nudged": b_scaled(tiny_peft_adapter, root / "nudged", factor=1.0001),
        "prompts": root / "prompts.txt",
    }


@pytest.mark.mlx
def test_cli_reads_a_doubled_adapter_as_stronger_in_the_same_direction(
    tiny_model_dir: Path, tiny_peft_adapter: Path, copies: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "c.json"
    args = ["compare", "--model", str(tiny_model_dir), str(tiny_peft_adapter)]
    args += [str(copies["double"]), "--backend", "mlx", "--runs", "2"]
    args += ["--prompts", str(copies["prompts"]), "--json", str(out), "--no-cache"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["verdict"].startswith("B is stronger on the target prompts")
    assert "in the same direction as A (closest to A scaled by 2;" in data["verdict"]
    assert data["verdict"] in " ".join(result.output.split())
    assert data["along"][0] == 2.0 and data["elsewhere"][0] < 1e-6
    assert data["strength"][1] > 1.0 and len(data["js_ab"]) == len(PROMPTS)
    assert data["results"]["a"]["probes"][0]["kind"] == "null_adapter"
    assert {h["name"] for h in data["harm"]} == {"general_knowledge", "held_out_prose"}


@pytest.mark.hf
def test_same_and_stronger_on_one_loaded_base(
    tiny_model_dir: Path, tiny_peft_adapter: Path, copies: dict[str, Path]
) -> None:
    spec = quick_suite(PROMPTS, runs=2)
    backend = make_backend("hf", tiny_model_dir, tiny_peft_adapter)

    def run(b: ModelViews, _label: str) -> SuiteResult:
        return run_suite(spec, backend=b)

    try:
        same = compare_adapters(backend, spec, copies["copy"], run)
        backend.set_adapter(tiny_peft_adapter)
        nudged = compare_adapters(backend, spec, copies["nudged"], run)
        backend.set_adapter(tiny_peft_adapter)
        double = compare_adapters(backend, spec, copies["double"], run)
    finally:
        backend.close()
    assert same.verdict == "A and B are the same: their weights are identical"
    assert same.shift.distance == (0.0, 0.0, 0.0)
    assert nudged.verdict.startswith("A and B are the same on the target prompts")
    assert double.verdict.startswith("B is stronger on the target prompts")
    assert "in the same direction as A (closest to A scaled by 2;" in double.verdict


def _tilted(towards: np.ndarray, lam: float) -> TokenDist:
    """A distribution over 6 tokens, its logits moved by ``lam · towards``."""
    logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0]) + lam * towards
    logprobs = logits - np.log(np.exp(logits).sum())
    return TokenDist(np.arange(6), logprobs.astype(np.float32), vocab_size=6)


def test_direction_along_and_elsewhere() -> None:
    """B on A's path (A × 3) is A's direction; B moving other tokens is elsewhere."""
    rng = np.random.default_rng(0)
    ups = [rng.normal(size=6) for _ in range(8)]
    others = [rng.normal(size=6) for _ in range(8)]
    base = [_tilted(u, 0.0) for u in ups]
    path = {lam: [_tilted(u, lam * 0.3) for u in ups] for lam in (0.0, 0.5, 1.0, 2.0, 3.0)}
    along = measure(base, path, [_tilted(u, 0.9) for u in ups], seed=0)
    assert along.along == (3.0, 3.0, 3.0) and along.elsewhere is not None
    assert along.elsewhere[0] < 1e-9 and along.strength is not None and along.strength[1] > 2.0
    assert along.cosine is not None and along.cosine[0] > 0.9
    away = measure(base, path, [_tilted(o, 0.3) for o in others], seed=0)
    assert away.elsewhere is not None and away.elsewhere[0] > 0.5
    assert away.cosine is not None and away.cosine[0] < 0.5


def test_harm_needs_an_interval_past_zero_and_the_floor() -> None:
    row = HarmRow("k", "calibration_drift", ("PASS", "PASS"), (0.0, 0.0), "", (-0.2, -0.3, -0.1))
    assert row.says == "more"
    row.difference = (-0.2, -0.5, 0.1)
    assert row.says == "same"
    row.difference, row.floor = (0.0004, 0.0001, 0.0007), 1e-3
    assert row.says == "same"
    row.floor = 0.0
    assert row.says == "less"


def test_bad_input_exits_2_before_loading(tmp_path: Path, tiny_peft_adapter: Path) -> None:
    runner = CliRunner()
    args = ["compare", "--model", str(tmp_path), str(tiny_peft_adapter), str(tmp_path / "nope")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "adapter path" in result.output and "does not exist" in result.output
    args = ["compare", "--model", str(tmp_path), str(tiny_peft_adapter), str(tiny_peft_adapter)]
    result = runner.invoke(app, [*args, "--json", str(tmp_path)])
    assert result.exit_code == 2 and "--json" in result.output
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "no config.json" in result.output
