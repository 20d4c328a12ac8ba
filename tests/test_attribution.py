"""attribution: views that scale a subset of the modules, and each group's share of the effect.

On both backends, with the tiny Llama and its trained PEFT adapter: a subset view equals
an adapter that holds only the other modules (stacked and one view at a time), a layer
whose B is zeroed gets no share, a module type whose B is scaled by 0.1 gets little.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from adapter_variants import edited_peft
from fixtures_build import TINY_PROMPTS as PROMPTS
from safetensors.numpy import load_file, save_file
from test_stacked_views import ATOL, assert_same, make_backend, one_view

from sway_common.backend.model_views import ModelViews
from sway_common.backend.views import ViewSpec
from sway_common.probes import REGISTRY, RunContext
from sway_common.probes.attribution import (
    AttributionConfig,
    AttributionProbe,
    resolve_groups,
    shares,
)
from sway_common.report.attribution_plot import ATTRIBUTION_PNG, write_attribution_plots
from sway_common.suite.runner import run_suite
from sway_common.suite.spec import SpecError, parse_spec
from sway_common.types import SuiteResult, Verdict

KINDS = [pytest.param("mlx", marks=pytest.mark.mlx), pytest.param("hf", marks=pytest.mark.hf)]
LAYER_1 = frozenset({"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"})


def _scaled_b(src: Path, dst: Path, where: str, factor: float) -> Path:
    def edit(t: dict[str, np.ndarray]) -> None:
        for k in t:
            if "lora_B" in k and where in k:
                t[k] = (t[k] * factor).astype(t[k].dtype)

    return edited_peft(src, dst, edit)


@pytest.fixture(scope="module")
def variants(tiny_peft_adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("attribution")
    # Layer 0 alone: what the full adapter is with layer 1 left out.
    lower = root / "lower"
    shutil.copytree(tiny_peft_adapter, lower)
    tensors = load_file(str(lower / "adapter_model.safetensors"))
    save_file(
        {k: v for k, v in tensors.items() if ".layers.1." not in k},
        str(lower / "adapter_model.safetensors"),
    )
    config = json.loads((lower / "adapter_config.json").read_text())
    (lower / "adapter_config.json").write_text(json.dumps({**config, "layers_to_transform": [0]}))
    return {
        "lower": lower,
        "zero_layer_1": _scaled_b(tiny_peft_adapter, root / "zero1", ".layers.1.", 0.0),
        "q_tenth": _scaled_b(tiny_peft_adapter, root / "qtenth", "q_proj", 0.1),
    }


@pytest.fixture(scope="module", params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _attribution(backend: ModelViews, groups: object = "layers") -> dict:
    cfg = AttributionConfig(name="where", kind="attribution", groups=groups, prompts=PROMPTS)
    result = AttributionProbe().run(cfg, RunContext(backend=backend))
    assert result.verdict is Verdict.PASS, result.message
    return {"result": result, **{g["group"]: g for g in result.evidence["groups"]}}


def test_a_view_without_a_layer_is_the_adapter_without_it(
    kind: str, tiny_model_dir: Path, tiny_peft_adapter: Path, variants: dict[str, Path]
) -> None:
    """λ = 0 on layer 1's modules: the adapter of layer 0 alone, stacked or one view at a time."""
    without = ViewSpec("scaled", lam=0.0, modules=LAYER_1)
    half = ViewSpec("scaled", lam=0.5, modules=LAYER_1)
    full = make_backend(kind, tiny_model_dir, tiny_peft_adapter, batch_size=3)
    lower = make_backend(kind, tiny_model_dir, variants["lower"], batch_size=3)
    try:
        reference = one_view(lower, [ViewSpec("ft")], PROMPTS)
        assert_same(one_view(full, [without], PROMPTS), reference)
        views = [ViewSpec("base"), without, half, ViewSpec("ft")]
        stacked = full.next_token_dist_views(views, PROMPTS, top_k=40)
        assert_same(stacked[1:2], reference)
        assert_same(stacked[2:3], one_view(full, [half], PROMPTS))
        # Not the base, not the fine-tune: a view of its own, with its own cache entries.
        assert without.key(full.adapter_hash) != ViewSpec("base").key(full.adapter_hash)
        assert not np.allclose(stacked[1][0].logprobs, stacked[3][0].logprobs, atol=ATOL)
        with pytest.raises(ValueError, match="does not adapt"):
            full.next_token_dist_views(
                [ViewSpec("scaled", lam=0.0, modules=frozenset({"model.nope"}))], PROMPTS, top_k=40
            )
    finally:
        full.close()
        lower.close()


def test_a_zeroed_layer_gets_no_share(
    kind: str, tiny_model_dir: Path, tiny_peft_adapter: Path, variants: dict[str, Path]
) -> None:
    backend = make_backend(kind, tiny_model_dir, variants["zero_layer_1"], batch_size=3)
    try:
        out = _attribution(backend)
    finally:
        backend.close()
    assert abs(out["layers.1"]["share"]) < 1e-3
    assert out["layers.0"]["share"] == pytest.approx(1.0, abs=1e-3)
    low, high = out["layers.1"]["interval"]
    assert -1e-3 < low <= high < 1e-3
    evidence = out["result"].evidence
    assert evidence["partition"] and evidence["cost"]["views"] == 2 * 2 + 2
    assert "layers.0 100%" in out["result"].message


