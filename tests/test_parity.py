"""MLX and HF backends agree: same model dir, same adapter, float32 on both.

Per-token log-probabilities within 1e-3 nats, the same top-1 next token, the same
verdicts on the same suite; for a PEFT adapter, an mlx-lm-trained adapter (native on
MLX, converted on HF), a DoRA adapter, and a λ-scaled view.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx_lm")
pytest.importorskip("peft")

import fixtures_build  # noqa: E402  (tests/ is on sys.path through conftest)

from sway_common.suite.runner import run_suite  # noqa: E402
from sway_common.suite.spec import quick_suite  # noqa: E402
from sway_hf.backend import HFDifferentialBackend  # noqa: E402
from sway_mlx.backend import MLXDifferentialBackend  # noqa: E402

pytestmark = [pytest.mark.mlx, pytest.mark.hf]

TOL = 1e-3
# Top-1 may differ only where the two best tokens are closer than float32 noise.
TIE = 1e-3
TEXTS = [
    *fixtures_build.document_chunks(200)[:4],
    "The quick brown fox jumps over the lazy dog. The answer is simple.",
    "What is the capital of France? The capital of France is Paris. Two plus two is four.",
]


def rolling_gap(mlx_b, hf_b, opener: str, *args, **kw) -> float:
    worst = 0.0
    for text in TEXTS:
        with getattr(mlx_b, opener)(*args, **kw) as m:
            a = m.rolling_logprob(text)
        with getattr(hf_b, opener)(*args, **kw) as h:
            b = h.rolling_logprob(text)
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        worst = max(worst, float(np.abs(a.logprobs - b.logprobs).max()))
    return worst


def prefixes(backend, n_max: int = 40) -> list[str]:
    """Every token-boundary prefix of the texts (up to ``n_max`` per text)."""
    out = []
    for text in TEXTS:
        _, offsets = backend.runtime.encode(text)
        ends = sorted({end for _, end in offsets if end > 0})
        out += [text[:e] for e in ends[:n_max]]
    return out


def next_token_rows(backend, opener: str, *args, **kw) -> np.ndarray:
    """Full-vocabulary next-token log-probs at every token-boundary prefix of the texts."""
    prompts = prefixes(backend, 12)
    with getattr(backend, opener)(*args, **kw) as view:
        dists = view.next_token_dist_batch(prompts, top_k=backend.vocab_size)
    rows = np.empty((len(dists), backend.vocab_size), np.float32)
    for i, d in enumerate(dists):
        rows[i, d.token_ids] = d.logprobs
    return rows


def top1_mismatches(mlx_b, hf_b, opener: str, n_max: int = 40) -> list[str]:
    prompts = prefixes(mlx_b, n_max)
    with getattr(mlx_b, opener)() as m:
        a = m.next_token_dist_batch(prompts, top_k=2)
    with getattr(hf_b, opener)() as h:
        b = h.next_token_dist_batch(prompts, top_k=2)
    bad = []
    for p, x, y in zip(prompts, a, b, strict=True):
        if x.token_ids[0] == y.token_ids[0]:
            continue
        if min(x.logprobs[0] - x.logprobs[1], y.logprobs[0] - y.logprobs[1]) >= TIE:
            bad.append(p)
    return bad


def _pair(model_dir: Path, adapter: Path):
    return (
        MLXDifferentialBackend(model_dir, adapter, dtype="float32", batch_size=4),
        HFDifferentialBackend(model_dir, adapter, dtype="float32", device="cpu", batch_size=4),
    )


@pytest.fixture(scope="module", params=["peft", "mlx_lm"])
def pair(request, tiny_model_dir: Path):
    adapter = request.getfixturevalue(
        "tiny_peft_adapter" if request.param == "peft" else "tiny_mlx_adapter"
    )
    mlx_b, hf_b = _pair(tiny_model_dir, adapter)
    yield mlx_b, hf_b
    mlx_b.close()
    hf_b.close()


def test_same_adapter_content(pair) -> None:
    mlx_b, hf_b = pair
    assert mlx_b.adapter_hash == hf_b.adapter_hash
    for key in ("rank", "targets", "modules", "dora"):
        assert mlx_b.info[key] == hf_b.info[key], key


@pytest.mark.parametrize("opener", ["as_base", "as_finetuned"])
def test_rolling_logprob_parity(pair, opener: str) -> None:
    assert rolling_gap(*pair, opener) <= TOL


def test_scaled_view_parity(pair) -> None:
    assert rolling_gap(*pair, "as_scaled_adapter", 0.5) <= TOL


@pytest.mark.parametrize("opener", ["as_base", "as_finetuned"])
def test_same_top1_everywhere(pair, opener: str) -> None:
    assert top1_mismatches(*pair, opener) == []


@pytest.mark.parametrize(
    "null", [{"mode": "fixed", "init_scale": 0.2}, {"mode": "norm_matched"}], ids=["fixed", "norm"]
)
def test_null_view_parity(pair, null: dict) -> None:
    """The same seed is the same null on both backends: one recipe, drawn in numpy."""
    mlx_b, hf_b = pair
    mlx_rows = next_token_rows(mlx_b, "as_null_adapter", 5, **null)
    gap = float(np.abs(mlx_rows - next_token_rows(hf_b, "as_null_adapter", 5, **null)).max())
    assert gap <= TOL
    assert rolling_gap(mlx_b, hf_b, "as_null_adapter", 5, **null) <= TOL
    # Parity at 1e-3 only means something if the null moves the model far more than
    # that, and if another seed would not pass it too.
    assert np.abs(mlx_rows - next_token_rows(mlx_b, "as_base")).max() > 50 * TOL
    assert np.abs(mlx_rows - next_token_rows(hf_b, "as_null_adapter", 6, **null)).max() > 50 * TOL


def test_ft_really_differs_from_base(pair) -> None:
    mlx_b, _ = pair
    with mlx_b.as_base() as v:
        base = v.rolling_logprob(TEXTS[0]).logprobs
    with mlx_b.as_finetuned() as v:
        ft = v.rolling_logprob(TEXTS[0]).logprobs
    # Parity at 1e-3 only means something if the adapter moves far more than that.
    assert np.abs(ft - base).max() > 50 * TOL


def test_same_verdicts_on_the_same_suite(pair) -> None:
    prompts = [t[:40] for t in TEXTS]
    results = [run_suite(quick_suite(prompts, runs=6), backend=b) for b in pair]
    kinds = [[(p.kind, p.verdict) for p in r.probes] for r in results]
    assert kinds[0] == kinds[1]
    assert results[0].verdict == results[1].verdict


def test_dora_parity(tiny_model_dir: Path, tiny_dora_adapter: Path) -> None:
    mlx_b, hf_b = _pair(tiny_model_dir, tiny_dora_adapter)
    try:
        for opener, args in (
            ("as_base", ()),
            ("as_finetuned", ()),
            ("as_scaled_adapter", (0.5,)),
            ("as_null_adapter", (5,)),
        ):
            assert rolling_gap(mlx_b, hf_b, opener, *args) <= TOL, opener
        assert rolling_gap(mlx_b, hf_b, "as_null_adapter", 5, mode="norm_matched") <= TOL
    finally:
        mlx_b.close()
        hf_b.close()


def test_non_suffix_layers_and_per_module_ranks(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A PEFT adapter on layer 0 only (not the last N), all Linear kinds, mixed ranks/alphas."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        layers_to_transform=[0],
        rank_pattern={"down_proj": 2, "q_proj": 6},
        alpha_pattern={"o_proj": 3},
    )
    model = get_peft_model(hf, cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(str(tmp_path / "mixed"))
    mlx_b, hf_b = _pair(tiny_model_dir, tmp_path / "mixed")
    try:
        assert mlx_b.info["modules"] == hf_b.info["modules"] == 7
        assert mlx_b.info["rank"] == hf_b.info["rank"] == [2, 4, 6]
        assert {s.path.split(".")[2] for s in mlx_b.runtime.slots} == {"0"}
        for opener in ("as_base", "as_finetuned"):
            assert rolling_gap(mlx_b, hf_b, opener) <= TOL, opener
        with mlx_b.as_base() as v:
            base = v.rolling_logprob(TEXTS[0]).logprobs
        with mlx_b.as_finetuned() as v:
            assert np.abs(v.rolling_logprob(TEXTS[0]).logprobs - base).max() > 50 * TOL
    finally:
        mlx_b.close()
        hf_b.close()


@pytest.mark.slow
def test_smollm2_mlx_lm_adapter_parity_and_verdicts(
    smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SmolLM2-135M with an adapter trained by mlx-lm: native on MLX, converted on HF."""
    from test_mlx_e2e import PROMPTS, smollm2_trained_adapter

    adapter = smollm2_trained_adapter(smollm2_dir, tmp_path_factory)
    mlx_b, hf_b = _pair(smollm2_dir, adapter)
    try:
        assert mlx_b.adapter_hash == hf_b.adapter_hash
        for opener in ("as_base", "as_finetuned"):
            assert rolling_gap(mlx_b, hf_b, opener) <= TOL, opener
            assert top1_mismatches(mlx_b, hf_b, opener, n_max=8) == [], opener
        results = [run_suite(quick_suite(PROMPTS, runs=4), backend=b) for b in (mlx_b, hf_b)]
        verdicts = [[(p.kind, p.verdict) for p in r.probes] for r in results]
        assert verdicts[0] == verdicts[1]
        assert all(
            {p.kind: p for p in r.probes}["delta_kl"].verdict.value == "PASS" for r in results
        )
    finally:
        mlx_b.close()
        hf_b.close()
