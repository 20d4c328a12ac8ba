"""The two runtime hooks export-check adds, on both backends and the tiny model:
``position_dists`` (every position's top-k slice, for llama.cpp-style KL statistics)
and ``install_weights`` (adapted modules' weights replaced: the noise floor's model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from test_backend_contract import KINDS, TEXT, direct_logprobs, make_backend
from weight_builders import model_copy, quantized

from sway_common.adapters import read_adapter
from sway_common.backend.scoring import token_dist_from_logprobs
from sway_common.weight_reader import ModelWeights

TEXTS = [TEXT, "The quick brown fox", "A"]


@pytest.fixture(scope="module", params=KINDS)
def backend(request, tiny_model_dir: Path, tiny_peft_adapter: Path):
    b = make_backend(request.param, tiny_model_dir, tiny_peft_adapter, batch_size=2)
    yield b
    b.close()


@pytest.mark.parametrize("top_k", [1, 16])
def test_position_dists_are_the_top_slices_of_every_position(backend, top_k: int) -> None:
    ids = [backend.runtime.encode(t)[0] for t in TEXTS]
    with backend.as_finetuned() as view:
        per_text = view.position_dist_batch(TEXTS, top_k=top_k)
        scored = backend.runtime.token_logprobs(ids)
        full = [direct_logprobs(backend, row) for row in ids]
    for row, dists, rows, lp in zip(ids, per_text, full, scored, strict=True):
        assert len(dists) == len(row) - 1
        for t, dist in enumerate(dists):
            host = token_dist_from_logprobs(rows[t], top_k)
            np.testing.assert_allclose(dist.logprobs, host.logprobs, atol=2e-5)
            assert dist.token_ids[0] == host.token_ids[0] or top_k > 1
            assert dist.tail_logprob == pytest.approx(host.tail_logprob, abs=1e-4)
            if row[t + 1] in dist.token_ids:  # the scored token, where the slice holds it
                at = int(np.flatnonzero(dist.token_ids == row[t + 1])[0])
                assert dist.logprobs[at] == pytest.approx(lp[t], abs=2e-5)


def _fused_weights(model_dir: Path, adapter: Path, scale: float = 1.0) -> dict[str, np.ndarray]:
    weights = ModelWeights(model_dir)
    out = {}
    for name, module in read_adapter(adapter).modules.items():
        w, _ = weights.module_weight(name, module.shape)
        out[name] = (w + np.float32(scale) * module.delta()).astype(np.float32)
    return out


def test_installed_weights_give_another_model_and_come_out_again(
    backend, tiny_model_dir: Path, tiny_peft_adapter: Path
) -> None:
    """The adapter's ΔW fused into the base view's weights is the fine-tune; undone, the
    base again; a misfit changes nothing; the result cache never mixes the two."""
    ids = [backend.runtime.encode(t)[0] for t in TEXTS[1:]]
    with backend.as_finetuned() as ft:
        want = ft.next_token_dist_batch(TEXTS[1:], top_k=8)
    with backend.as_base() as base:
        before = base.next_token_dist_batch(TEXTS[1:], top_k=8)
        rows_before = backend.runtime.last_logprobs(ids)
    fused_weights = _fused_weights(tiny_model_dir, tiny_peft_adapter)
    with backend.weights_replaced(fused_weights), backend.as_base() as fused:
        got = fused.next_token_dist_batch(TEXTS[1:], top_k=8)
    for g, w, b in zip(got, want, before, strict=True):
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-4)
        assert not np.allclose(g.logprobs, b.logprobs, atol=1e-4)
    with backend.as_base():
        np.testing.assert_array_equal(backend.runtime.last_logprobs(ids), rows_before)
    name = next(iter(read_adapter(tiny_peft_adapter).modules))
    with (
        pytest.raises(ValueError, match="shape"),
        backend.weights_replaced({name: np.zeros((3, 3))}),
    ):
        pass
    with (
        pytest.raises(ValueError, match="no_such"),
        backend.weights_replaced({"no_such": np.zeros(1)}),
    ):
        pass
    with backend.as_base():
        np.testing.assert_array_equal(backend.runtime.last_logprobs(ids), rows_before)


FOUND: dict[bool, np.ndarray] = {}


@pytest.mark.mlx
@pytest.mark.parametrize("fast", [True, False])
def test_a_quantized_model_takes_its_stored_values_exactly(
    fast: bool, tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """An mlx-lm 4-bit model, dequantized at load on the CPU (the fast path) or kept
    quantized: given the values its storage holds (numpy's copy of mlx's affine recipe),
    an adapted layer computes as before; other values change the model. The fast path's
    float layers give the quantized kernel's logits."""
    import mlx.nn as nn

    if not fast:
        monkeypatch.setenv("SWAY_MLX_NO_FAST_PATHS", "1")
    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    q4 = model_copy(
        tiny_model_dir,
        tmp_path / "q4",
        quantized(tensors, 4),
        quantization={"group_size": 64, "bits": 4},
    )
    plain = make_backend("mlx", q4, None)
    try:
        name = "model.layers.0.self_attn.q_proj"
        layer = plain.runtime.model.model.layers[0].self_attn.q_proj
        assert isinstance(layer, nn.QuantizedLinear) is not fast
        stored, storage = ModelWeights(q4).module_weight(name)
        assert storage.describe() == "4-bit (group 64)"
        assert np.array_equal(storage.requantize(tensors[f"{name}.weight"]), stored)
        ids = [plain.runtime.encode(t)[0] for t in TEXTS[1:]]
        with plain.as_base():
            before = plain.runtime.last_logprobs(ids)
        with plain.weights_replaced({name: stored}), plain.as_base():
            np.testing.assert_allclose(plain.runtime.last_logprobs(ids), before, atol=2e-5)
        with plain.weights_replaced({name: stored + np.float32(0.5)}), plain.as_base():
            assert not np.allclose(plain.runtime.last_logprobs(ids), before, atol=1e-3)
        with plain.as_base():
            np.testing.assert_array_equal(plain.runtime.last_logprobs(ids), before)
    finally:
        plain.close()
    FOUND[fast] = before
    if len(FOUND) == 2:  # the fast path's float layers against the quantized kernel
        np.testing.assert_allclose(FOUND[True], FOUND[False], atol=1e-4)
