"""What only the MLX backend has: module swaps, array references, compiled forwards.

The contract both backends keep is in ``test_backend_contract.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx_lm")

import mlx.core as mx  # noqa: E402
from mlx_lm.utils import load  # noqa: E402

from sway_mlx.backend import MLXDifferentialBackend  # noqa: E402

pytestmark = pytest.mark.mlx

PROMPTS = [
    "The quick brown fox",
    "What is the capital of France?",
    "Once upon a time there was a small village by the sea, where",
    "A model",
    "It is raining today, so we",
]


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path, tiny_peft_adapter: Path) -> MLXDifferentialBackend:
    b = MLXDifferentialBackend(tiny_model_dir, tiny_peft_adapter, batch_size=4, dtype="float32")
    yield b
    b.close()


def full_dist(view, prompt: str) -> np.ndarray:
    """The whole next-token log-softmax row, in vocabulary order."""
    d = view.next_token_dist(prompt, top_k=view.scorer.runtime.vocab_size)
    row = np.empty(d.vocab_size, np.float32)
    row[d.token_ids] = d.logprobs
    return row


def direct_logprobs(model, ids: list[int]) -> np.ndarray:
    """log-softmax of the full logits of one unpadded sequence, (T, vocab), float32."""
    logits = model(mx.array([ids])).astype(mx.float32)[0]
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def module_at(model, path: str):
    return dict(model.named_modules())[path]


# ------------------------------------------------------------------- views
def test_null_view_puts_the_same_arrays_back(backend: MLXDifferentialBackend) -> None:
    arrays = [(s.layer.lora_a, s.layer.lora_b, s.layer.scale) for s in backend.runtime.slots]
    with pytest.raises(RuntimeError, match="boom"), backend.as_null_adapter(7) as null:
        null.next_token_dist(PROMPTS[0])
        assert backend.runtime.slots[0].layer.lora_a is not arrays[0][0]
        raise RuntimeError("boom")
    # The very same array objects are back (references kept, so restoring is free).
    for slot, (a, b, scale) in zip(backend.runtime.slots, arrays, strict=True):
        assert slot.layer.lora_a is a and slot.layer.lora_b is b and slot.layer.scale is scale
        assert module_at(backend.runtime.model, slot.path) is slot.layer


def test_base_view_swaps_modules_and_back(backend: MLXDifferentialBackend) -> None:
    with pytest.raises(KeyError), backend.as_base():
        for slot in backend.runtime.slots:
            assert module_at(backend.runtime.model, slot.path) is slot.base
        raise KeyError("x")
    for slot in backend.runtime.slots:
        assert module_at(backend.runtime.model, slot.path) is slot.layer


# ---------------------------------------------------------------- scoring
def test_full_logits_fallback_agrees(
    backend: MLXDifferentialBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Architectures whose head is not a plain projection get full logits, read the same way."""
    encoded = [backend.runtime.encode(p)[0] for p in PROMPTS]
    with backend.as_finetuned():
        last = backend.runtime.last_logprobs(encoded)
        tokens = backend.runtime.token_logprobs(encoded)
        monkeypatch.setattr(backend.runtime, "_inner", backend.runtime.model)
        monkeypatch.setattr(backend.runtime, "_head", lambda logits: logits)
        np.testing.assert_allclose(backend.runtime.last_logprobs(encoded), last, atol=1e-5)
        for a, b in zip(backend.runtime.token_logprobs(encoded), tokens, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_compiled_forward_follows_the_views(backend: MLXDifferentialBackend) -> None:
    """Scales and factors are arrays in the module tree, so a forward compiled once with
    ``inputs=model.state`` sees every view rather than values baked in at trace time."""
    ids = mx.array([backend.runtime.encode(PROMPTS[2])[0]])
    forward = mx.compile(lambda x: backend.runtime.model(x), inputs=backend.runtime.model.state)
    seen = {}
    for name, opener in (
        ("ft", backend.as_finetuned),
        ("half", lambda: backend.as_scaled_adapter(0.5)),
        ("null", lambda: backend.as_null_adapter(4)),
        ("ft_again", backend.as_finetuned),
    ):
        with opener():
            compiled, eager = forward(ids), backend.runtime.model(ids)
            np.testing.assert_array_equal(np.array(compiled), np.array(eager))
            seen[name] = np.array(compiled)
    assert np.abs(seen["half"] - seen["ft"]).max() > 1e-3
    assert np.abs(seen["null"] - seen["ft"]).max() > 1e-3
    np.testing.assert_array_equal(seen["ft_again"], seen["ft"])


# ---------------------------------------------------------------- adapters
def test_native_mlx_adapter_matches_mlx_lm(tiny_model_dir: Path, tiny_mlx_adapter: Path) -> None:
    """Wrapping by module path gives what mlx-lm's own adapter loading gives."""
    reference, _ = load(str(tiny_model_dir), adapter_path=str(tiny_mlx_adapter))
    with MLXDifferentialBackend(tiny_model_dir, tiny_mlx_adapter, dtype="float32") as b:
        ids = b.runtime.encode(PROMPTS[2])[0]
        with b.as_finetuned() as view:
            row = full_dist(view, PROMPTS[2])
        np.testing.assert_allclose(row, direct_logprobs(reference, ids)[-1], atol=1e-5)
        assert b.info["rank"] == 4 and b.info["targets"] == ["q_proj", "v_proj"]
        final_hash = b.adapter_hash
        with b.as_base() as view:
            base_row = full_dist(view, PROMPTS[2])
        # A checkpoint file of the same run: another adapter, another hash, same base.
        checkpoint = tiny_mlx_adapter / "0000010_adapters.safetensors"
        b.set_adapter(checkpoint)
        assert b.adapter_hash != final_hash
        assert b.info["adapter"] == str(checkpoint)
        with b.as_finetuned() as view:
            ck_row = full_dist(view, PROMPTS[2])
        with b.as_base() as view:
            np.testing.assert_array_equal(full_dist(view, PROMPTS[2]), base_row)
        assert np.abs(ck_row - row).max() > 1e-4
        assert np.abs(ck_row - base_row).max() > 1e-4
