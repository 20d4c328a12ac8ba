"""Spec loading for the likelihood kinds: every dlm-sway 0.1.0 kind loads, files are checked up front."""

from __future__ import annotations

from pathlib import Path

import pytest

from sway_common.backend.dummy import DummyDifferentialBackend
from sway_common.report import headline
from sway_common.suite.runner import run_suite
from sway_common.suite.spec import (
    SpecError,
    load_spec,
    parse_spec,
    quick_suite,
)
from sway_common.types import Verdict

# One entry of every kind dlm-sway 0.1.0 knows, with its own field names.
DLM_SWAY_KINDS = """
version: 1
models:
  ft: {kind: dummy, base: dummy, adapter: trained}
suite:
  - {name: nulls, kind: null_adapter, runs: 3, init_scale: 0.02, seed_base: 1000}
  - {name: dk, kind: delta_kl, prompts: ["The keeper"], divergence: js, assert_mean_gte: 0.02}
  - {name: ab, kind: adapter_ablation, prompts: ["The keeper"], lambdas: [0, 0.5, 1, 1.25]}
  - {name: drift, kind: calibration_drift, pack: builtin, items_limit: 12,
     items: [["Two plus two is", " four"]], regression_nats: 1.0,
     assert_fraction_regressed_lt: 0.15, assert_mean_delta_gte: -0.5}
  - {name: ppl, kind: external_perplexity, corpus: prose.txt, chunk_chars: 256, max_chunks: 2,
     assert_mean_delta_gte: -0.1}
  - {name: pf, kind: preference_flip, min_triples_for_decision: 3, assert_flip_rate_gte: 0.7,
     triples: [{prompt: "The keeper", chosen: " ate", rejected: " qz"}]}
  - {name: pi, kind: paraphrase_invariance, intent: generalize, min_verbatim_lift: 0.2,
     min_generalization_ratio: 0.5,
     cases: [{prompt: "The lamp was lit by", gold: " the keeper", paraphrases: ["Who lit it?"]}]}
  - {name: si, kind: section_internalization, doc: doc.md, include_kinds: [prose],
     per_section_threshold: 0.05, assert_passing_section_frac: 0.5, max_prose_chars: 400}
  - {name: pc, kind: prompt_collapse, prompts: ["The keeper"], context_lengths: [0, 16],
     assert_half_life_tokens: 512}
  - {name: ck, kind: cluster_kl, num_clusters: 5, min_prompts: 20, assert_specificity_gte: 0.6,
     embedding_model: sentence-transformers/all-MiniLM-L6-v2}
  - {name: sf, kind: style_fingerprint, prompts: ["The keeper"], max_new_tokens: 16,
     doc_reference: "Wind north. Sea rough.", assert_shift_gte: 0.25}
  - {name: lk, kind: leakage, prefix_chars: 128}
  - {name: ar, kind: adapter_revert, max_new_tokens: 8, base_gold_similarity_cap: 0.75,
     assert_revert_rate_lt: 0.25, embedding_model: sentence-transformers/all-MiniLM-L6-v2,
     cases: [{prompt: "The lamp was lit by", gold: " the keeper", paraphrases: ["Who lit it?"]}]}
"""


@pytest.fixture
def spec_dir(tmp_path: Path) -> Path:
    (tmp_path / "sway.yaml").write_text(DLM_SWAY_KINDS, encoding="utf-8")
    (tmp_path / "prose.txt").write_text(
        "Plain prose about rivers and hills. " * 20, encoding="utf-8"
    )
    (tmp_path / "doc.md").write_text(
        "# A\nThe keeper lit the lamp.\n\n# B\nThe cat slept.\n", encoding="utf-8"
    )
    return tmp_path


def test_every_dlm_sway_kind_loads_and_runs(spec_dir: Path) -> None:
    spec = load_spec(spec_dir / "sway.yaml")
    assert spec.probes[4].corpus == str(spec_dir / "prose.txt")  # relative to the spec file
    assert spec.probes[7].doc == str(spec_dir / "doc.md")
    result = run_suite(spec, backend=DummyDifferentialBackend())
    verdicts = {p.kind: p for p in result.probes}
    assert len(verdicts) == 13
    assert not [p.message for p in result.probes if p.verdict is Verdict.ERROR]
    # The generation kinds run here; the dummy writes one repeated letter, which is no
    # style and no answer: WARN, never PASS.
    for kind in ("style_fingerprint", "adapter_revert"):
        assert verdicts[kind].verdict in (Verdict.WARN, Verdict.FAIL), verdicts[kind].message
    # leakage runs here: without a `doc:` it has no training text to test, and says so.
    assert verdicts["leakage"].verdict is Verdict.SKIP and "no doc" in verdicts["leakage"].message
    # A hub embedding model is not fetched: the base model's own states stand in.
    assert (
        "base model's mean-pooled hidden states"
        in verdicts["cluster_kl"].evidence.get("embeddings", "")
        or verdicts["cluster_kl"].verdict is Verdict.WARN
    )


def test_unknown_kinds_stay_errors_with_a_suggestion() -> None:
    with pytest.raises(SpecError, match="did you mean 'calibration_drift'"):
        parse_spec(
            {
                "models": {"ft": {"base": "m", "adapter": "a"}},
                "suite": [{"name": "x", "kind": "calibration_drfit"}],
            }
        )


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"kind": "calibration_drift", "pack": "missing.jsonl"}, "pack: "),
        ({"kind": "calibration_drift", "items": [["only a prompt"]]}, "expected 2 items"),
        ({"kind": "calibration_drift", "pack": "none"}, "give at least one"),
        ({"kind": "external_perplexity", "corpus": "missing.txt"}, "corpus: "),
        (
            {"kind": "preference_flip", "triples": [{"prompt": "p", "chosen": "c"}]},
            "needs rejected",
        ),
        ({"kind": "paraphrase_invariance", "cases": [{"prompt": "p", "gold": "g"}]}, "paraphrases"),
        (
            {"kind": "paraphrase_invariance", "cases": [], "intent": "memorise"},
            "did you mean 'memorize'",
        ),
        ({"kind": "section_internalization", "doc": "missing.md"}, "doc: "),
        ({"kind": "prompt_collapse", "context_lengths": [0]}, "at least one length > 0"),
        ({"kind": "cluster_kl", "num_clusters": 1}, "num_clusters"),
    ],
)
def test_bad_likelihood_entries_fail_before_any_model_loads(entry: dict, fragment: str) -> None:
    data = {"models": {"ft": {"base": "m", "adapter": "a"}}, "suite": [{"name": "x", **entry}]}
    with pytest.raises(SpecError, match=fragment):
        parse_spec(data)


def test_quick_eval_asks_whether_general_knowledge_survived() -> None:
    spec = quick_suite(["The keeper said", "In the storm"], runs=4)
    kinds = [c.kind for c in spec.probes]
    assert "calibration_drift" in kinds and "external_perplexity" in kinds
    result = run_suite(spec, backend=DummyDifferentialBackend())
    drift = next(p for p in result.probes if p.kind == "calibration_drift")
    assert drift.evidence["items"] == 24
    assert "general knowledge" in headline(result)


def test_the_headline_says_when_general_knowledge_was_lost() -> None:
    spec = quick_suite(["The keeper said", "In the storm"], runs=4)
    result = run_suite(spec, backend=DummyDifferentialBackend(adapter_strength=40.0))
    line = headline(result)
    assert result.verdict is Verdict.FAIL
    assert "lost general knowledge" in line and "\n" not in line
