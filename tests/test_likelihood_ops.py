"""The two backend ops the likelihood probes added: batched rolling log-probs and embeddings.

Both real backends on the tiny model: many texts scored in one call must equal each
text scored alone (windows past the context included), and the base model's mean-pooled
hidden states must not depend on the adapter, on padding or on batch neighbours.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sway_common.backend.dummy import DummyDifferentialBackend
from sway_common.protocols import EmbeddingBackend

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 9,
    "Once upon a time there was a small village by the sea.",
    "Two plus two is four.",
]


def _backend(kind: str, model_dir: Path, adapter: Path):
    if kind == "mlx":
        from sway_mlx.backend import MLXDifferentialBackend

        return MLXDifferentialBackend(
            model_dir, adapter, dtype="float32", batch_size=2, max_context=64
        )
    from sway_hf.backend import HFDifferentialBackend

    return HFDifferentialBackend(
        model_dir, adapter, dtype="float32", device="cpu", batch_size=2, max_context=64
    )


@pytest.fixture(scope="module", params=["mlx", "hf"])
def backend(request, tiny_model_dir: Path, tiny_peft_adapter: Path):
    b = _backend(request.param, tiny_model_dir, tiny_peft_adapter)
    yield b
    b.close()


def test_batched_rolling_equals_one_text_at_a_time(backend) -> None:
    with backend.as_finetuned() as ft:
        batched = ft.rolling_logprob_batch(TEXTS)
    backend.scorer.cache.clear()  # score each text afresh, not from the batch's cache entries
    with backend.as_finetuned() as ft:
        alone = [ft.rolling_logprob(t) for t in TEXTS]
    assert batched[0].num_tokens > backend.max_context  # the long text needs several windows
    for a, b in zip(batched, alone, strict=True):
        assert np.array_equal(a.token_ids, b.token_ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-4)


def test_embeddings_are_the_base_models_and_ignore_padding(backend) -> None:
    assert isinstance(backend, EmbeddingBackend)
    together = backend.mean_hidden_states(TEXTS)
    alone = np.stack([backend.mean_hidden_states([t])[0] for t in TEXTS])
    assert together.shape[0] == 3 and together.dtype == np.float32
    np.testing.assert_allclose(together, alone, atol=1e-4)
    assert backend.active_view is None  # the base view was closed again
    assert not np.allclose(together[1], together[2])


def test_dummy_backend_embeds_too() -> None:
    b = DummyDifferentialBackend()
    rows = b.mean_hidden_states(["abc", "a longer text"])
    assert rows.shape == (2, 16)
    with b.as_base() as base:
        assert len(base.rolling_logprob_batch(["hello there", "x"])) == 2
