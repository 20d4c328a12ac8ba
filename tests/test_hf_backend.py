"""What only the HF + PEFT backend has: PEFT adapter names, conversion on load, torch RNG,
split LM head, DoRA magnitudes, dtype and device choice.

The contract both backends keep is in ``test_backend_contract.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from sway_hf import lora  # noqa: E402
from sway_hf.backend import HFDifferentialBackend  # noqa: E402
from sway_hf.loading import pick_dtype  # noqa: E402

pytestmark = pytest.mark.hf

# These tests compare numbers with CPU-float32 tolerances and read tensors with .numpy():
# pinned, so that on a GPU machine "auto" (bf16 on CUDA) does not change what they test.
EXACT = {"dtype": "float32", "device": "cpu"}

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
    b = HFDifferentialBackend(tiny_model_dir, tiny_peft_adapter, batch_size=3, **EXACT)
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
    return {
        f"{s.path}.{k}": t.detach().clone() for s in b.runtime.slots for k, t in s.tensors().items()
    }


# --------------------------------------------------------------------- views
def test_scaling_path_at_zero_is_base(backend) -> None:
    """Plain LoRA at scaling 0 adds exact zeros, so the scaling path agrees with the
    adapter switch that λ = 0 really goes through."""
    ids = [backend.runtime.encode(p)[0] for p in PROMPTS]
    restore = lora.install_scaled(backend.runtime.slots, 0.0)
    try:
        scaled_zero = backend.runtime.last_logprobs(ids)
    finally:
        restore()
    with backend.as_base():
        assert np.array_equal(scaled_zero, backend.runtime.last_logprobs(ids))


# ------------------------------------------------------------------ scoring
def test_full_logits_fallback_agrees_with_split_head(backend, monkeypatch) -> None:
    assert backend.runtime._split_head, "a Llama's body + lm_head is its forward"
    ids = [backend.runtime.encode(t)[0] for t in (LONG_TEXT, PROMPTS[1], PROMPTS[2])]
    with backend.as_finetuned():
        last, tokens = backend.runtime.last_logprobs(ids), backend.runtime.token_logprobs(ids)
        monkeypatch.setattr(backend.runtime, "_split_head", False)
        np.testing.assert_allclose(backend.runtime.last_logprobs(ids), last, atol=1e-5)
        for got, want in zip(backend.runtime.token_logprobs(ids), tokens, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5)


# ------------------------------------------------------------------ loading
def test_info(backend) -> None:
    info = backend.info
    assert info["alpha"] == 8 and info["device"] == "cpu"


def test_mlx_adapter_loads_through_conversion(tiny_model_dir: Path, tiny_mlx_adapter: Path) -> None:
    from sway_common.adapters import read_adapter

    weights = read_adapter(tiny_mlx_adapter)
    with HFDifferentialBackend(tiny_model_dir, tiny_mlx_adapter, **EXACT) as b:
        assert b.adapter_hash == weights.content_hash
        assert {s.path for s in b.runtime.slots} == set(weights.modules)
        for slot in b.runtime.slots:
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
    tiny_model_dir: Path, tiny_peft_adapter: Path, tiny_mlx_adapter: Path
) -> None:
    with HFDifferentialBackend(tiny_model_dir, tiny_peft_adapter, **EXACT) as b:
        base_model = b.runtime._causal_lm.model.embed_tokens.weight
        with b.as_base() as v:
            base = _full(v, PROMPTS)
        with b.as_finetuned() as v:
            ft_peft = _full(v, PROMPTS)
        peft_hash = b.adapter_hash
        b.set_adapter(tiny_mlx_adapter)
        assert b.runtime._causal_lm.model.embed_tokens.weight is base_model
        assert b.adapter_hash != peft_hash and len(b.runtime.slots) == 4
        misses = b.scorer.cache.misses
        with b.as_base() as v:
            assert np.array_equal(_full(v, PROMPTS), base)
        assert b.scorer.cache.misses == misses, "base-view results must stay cached"
        with b.as_finetuned() as v:
            ft_mlx = _full(v, PROMPTS)
        assert np.abs(ft_mlx - ft_peft).max() > 1e-4
        b.set_adapter(tiny_peft_adapter)
        b.scorer.cache.clear()
        with b.as_finetuned() as v:
            np.testing.assert_allclose(_full(v, PROMPTS), ft_peft, atol=1e-6)
        assert len(b.runtime.model.peft_config) == 1, "old adapters are deleted"


def test_failed_set_adapter_keeps_the_old_peft_adapter(
    backend, tiny_peft_adapter: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "wrong_shape"
    shutil.copytree(tiny_peft_adapter, bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[key] = torch.zeros(4, 7)  # the layer takes 64 inputs
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    before = (backend.runtime.adapter, _lora_tensors(backend))
    with pytest.raises(Exception):  # noqa: B017 - the reader or PEFT may refuse it first
        backend.set_adapter(bad)
    assert backend.runtime.adapter == before[0]
    assert list(backend.runtime.model.peft_config) == [backend.runtime.adapter]
    assert backend.runtime.model.active_adapter == backend.runtime.adapter
    assert all(torch.equal(t, before[1][k]) for k, t in _lora_tensors(backend).items())


def test_sampling_leaves_the_global_rng_alone(backend) -> None:
    state = torch.get_rng_state()
    with backend.as_finetuned() as v:
        v.generate("The lighthouse", max_new_tokens=12, temperature=1.0, seed=5)
    assert torch.equal(torch.get_rng_state(), state), "sampling must not move the global RNG"


# ---------------------------------------------------------------------- DoRA
def test_dora_null_magnitudes_and_small_lambda(
    tiny_model_dir: Path, tiny_dora_adapter: Path
) -> None:
    with HFDifferentialBackend(tiny_model_dir, tiny_dora_adapter, **EXACT) as b:
        ids = [b.runtime.encode(p)[0] for p in PROMPTS[:3]]
        with b.as_base():
            base = b.runtime.last_logprobs(ids)
        with b.as_scaled_adapter(1e-6):
            np.testing.assert_allclose(b.runtime.last_logprobs(ids), base, atol=1e-4)
        with pytest.raises(RuntimeError), b.as_null_adapter(2):
            # A DoRA null starts from the base row norms, as an untrained DoRA adapter does.
            for slot in b.runtime.slots:
                weight = slot.layer.get_base_layer().weight.detach().float()
                torch.testing.assert_close(
                    slot.magnitude.detach(), torch.linalg.norm(weight, dim=1)
                )
            raise RuntimeError("stop")


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
