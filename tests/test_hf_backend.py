"""The HF + PEFT backend on the tiny fixtures: views, nulls, batching, scoring, loading."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

import fixtures_build  # noqa: E402  (tests/ is on sys.path through conftest)
from safetensors.torch import load_file, save_file  # noqa: E402

from sway_common.backend.scoring import completion_start, rolling_windows  # noqa: E402
from sway_common.protocols import ViewConflictError  # noqa: E402
from sway_hf import backend as hf_backend  # noqa: E402
from sway_hf import lora  # noqa: E402
from sway_hf.backend import HFDifferentialBackend, pick_dtype  # noqa: E402

pytestmark = pytest.mark.hf

PROMPTS = [
    "The lighthouse",
    "The quick brown fox jumps over the lazy dog. The answer is",
    "A",
    "Fenwick's ledger records the tide, the weather and",
    "What is the capital of France?",
]
LONG_TEXT = (
    "The Harrowgate lighthouse stands on Quill Point, a granite spur at the mouth of the "
    "Merrow estuary. It was lit for the first time on the ninth of March 1861 by keeper "
    "Odile Fenwick, who kept the lamp for thirty-two winters."
)


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path, tiny_peft_adapter: Path):
    b = HFDifferentialBackend(tiny_model_dir, tiny_peft_adapter, batch_size=3)
    yield b
    b.close()


def _full(view, prompts: list[str]) -> np.ndarray:
    """Full-vocabulary log-probs per prompt, indexed by token id."""
    dists = view.next_token_dist_batch(prompts, top_k=10**9)
    out = np.empty((len(dists), dists[0].vocab_size), np.float32)
    for i, d in enumerate(dists):
        out[i, d.token_ids] = d.logprobs
    return out


def _lora_tensors(b: HFDifferentialBackend) -> dict[str, torch.Tensor]:
    return {f"{s.path}.{k}": t.detach().clone() for s in b.slots for k, t in s.tensors().items()}


def _delta(slot: lora.LoraSlot) -> torch.Tensor:
    return slot.b.detach().double() @ slot.a.detach().double()


# --------------------------------------------------------------------- views
def test_scaled_zero_is_base_and_one_is_finetuned_exactly(backend) -> None:
    with backend.as_base() as v:
        base = _full(v, PROMPTS)
    with backend.as_finetuned() as v:
        ft = _full(v, PROMPTS)
    with backend.as_scaled_adapter(0.0) as v:
        zero = _full(v, PROMPTS)
    with backend.as_scaled_adapter(1.0) as v:
        one = _full(v, PROMPTS)
    with backend.as_scaled_adapter(0.5) as v:
        half = _full(v, PROMPTS)
    assert np.array_equal(zero, base)
    assert np.array_equal(one, ft)
    assert np.abs(ft - base).max() > 1e-3, "the trained adapter should move the model"
    assert np.abs(half - base).max() > 1e-4 and np.abs(half - ft).max() > 1e-4
    # Plain LoRA at scaling 0 adds exact zeros, so the scaling path itself agrees too.
    ids = [backend._encode(p)[0] for p in PROMPTS]
    restore = lora.install_scaled(backend.slots, backend.adapter, 0.0)
    try:
        scaled_zero = backend._last_logprobs(ids)
    finally:
        restore()
    with backend.as_base():
        assert np.array_equal(scaled_zero, backend._last_logprobs(ids))


def test_null_view_restores_real_adapter_after_raise(backend) -> None:
    real = _lora_tensors(backend)
    scalings = [s.layer.scaling[backend.adapter] for s in backend.slots]
    ids = [backend._encode(p)[0] for p in PROMPTS]
    with backend.as_finetuned():
        ft_before = backend._last_logprobs(ids)
    with pytest.raises(RuntimeError, match="boom"), backend.as_null_adapter(7) as v:
        v.next_token_dist(PROMPTS[0])
        inside = _lora_tensors(backend)
        assert all(not torch.equal(inside[k], real[k]) for k in real)
        raise RuntimeError("boom")
    assert backend.active_view is None
    after = _lora_tensors(backend)
    assert all(torch.equal(after[k], real[k]) for k in real)
    assert [s.layer.scaling[backend.adapter] for s in backend.slots] == scalings
    with backend.as_finetuned():
        assert np.array_equal(backend._last_logprobs(ids), ft_before)


def test_scaled_view_restores_scaling_after_raise(backend) -> None:
    scalings = [s.layer.scaling[backend.adapter] for s in backend.slots]
    with pytest.raises(KeyError), backend.as_scaled_adapter(1.7):
        assert backend.slots[0].layer.scaling[backend.adapter] == pytest.approx(scalings[0] * 1.7)
        raise KeyError("x")
    assert [s.layer.scaling[backend.adapter] for s in backend.slots] == scalings


def test_two_open_views_conflict_and_closed_view_raises(backend) -> None:
    with backend.as_base() as v:
        with pytest.raises(ViewConflictError), backend.as_finetuned():
            pass
        with pytest.raises(ViewConflictError), backend.as_null_adapter(1):
            pass
        assert backend.active_view is v.spec
        v.next_token_dist(PROMPTS[0])
    with pytest.raises(ViewConflictError):
        v.next_token_dist(PROMPTS[1])
    with pytest.raises(ViewConflictError):
        v.logprob_of("The", " lighthouse")
    with backend.as_finetuned(), pytest.raises(ViewConflictError):
        backend.set_adapter(backend.adapter_path)


# ------------------------------------------------------------------ batching
def test_batched_equals_per_prompt(backend) -> None:
    completions = [" stands", " over the lazy dog", " b", " and the wind", " Paris."]
    with backend.as_finetuned() as v:
        backend._cache.clear()
        batched = _full(v, PROMPTS)
        batched_lp = v.logprob_of_batch(PROMPTS, completions)
        backend._cache.clear()
        single = np.concatenate([_full(v, [p]) for p in PROMPTS])
        single_lp = [v.logprob_of(p, c) for p, c in zip(PROMPTS, completions, strict=True)]
    np.testing.assert_allclose(batched, single, atol=1e-5, rtol=0)
    np.testing.assert_allclose(batched_lp, single_lp, atol=1e-5, rtol=0)


def test_token_logprobs_chunking_is_exact(backend, monkeypatch) -> None:
    ids = [backend._encode(t)[0] for t in (LONG_TEXT, PROMPTS[1], PROMPTS[2])]
    with backend.as_finetuned():
        whole = backend._token_logprobs(ids)
        monkeypatch.setattr(hf_backend, "LOGIT_BUDGET", backend.vocab_size * 5)
        chunked = backend._token_logprobs(ids)
    for w, c, row in zip(whole, chunked, ids, strict=True):
        assert w.dtype == np.float32 and w.shape == (len(row) - 1,)
        np.testing.assert_allclose(w, c, atol=1e-6, rtol=0)


def test_full_logits_fallback_agrees_with_split_head(backend, monkeypatch) -> None:
    assert backend._split_head, "a Llama's body + lm_head is its forward"
    ids = [backend._encode(t)[0] for t in (LONG_TEXT, PROMPTS[1], PROMPTS[2])]
    with backend.as_finetuned():
        last, tokens = backend._last_logprobs(ids), backend._token_logprobs(ids)
        monkeypatch.setattr(backend, "_split_head", False)
        np.testing.assert_allclose(backend._last_logprobs(ids), last, atol=1e-5)
        for got, want in zip(backend._token_logprobs(ids), tokens, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5)


# ----------------------------------------------------------------- scoring
def _direct_token_logprobs(backend, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        t = torch.tensor([ids])
        logp = torch.log_softmax(backend.model(input_ids=t).logits.float(), dim=-1)[0]
    return logp[:-1].gather(-1, t[0, 1:, None])[:, 0].numpy()


@pytest.mark.parametrize("which", ["base", "ft"])
def test_logprob_of_matches_direct_forward(backend, which: str) -> None:
    prompt, completion = "The lighthouse stands on", " Quill Point, a granite spur"
    opener = backend.as_base if which == "base" else backend.as_finetuned
    with opener() as v:
        got = v.logprob_of(prompt, completion)
        ids, offsets = backend._encode(prompt + completion)
        start = completion_start(offsets, len(prompt))
        direct = _direct_token_logprobs(backend, ids)
        want = float(np.sum(direct[start - 1 :], dtype=np.float64))
        last = backend.next_token_dists(v.spec, [prompt], 10**9)[0]
        with torch.no_grad():
            logits = backend.model(input_ids=torch.tensor([backend._encode(prompt)[0]])).logits
        full = torch.log_softmax(logits[0, -1].float(), -1).numpy()
    assert 0 < start < len(ids)
    assert got == pytest.approx(want, abs=1e-4)
    np.testing.assert_allclose(full[last.token_ids], last.logprobs, atol=1e-5)


def test_rolling_logprob_windows_match_direct(backend, monkeypatch) -> None:
    monkeypatch.setattr(backend, "max_context", 16)
    text = LONG_TEXT + " (rolling)"  # a text no other test has cached
    with backend.as_finetuned() as v:
        rolled = v.rolling_logprob(text)
        ids = rolled.token_ids.tolist()
        windows = rolling_windows(len(ids), 16)
        direct = [_direct_token_logprobs(backend, ids[w.start : w.end]) for w in windows]
    assert len(ids) > 3 * 16, "the text must span several windows"
    assert rolled.logprobs.shape == (len(ids) - 1,)
    np.testing.assert_allclose(rolled.logprobs[:15], direct[0], atol=1e-5)
    expected = np.concatenate(
        [d[w.score_from - w.start - 1 :] for d, w in zip(direct, windows, strict=True)]
    )
    np.testing.assert_allclose(rolled.logprobs, expected, atol=1e-5)


# -------------------------------------------------------------------- nulls
def test_null_variance_is_linear_in_rank_scale(backend) -> None:
    variances = {}
    for rank_scale in (1.0, 2.0, 4.0):
        values = []
        for i in range(8):
            with backend.as_null_adapter(100 * int(rank_scale) + i, rank_scale=rank_scale):
                values.append(torch.cat([_delta(s).flatten() for s in backend.slots]))
        variances[rank_scale] = float(torch.cat(values).var())
    rank = backend.slots[0].rank
    assert variances[1.0] == pytest.approx(rank * 0.02**4, rel=0.1)
    assert variances[2.0] / variances[1.0] == pytest.approx(2.0, rel=0.1)
    assert variances[4.0] / variances[1.0] == pytest.approx(4.0, rel=0.1)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="rank_scale"), backend.as_null_adapter(1, rank_scale=bad):
            pass
    assert backend.active_view is None


def test_norm_matched_null_has_real_module_norms(backend) -> None:
    from sway_common.adapters import read_adapter

    real = {s.path: float(torch.linalg.norm(_delta(s))) * s.scale for s in backend.slots}
    from_file = read_adapter(backend.adapter_path).frobenius_norms()
    for path, norm in real.items():
        assert from_file[path] == pytest.approx(norm, rel=1e-4)
    with backend.as_null_adapter(3, mode="norm_matched"):
        matched = {s.path: float(torch.linalg.norm(_delta(s))) * s.scale for s in backend.slots}
        inside = _lora_tensors(backend)
    with backend.as_null_adapter(3, mode="fixed"):
        fixed = {s.path: float(torch.linalg.norm(_delta(s))) * s.scale for s in backend.slots}
        inside_fixed = _lora_tensors(backend)
    for path in real:
        assert matched[path] == pytest.approx(real[path], rel=1e-4)
        assert fixed[path] != pytest.approx(real[path], rel=1e-2)
    # Same seed, same direction: norm matching only rescales B.
    for key, value in inside.items():
        if key.endswith("lora_A"):
            assert torch.equal(value, inside_fixed[key])


def test_null_seed_determinism(backend) -> None:
    def draw(seed: int) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        with backend.as_null_adapter(seed) as v:
            return _lora_tensors(backend), _full(v, PROMPTS[:2])

    t1, d1 = draw(11)
    backend._cache.clear()  # make the second draw run the model again
    t1b, d1b = draw(11)
    t2, d2 = draw(12)
    assert all(torch.equal(t1[k], t1b[k]) for k in t1)
    assert np.array_equal(d1, d1b)
    assert all(not torch.equal(t1[k], t2[k]) for k in t1)
    assert np.abs(d1 - d2).max() > 1e-6
    # Seeds come from a content hash of (seed, module path), not from salted hash().
    assert lora.module_seed(11, "a") == lora.module_seed(11, "a") != lora.module_seed(11, "b")


# ------------------------------------------------------------------ loading
def test_info_and_hash(backend, tiny_peft_adapter: Path) -> None:
    from sway_common.adapters import read_adapter

    info = backend.info
    assert info["backend"] == "hf" and info["rank"] == 4 and info["alpha"] == 8
    assert info["targets"] == ["q_proj", "v_proj"] and info["dtype"] == "float32"
    assert info["device"] == "cpu" and info["modules"] == 4
    assert backend.adapter_hash == read_adapter(tiny_peft_adapter).content_hash
    assert backend.max_context == 256 and backend.vocab_size == 384


def test_mlx_adapter_loads_through_conversion(tiny_model_dir: Path, tiny_mlx_adapter: Path) -> None:
    from sway_common.adapters import read_adapter

    weights = read_adapter(tiny_mlx_adapter)
    with HFDifferentialBackend(tiny_model_dir, tiny_mlx_adapter) as b:
        assert b.adapter_hash == weights.content_hash
        assert {s.path for s in b.slots} == set(weights.modules)
        for slot in b.slots:
            module = weights.modules[slot.path]
            np.testing.assert_allclose(slot.a.detach().numpy(), np.asarray(module.a), atol=1e-7)
            np.testing.assert_allclose(slot.b.detach().numpy(), np.asarray(module.b), atol=1e-7)
            assert slot.scale == pytest.approx(float(module.scale))
        with b.as_base() as v:
            base = _full(v, PROMPTS)
        with b.as_finetuned() as v:
            ft = _full(v, PROMPTS)
        assert np.abs(ft - base).max() > 1e-4


def test_set_adapter_swaps_without_reloading_base(
    backend, tiny_model_dir: Path, tiny_peft_adapter: Path, tiny_mlx_adapter: Path
) -> None:
    with HFDifferentialBackend(tiny_model_dir, tiny_peft_adapter) as b:
        base_model = b._causal_lm.model.embed_tokens.weight
        with b.as_base() as v:
            base = _full(v, PROMPTS)
        with b.as_finetuned() as v:
            ft_peft = _full(v, PROMPTS)
        peft_hash = b.adapter_hash
        b.set_adapter(tiny_mlx_adapter)
        assert b._causal_lm.model.embed_tokens.weight is base_model
        assert b.adapter_hash != peft_hash and len(b.slots) == 4
        misses = b._cache.misses
        with b.as_base() as v:
            assert np.array_equal(_full(v, PROMPTS), base)
        assert b._cache.misses == misses, "base-view results must stay cached"
        with b.as_finetuned() as v:
            ft_mlx = _full(v, PROMPTS)
        assert np.abs(ft_mlx - ft_peft).max() > 1e-4
        b.set_adapter(tiny_peft_adapter)
        b._cache.clear()
        with b.as_finetuned() as v:
            np.testing.assert_allclose(_full(v, PROMPTS), ft_peft, atol=1e-6)
        assert len(b.model.peft_config) == 1, "old adapters are deleted"


def test_failed_set_adapter_keeps_the_old_one(backend, tiny_peft_adapter: Path, tmp_path: Path) -> None:
    bad = tmp_path / "wrong_shape"
    shutil.copytree(tiny_peft_adapter, bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[key] = torch.zeros(4, 7)  # the layer takes 64 inputs
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    before = (backend.adapter, backend.adapter_hash, _lora_tensors(backend))
    ids = [backend._encode(p)[0] for p in PROMPTS]
    with backend.as_finetuned():
        ft = backend._last_logprobs(ids)
    with pytest.raises(Exception):  # noqa: B017 - the reader or PEFT may refuse it first
        backend.set_adapter(bad)
    assert (backend.adapter, backend.adapter_hash) == before[:2]
    assert list(backend.model.peft_config) == [backend.adapter]
    assert all(torch.equal(t, before[2][k]) for k, t in _lora_tensors(backend).items())
    with backend.as_finetuned():
        assert np.array_equal(backend._last_logprobs(ids), ft)


def test_preflight_flags_nan_adapter(
    backend, tiny_model_dir: Path, tiny_peft_adapter: Path, tmp_path: Path
) -> None:
    assert backend.preflight_finite_check() == (True, "base and fine-tuned views give finite logits")
    bad = fixtures_build.nan_copy(tiny_peft_adapter, tmp_path / "nan_adapter")
    with HFDifferentialBackend(tiny_model_dir, bad) as b:
        ok, reason = b.preflight_finite_check()
        assert b.active_view is None
    assert not ok
    assert "NaN/Inf" in reason and "lora_B" in reason


def test_generate_greedy_is_deterministic_and_sampling_seeded(backend) -> None:
    state = torch.get_rng_state()
    with backend.as_finetuned() as v:
        g1 = v.generate("The lighthouse", max_new_tokens=12)
        g2 = v.generate("The lighthouse", max_new_tokens=12)
        s1 = v.generate("The lighthouse", max_new_tokens=12, temperature=1.0, seed=5)
        s2 = v.generate("The lighthouse", max_new_tokens=12, temperature=1.0, seed=5)
        s3 = v.generate("The lighthouse", max_new_tokens=12, temperature=1.0, seed=6)
        assert v.generate("The lighthouse", max_new_tokens=0) == ""
    assert g1 == g2 and g1
    assert s1 == s2 and s1 != s3
    assert not g1.startswith("The lighthouse"), "only the new text is returned"
    assert torch.equal(torch.get_rng_state(), state), "sampling must not move the global RNG"


# ---------------------------------------------------------------------- DoRA
def test_dora_views(tiny_model_dir: Path, tiny_dora_adapter: Path) -> None:
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with HFDifferentialBackend(tiny_model_dir, tiny_dora_adapter) as b:
        assert b.info["dora"] and all(s.dora for s in b.slots)
        ids = [b._encode(p)[0] for p in PROMPTS[:3]]
        with torch.no_grad():
            true_base = torch.log_softmax(plain(input_ids=torch.tensor([ids[0]])).logits[0, -1], -1)
        real = _lora_tensors(b)
        with b.as_base():
            base = b._last_logprobs(ids)
        with b.as_finetuned():
            ft = b._last_logprobs(ids)
        with b.as_scaled_adapter(0.0):
            assert np.array_equal(b._last_logprobs(ids), base)
        with b.as_scaled_adapter(1.0):
            assert np.array_equal(b._last_logprobs(ids), ft)
        with b.as_scaled_adapter(1e-6):
            np.testing.assert_allclose(b._last_logprobs(ids), base, atol=1e-4)
        np.testing.assert_allclose(base[0], true_base.numpy(), atol=1e-5)
        assert np.abs(ft - base).max() > 1e-3
        with pytest.raises(RuntimeError), b.as_null_adapter(2):
            for slot in b.slots:
                torch.testing.assert_close(slot.magnitude.detach(), lora.base_row_norms(slot))
            raise RuntimeError("stop")
        assert all(torch.equal(t, real[k]) for k, t in _lora_tensors(b).items())
        with b.as_finetuned():
            assert np.array_equal(b._last_logprobs(ids), ft)


# -------------------------------------------------------------- dtype/device
def test_dtype_and_device_choice(tiny_model_dir: Path, tiny_peft_adapter: Path) -> None:
    assert pick_dtype("auto", "cpu") == "float32"
    assert pick_dtype("auto", "cuda") == "bfloat16"
    assert pick_dtype("bf16", "cpu") == "bfloat16"
    with pytest.raises(ValueError):
        pick_dtype("int3", "cpu")
    # bf16 weights must still reach numpy as float32.
    with HFDifferentialBackend(tiny_model_dir, tiny_peft_adapter, dtype="bf16", device="cpu") as b:
        assert b.info["dtype"] == "bfloat16"
        with b.as_finetuned() as v:
            dist = v.next_token_dist(PROMPTS[0], top_k=5)
            rolled = v.rolling_logprob(LONG_TEXT)
        assert dist.logprobs.dtype == np.float32 and np.all(np.isfinite(dist.logprobs))
        assert rolled.logprobs.dtype == np.float32 and np.all(np.isfinite(rolled.logprobs))
