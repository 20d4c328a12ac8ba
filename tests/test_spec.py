"""Spec loading: the sway.yaml v1 shape, every problem reported at once, did-you-mean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sway_common.probes.adapter_ablation import AdapterAblationConfig
from sway_common.probes.delta_kl import DeltaKLConfig
from sway_common.probes.null_adapter import NullAdapterConfig
from sway_common.probes.section_internalization import SectionInternalizationConfig
from sway_common.suite.spec import SpecError, load_spec, parse_spec

DLM_SWAY_SUITE = """
version: 1
models:
  base: {kind: hf, base: "HuggingFaceTB/SmolLM2-135M-Instruct"}
  ft:   {kind: hf, base: "HuggingFaceTB/SmolLM2-135M-Instruct",
         adapter: "./runs/adapter/v0003"}
defaults:
  seed: 0
  coverage_threshold: 0.6
suite:
  - {name: null_baseline,       kind: null_adapter, runs: 3}
  - {name: doc_divergence,      kind: delta_kl,
     prompts: ["The key insight is", "An important rule"]}
  - {name: section_attribution, kind: section_internalization}
  - {name: ablation_shape,      kind: adapter_ablation,
     prompts: ["Tell me more about"], lambdas: [0.0, 0.5, 1.0, 1.25]}
"""


def test_an_existing_dlm_sway_suite_loads(tmp_path: Path) -> None:
    path = tmp_path / "sway.yaml"
    path.write_text(DLM_SWAY_SUITE)
    spec = load_spec(path)
    kinds = [type(c) for c in spec.probes]
    assert kinds == [
        NullAdapterConfig,
        DeltaKLConfig,
        SectionInternalizationConfig,
        AdapterAblationConfig,
    ]
    assert spec.probes[0].runs == 3 and spec.null_calibration().runs == 3
    assert spec.probes[1].prompts == ["The key insight is", "An important rule"]
    assert spec.model.kind == "hf" and spec.model.adapter == "./runs/adapter/v0003"
    assert spec.defaults.coverage_threshold == 0.6


def test_relative_adapter_paths_resolve_against_the_spec_file(tmp_path: Path) -> None:
    (tmp_path / "runs" / "adapter" / "v0003").mkdir(parents=True)
    path = tmp_path / "sway.yaml"
    path.write_text(DLM_SWAY_SUITE)
    assert load_spec(path).model.adapter == str(tmp_path / "runs" / "adapter" / "v0003")


def test_json_specs_load_too(tmp_path: Path) -> None:
    path = tmp_path / "suite.json"
    path.write_text(
        json.dumps(
            {
                "version": 1,
                "models": {"ft": {"kind": "dummy", "base": "dummy", "adapter": "trained"}},
                "suite": [{"name": "dk", "kind": "delta_kl", "prompts": ["a"]}],
            }
        )
    )
    assert load_spec(path).probes[0].name == "dk"


def test_every_problem_is_reported_at_once_with_suggestions() -> None:
    data = {
        "version": 1,
        "models": {"ft": {"kind": "hf", "base": "m", "adaptr": "a"}},
        "defualts": {"seed": 0},
        "suite": [
            {"name": "dk", "kind": "delta_kl", "promts": ["x"]},
            {"name": "ab", "kind": "adapter_ablaton"},
            {"name": "nul", "kind": "null_adapter", "runs": "eight", "mode": "norm_match"},
        ],
    }
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    text = str(info.value)
    assert "models.ft.adaptr" in text and "did you mean 'adapter'" in text
    assert "defualts" in text and "did you mean 'defaults'" in text
    assert "suite[0] (dk).promts" in text and "did you mean 'prompts'" in text
    assert "adapter_ablaton" in text and "did you mean 'adapter_ablation'" in text
    assert "suite[2] (nul).runs: expected an integer" in text
    assert "did you mean 'norm_matched'" in text


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"name": "dk", "kind": "delta_kl", "prompts": []}, "needs at least one prompt"),
        ({"name": "dk", "kind": "delta_kl", "divergence": "tv"}, "is not one of 'js', 'kl'"),
        ({"name": "n", "kind": "null_adapter", "runs": 1}, "at least 2 null draws"),
        ({"name": "n", "kind": "null_adapter", "rank_multipliers": [1.0, 0.0]}, "rank_multipliers"),
        ({"name": "n", "kind": "null_adapter", "rank_multipliers": [1.0, 4.0]}, "mode: fixed"),
        ({"name": "a", "kind": "adapter_ablation", "lambdas": [0.0, 1.0]}, "at least 3 distinct"),
        (
            {"name": "a", "kind": "adapter_ablation", "assert_saturation_between": [0.3]},
            "expected 2 items",
        ),
        ({"kind": "delta_kl"}, "name: required field is missing"),
        ({"name": "x"}, "kind: required"),
    ],
)
def test_bad_entries_name_the_field(entry: dict, fragment: str) -> None:
    data = {"models": {"ft": {"base": "m", "adapter": "a"}}, "suite": [entry]}
    with pytest.raises(SpecError, match=fragment):
        parse_spec(data)


def test_model_problems() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(
            {
                "models": {"base": {"base": "other"}, "ft": {"kind": "mxl", "base": "m"}},
                "suite": [{"name": "a", "kind": "delta_kl"}, {"name": "a", "kind": "delta_kl"}],
            }
        )
    text = str(info.value)
    assert "did you mean 'mlx'" in text
    assert "models.ft.adapter: required" in text
    assert "differs from models.ft.base" in text
    assert "used twice" in text


def test_unreadable_or_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("suite: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
