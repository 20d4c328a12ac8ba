"""The likelihood probes on the tiny Llama, through both real backends.

The same suite, the same adapter, MLX and HF: the probes must run end to end through
each backend's batched ops and reach the same verdicts (the null recipe is shared, so
even the null draws agree); a B ≈ 0 copy of the trained adapter must PASS nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from adapter_variants import b_scaled

from sway_common.suite.runner import run_suite
from sway_common.suite.spec import parse_spec
from sway_common.types import Verdict

DOC = Path(__file__).resolve().parent / "data" / "harrowgate.md"
PROMPTS = ["The Harrowgate lighthouse", "The keeper", "In the storm of", "The lamp burned"]
SUITE = [
    {"name": "nulls", "kind": "null_adapter", "runs": 3},
    # The random tiny model knows no fact: with k its whole vocabulary every item counts.
    {"name": "drift", "kind": "calibration_drift", "items_limit": 16, "known_top_k": 384},
    {"name": "prose", "kind": "external_perplexity", "max_chunks": 3, "chunk_chars": 300},
    {
        "name": "prefs",
        "kind": "preference_flip",
        "min_triples_for_decision": 1,
        "triples": [
            {"prompt": "The lighthouse was first lit in", "chosen": " 1861", "rejected": " 1901"},
            {"prompt": "Its beam flashes", "chosen": " green", "rejected": " white"},
            {"prompt": "The cat was named", "chosen": " Admiral", "rejected": " Captain"},
        ],
    },
    {
        "name": "para",
        "kind": "paraphrase_invariance",
        "cases": [
            {
                "prompt": "The lighthouse stands on",
                "gold": " Quill Point",
                "paraphrases": ["The tower was built on"],
            },
        ],
    },
    {
        "name": "sections",
        "kind": "section_internalization",
        "doc": str(DOC),
        "max_prose_chars": 300,
        "leak_chunks": 2,
    },
    {
        "name": "collapse",
        "kind": "prompt_collapse",
        "prompts": PROMPTS,
        "context_lengths": [0, 24, 48],
    },
    {
        "name": "clusters",
        "kind": "cluster_kl",
        "min_prompts": 8,
        "num_clusters": 3,
        "prompts": [
            *PROMPTS,
            "Two plus two is",
            "The capital of France is",
            "Once upon a time",
            "The sky is",
        ],
    },
]


def _backend(kind: str, model_dir: Path, adapter: Path):
    if kind == "mlx":
        from sway_mlx.backend import MLXDifferentialBackend

        return MLXDifferentialBackend(model_dir, adapter, dtype="float32", batch_size=8)
    from sway_hf.backend import HFDifferentialBackend

    return HFDifferentialBackend(model_dir, adapter, dtype="float32", device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def untrained(tiny_peft_adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return b_scaled(tiny_peft_adapter, tmp_path_factory.mktemp("tiny_b_tiny") / "adapter")


@pytest.fixture(scope="module")
def verdicts(tiny_model_dir: Path, tiny_peft_adapter: Path, untrained: Path) -> dict:
    spec = parse_spec(
        {"version": 1, "models": {"ft": {"base": "b", "adapter": "a"}}, "suite": SUITE}
    )
    out = {}
    for kind in ("mlx", "hf"):
        backend = _backend(kind, tiny_model_dir, tiny_peft_adapter)
        try:
            for label, adapter in (("trained", tiny_peft_adapter), ("untrained", untrained)):
                backend.set_adapter(adapter)
                out[kind, label] = {p.kind: p for p in run_suite(spec, backend=backend).probes}
        finally:
            backend.close()
    return out


KINDS = [e["kind"] for e in SUITE[1:]]


@pytest.mark.parametrize("kind", KINDS)
def test_runs_on_both_backends_with_the_same_verdict(verdicts, kind: str) -> None:
    for label in ("trained", "untrained"):
        mlx, hf = verdicts["mlx", label][kind], verdicts["hf", label][kind]
        assert mlx.verdict is not Verdict.ERROR, mlx.message
        assert hf.verdict is not Verdict.ERROR, hf.message
        assert mlx.verdict is hf.verdict, f"{label}: mlx {mlx.message} / hf {hf.message}"


# Harm probes PASS an adapter that did no damage: true of one that changes nothing.
HARM = ("calibration_drift", "external_perplexity")


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in HARM])
def test_an_adapter_with_b_near_zero_passes_no_effect_probe(verdicts, kind: str) -> None:
    for backend in ("mlx", "hf"):
        r = verdicts[backend, "untrained"][kind]
        assert r.verdict is not Verdict.PASS, f"{backend}: {r.message}"


@pytest.mark.parametrize("kind", HARM)
def test_an_adapter_with_b_near_zero_is_not_failed_for_harm(verdicts, kind: str) -> None:
    for backend in ("mlx", "hf"):
        r = verdicts[backend, "untrained"][kind]
        assert r.verdict is Verdict.PASS, f"{backend}: {r.message}"


def test_the_trained_adapter_internalises_its_document(verdicts) -> None:
    for backend in ("mlx", "hf"):
        sections = verdicts[backend, "trained"]["section_internalization"]
        assert sections.verdict is Verdict.PASS, sections.message
        assert sections.raw >= 0.5


def test_cluster_kl_embeds_with_the_base_model(verdicts) -> None:
    for backend in ("mlx", "hf"):
        ev = verdicts[backend, "trained"]["cluster_kl"].evidence
        assert ev["embeddings"].startswith("base model's mean-pooled hidden states")
        assert ev["clusters"] == 3 and len(ev["labels"]) == 8


def test_a_local_embedding_model_is_honoured(tiny_model_dir: Path, tiny_peft_adapter: Path) -> None:
    from sway_common.backend.dummy import DummyDifferentialBackend

    cfg = {
        "name": "c",
        "kind": "cluster_kl",
        "min_prompts": 8,
        "num_clusters": 2,
        "embedding_model": str(tiny_model_dir),
        "prompts": SUITE[-1]["prompts"],
    }
    spec = parse_spec(
        {"version": 1, "models": {"ft": {"base": "b", "adapter": "a"}}, "suite": [cfg]}
    )
    result = run_suite(spec, backend=DummyDifferentialBackend()).probes[-1]
    assert result.evidence["embeddings"] == f"local model {tiny_model_dir}"