def test_a_module_type_scaled_down_gets_less(
    kind: str, tiny_model_dir: Path, tiny_peft_adapter: Path, variants: dict[str, Path]
) -> None:
    """q_proj's B × 0.1 moves the effect onto v_proj; globs give the same numbers."""
    full = make_backend(kind, tiny_model_dir, tiny_peft_adapter, batch_size=3)
    tenth = make_backend(kind, tiny_model_dir, variants["q_tenth"], batch_size=3)
    try:
        before, after = _attribution(full, "modules"), _attribution(tenth, "modules")
        globs = _attribution(tenth, ["*.q_proj", "*.v_proj"])
    finally:
        full.close()
        tenth.close()
    assert after["v_proj"]["share"] > 0.9
    assert after["q_proj"]["share"] < before["q_proj"]["share"] / 2
    assert globs["*.v_proj"]["share"] == pytest.approx(after["v_proj"]["share"], abs=1e-9)
    for out in (before, after):
        total = out["q_proj"]["share"] + out["v_proj"]["share"]
        # Two groups: the share is the two-player Shapley value, which adds up to 1.
        assert total == pytest.approx(1.0, abs=1e-9)
        assert out["result"].evidence["interaction"] == pytest.approx(0.0, abs=1e-9)


def test_shares_of_additive_effects() -> None:
    """Effects that add up: each share is its part; synergy leaves an interaction."""
    full = np.array([3.0, 3.0, 3.0, 3.0, 3.0, 3.0])
    alone = np.array([[1.0] * 6, [2.0] * 6, [0.0] * 6])
    without = full - alone
    s = shares(full, without, alone, seed=0)
    assert s.share == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert s.interaction == pytest.approx(0.0)
    assert s.interval[1] == pytest.approx((2 / 3, 2 / 3))
    # Three groups that do nothing alone but everything together: nothing is attributed.
    s = shares(full, np.zeros((3, 6)), np.zeros((3, 6)), seed=0)
    assert s.share == pytest.approx([0.5, 0.5, 0.5]) and s.interaction == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="nothing to attribute"):
        shares(np.zeros(6), np.zeros((1, 6)), np.zeros((1, 6)), seed=0)
    # Too few prompts for an interval: none is claimed.
    assert shares(full[:3], without[:, :3], alone[:, :3], seed=0).interval == [None] * 3


def test_groups_and_spec_checks() -> None:
    paths = [
        "model.layers.10.mlp.up_proj",
        "model.layers.2.self_attn.q_proj",
        "model.layers.2.self_attn.v_proj",
        "lm_head",
    ]
    assert list(resolve_groups(paths, "layers")) == ["layers.2", "layers.10", "lm_head"]
    assert resolve_groups(paths, "modules")["q_proj"] == ["model.layers.2.self_attn.q_proj"]
    assert resolve_groups(paths, ["*.layers.2.*"]) == {"*.layers.2.*": paths[1:3]}
    with pytest.raises(ValueError, match=r"'\*k_proj' matches no adapted module"):
        resolve_groups(paths, ["*k_proj"])
    assert "attribution" in REGISTRY and not REGISTRY["attribution"].gating
    base = {
        "version": 1,
        "models": {"ft": {"kind": "dummy", "base": "dummy", "adapter": "trained"}},
    }
    for groups, problem in (
        ("blocks", "groups: 'blocks' is not one of layers, modules"),
        ([], "groups: give 'layers', 'modules', or a non-empty list"),
        (["*q*", "*q*"], "groups: a glob is listed twice"),
    ):
        suite = [{"name": "a", "kind": "attribution", "groups": groups}]
        with pytest.raises(SpecError) as err:
            parse_spec({**base, "suite": suite})
        assert any(problem in p for p in err.value.problems), err.value.problems


def test_in_a_suite_it_reports_and_plots_without_gating(tmp_path: Path) -> None:
    """On the dummy (one adapted module): all of the effect on it; not part of the score."""
    from sway_common.backend.dummy import DummyDifferentialBackend

    spec = parse_spec(
        {
            "version": 1,
            "models": {"ft": {"kind": "dummy", "base": "dummy", "adapter": "trained"}},
            "suite": [
                {"name": "doc", "kind": "delta_kl", "prompts": PROMPTS},
                {"name": "where", "kind": "attribution", "prompts": PROMPTS, "max_groups": 1},
            ],
        }
    )
    result = run_suite(spec, backend=DummyDifferentialBackend())
    where = next(p for p in result.probes if p.name == "where")
    assert where.verdict is Verdict.PASS and not where.gating and where.score is None
    assert [g["group"] for g in where.evidence["groups"]] == ["lm_head"]
    assert where.evidence["groups"][0]["share"] == pytest.approx(1.0)
    assert "attribution" not in result.category_scores
    written = write_attribution_plots(SuiteResult.from_dict(result.to_dict()), tmp_path)
    assert written == [tmp_path / ATTRIBUTION_PNG] and written[0].stat().st_size > 5000
    spec.probes[1].groups = ["lm_*", "*head"]
    spec.probes[1].max_groups = 1
    capped = run_suite(spec, backend=DummyDifferentialBackend())
    assert capped.probes[-1].verdict is Verdict.ERROR
    assert "2 groups exceed max_groups=1" in capped.probes[-1].message
