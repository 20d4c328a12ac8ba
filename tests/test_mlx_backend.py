"""The MLX backend on the tiny fixtures: views, restore, batching, nulls, adapters, preflight."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx_lm")

import mlx.core as mx  # noqa: E402
from mlx_lm.utils import load  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from sway_common.backend.scoring import rolling_windows  # noqa: E402
from sway_common.protocols import ViewConflictError  # noqa: E402
from sway_mlx import lora  # noqa: E402
from sway_mlx.backend import MLXDifferentialBackend  # noqa: E402

pytestmark = pytest.mark.mlx

PROMPTS = [
    "The quick brown fox",
    "What is the capital of France?",
    "Once upon a time there was a small village by the sea, where",
    "A model",
    "It is raining today, so we",
]
TEXT = (
    "Once upon a time there was a small village by the sea, where people fished and told "
    "stories. It is raining today, so we stay inside, drink tea and read books."
)


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path, tiny_peft_adapter: Path) -> MLXDifferentialBackend:
    b = MLXDifferentialBackend(tiny_model_dir, tiny_peft_adapter, batch_size=4)
    yield b
    b.close()


@pytest.fixture(scope="module")
def plain(tiny_model_dir: Path):
    """The tiny model loaded by mlx-lm alone: what "base" must reproduce."""
    model, _ = load(str(tiny_model_dir))
    return model


def full_dist(view, prompt: str) -> np.ndarray:
    """The whole next-token log-softmax row, in vocabulary order."""
    d = view.next_token_dist(prompt, top_k=view.backend.vocab_size)
    row = np.empty(d.vocab_size, np.float32)
    row[d.token_ids] = d.logprobs
    return row


def direct_logprobs(model, ids: list[int]) -> np.ndarray:
    """log-softmax of the full logits of one unpadded sequence, (T, vocab), float32."""
    logits = model(mx.array([ids])).astype(mx.float32)[0]
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def snapshot(backend: MLXDifferentialBackend) -> list[dict[str, np.ndarray]]:
    return [
        {
            "a": np.array(s.layer.lora_a),
            "b": np.array(s.layer.lora_b),
            "scale": np.array(s.layer.scale),
        }
        for s in backend.slots
    ]


def write_modified_peft(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    path = dst / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    return dst


# ------------------------------------------------------------------- views
def test_lambda_zero_is_base_and_one_is_ft(backend: MLXDifferentialBackend) -> None:
    rows = {}
    for name, opener in (
        ("base", backend.as_base),
        ("ft", backend.as_finetuned),
        ("lam0", lambda: backend.as_scaled_adapter(0.0)),
        ("lam1", lambda: backend.as_scaled_adapter(1.0)),
    ):
        with opener() as view:
            rows[name] = (full_dist(view, PROMPTS[2]), view.rolling_logprob(TEXT).logprobs)
    np.testing.assert_array_equal(rows["lam0"][0], rows["base"][0])
    np.testing.assert_array_equal(rows["lam0"][1], rows["base"][1])
    np.testing.assert_array_equal(rows["lam1"][0], rows["ft"][0])
    np.testing.assert_array_equal(rows["lam1"][1], rows["ft"][1])
    assert np.abs(rows["ft"][0] - rows["base"][0]).max() > 1e-3
    with backend.as_scaled_adapter(0.5) as half:
        mid = full_dist(half, PROMPTS[2])
    assert not np.array_equal(mid, rows["base"][0]) and not np.array_equal(mid, rows["ft"][0])


def test_base_view_equals_plain_model(backend: MLXDifferentialBackend, plain) -> None:
    ids, _ = backend._encode(PROMPTS[1])
    with backend.as_base() as view:
        row = full_dist(view, PROMPTS[1])
    np.testing.assert_allclose(row, direct_logprobs(plain, ids)[-1], atol=1e-5)


def test_real_adapter_restored_after_null_view_raised(backend: MLXDifferentialBackend) -> None:
    before = snapshot(backend)
    arrays = [(s.layer.lora_a, s.layer.lora_b, s.layer.scale) for s in backend.slots]
    with backend.as_finetuned() as ft:
        ft_row = full_dist(ft, PROMPTS[0])
    with pytest.raises(RuntimeError, match="boom"), backend.as_null_adapter(7) as null:
        null.next_token_dist(PROMPTS[0])
        assert backend.slots[0].layer.lora_a is not arrays[0][0]
        raise RuntimeError("boom")
    assert backend.active_view is None
    # The very same arrays are back (references kept), and their values bit-for-bit.
    for slot, (a, b, scale) in zip(backend.slots, arrays, strict=True):
        assert slot.layer.lora_a is a and slot.layer.lora_b is b and slot.layer.scale is scale
        assert lora.resolve(backend.model, slot.path)[2] is slot.layer
    for old, new in zip(before, snapshot(backend), strict=True):
        for key in old:
            np.testing.assert_array_equal(old[key], new[key])
    backend._cache.clear()
    with backend.as_finetuned() as ft:
        np.testing.assert_array_equal(full_dist(ft, PROMPTS[0]), ft_row)


def test_base_view_restored_after_exception(backend: MLXDifferentialBackend) -> None:
    with pytest.raises(KeyError), backend.as_base():
        raise KeyError("x")
    for slot in backend.slots:
        assert lora.resolve(backend.model, slot.path)[2] is slot.layer


def test_two_open_views_conflict(backend: MLXDifferentialBackend) -> None:
    with backend.as_base(), pytest.raises(ViewConflictError), backend.as_finetuned():
        pass
    with (
        backend.as_null_adapter(1),
        pytest.raises(ViewConflictError),
        backend.as_scaled_adapter(0.5),
    ):
        pass
    with backend.as_finetuned():
        pass  # the failed entries left nothing open


def test_view_used_after_its_block_raises(backend: MLXDifferentialBackend) -> None:
    with backend.as_finetuned() as view:
        view.next_token_dist(PROMPTS[0])
    with pytest.raises(ViewConflictError):
        view.next_token_dist(PROMPTS[1])
    with backend.as_base(), pytest.raises(ViewConflictError):
        view.logprob_of("a", " b")


def test_set_adapter_refused_while_a_view_is_open(
    backend: MLXDifferentialBackend, tiny_peft_adapter: Path
) -> None:
    with backend.as_base(), pytest.raises(ViewConflictError):
        backend.set_adapter(tiny_peft_adapter)


# ---------------------------------------------------------------- batching
def test_batched_equals_per_prompt(backend: MLXDifferentialBackend) -> None:
    encoded = [backend._encode(p)[0] for p in PROMPTS]
    assert len({len(e) for e in encoded}) > 2  # really mixed lengths, so padding happens
    with backend.as_finetuned():
        batched = backend._last_logprobs(encoded)
        single = np.stack([backend._last_logprobs([e])[0] for e in encoded])
        np.testing.assert_allclose(batched, single, atol=2e-5)
        tok_batched = backend._token_logprobs(encoded)
        for e, row in zip(encoded, tok_batched, strict=True):
            assert row.shape == (len(e) - 1,)
            np.testing.assert_allclose(row, backend._token_logprobs([e])[0], atol=2e-5)
    # And through the public API: a batch equals prompts scored one by one.
    backend._cache.clear()
    with backend.as_finetuned() as view:
        dists = view.next_token_dist_batch(PROMPTS, top_k=16)
    backend._cache.clear()
    with backend.as_finetuned() as view:
        for prompt, d in zip(PROMPTS, dists, strict=True):
            one = view.next_token_dist(prompt, top_k=16)
            np.testing.assert_array_equal(one.token_ids[:3], d.token_ids[:3])
            np.testing.assert_allclose(one.logprobs, d.logprobs, atol=2e-5)


def test_token_logprobs_chunked_like_unchunked(
    backend: MLXDifferentialBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sway_mlx.backend as mod

    ids = backend._encode(TEXT)[0]
    with backend.as_finetuned():
        whole = backend._token_logprobs([ids, ids[:10]])
        # A budget of a few positions per step forces many chunks.
        monkeypatch.setattr(mod, "LOGIT_BUDGET", 3 * 2 * backend.vocab_size)
        chunked = backend._token_logprobs([ids, ids[:10]])
    for w, c in zip(whole, chunked, strict=True):
        np.testing.assert_allclose(w, c, atol=1e-6)


# ------------------------------------------------------------------- nulls
def null_deltas(backend: MLXDifferentialBackend, **kw) -> list[np.ndarray]:
    with backend.as_null_adapter(11, **kw):
        return [np.array(s.layer.scale * (s.layer.lora_a @ s.layer.lora_b)) for s in backend.slots]


def test_null_variance_linear_in_rank_scale(backend: MLXDifferentialBackend) -> None:
    var = {k: np.mean([d.var() for d in null_deltas(backend, rank_scale=k)]) for k in (1, 2, 4)}
    assert var[2] / var[1] == pytest.approx(2.0, rel=1e-3)
    assert var[4] / var[1] == pytest.approx(4.0, rel=1e-3)
    # Absolute level: Var(ΔW) = scale² · r · σ_A² · σ_B² for rank-r Gaussian factors.
    slot = backend.slots[0]
    expected = float(slot.scale) ** 2 * slot.rank * 0.02**4
    assert var[1] == pytest.approx(expected, rel=0.2)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_rank_scale_must_be_positive(backend: MLXDifferentialBackend, bad: float) -> None:
    with pytest.raises(ValueError, match="rank_scale"):
        backend.as_null_adapter(0, rank_scale=bad)
    with pytest.raises(ValueError, match="rank_scale"):
        lora.null_factors(backend.slots, 0, init_scale=0.02, rank_scale=bad, mode="fixed")


def test_norm_matched_nulls_match_real_norms(backend: MLXDifferentialBackend) -> None:
    real = [np.linalg.norm(np.array(s.scale * (s.a @ s.b))) for s in backend.slots]
    assert all(r > 0 for r in real)
    deltas = null_deltas(backend, mode="norm_matched")
    for r, d in zip(real, deltas, strict=True):
        assert np.linalg.norm(d) == pytest.approx(r, rel=1e-4)
    fixed = null_deltas(backend, mode="fixed")
    assert any(abs(np.linalg.norm(d) - r) / r > 0.1 for r, d in zip(real, fixed, strict=True))


def test_same_seed_same_null(backend: MLXDifferentialBackend) -> None:
    first = null_deltas(backend, init_scale=0.05)
    again = null_deltas(backend, init_scale=0.05)
    for x, y in zip(first, again, strict=True):
        np.testing.assert_array_equal(x, y)
    with backend.as_null_adapter(12, init_scale=0.05):
        other = [np.array(s.layer.scale * (s.layer.lora_a @ s.layer.lora_b)) for s in backend.slots]
    assert not np.allclose(first[0], other[0])
    # Each module gets its own draw, not one draw repeated.
    assert not np.allclose(first[0][:8, :8], first[2][:8, :8])
    rows = []
    for _ in range(2):
        backend._cache.clear()
        with backend.as_null_adapter(3, init_scale=0.05) as view:
            rows.append(full_dist(view, PROMPTS[3]))
    np.testing.assert_array_equal(rows[0], rows[1])


# ----------------------------------------------------------------- scoring
def test_logprob_of_equals_direct_log_softmax(backend: MLXDifferentialBackend) -> None:
    prompt, completion = "What is the capital of France?", " The capital of France is Paris."
    p_ids = backend._encode(prompt)[0]
    ids = backend._encode(prompt + completion)[0]
    assert ids[: len(p_ids)] == p_ids  # a clean boundary, so the direct sum is unambiguous
    with backend.as_finetuned() as view:
        got = view.logprob_of(prompt, completion)
        lp = direct_logprobs(backend.model, ids)
    want = sum(float(lp[i - 1, ids[i]]) for i in range(len(p_ids), len(ids)))
    assert got == pytest.approx(want, abs=1e-4)
    assert got < 0


def test_rolling_logprob_beyond_max_context(backend: MLXDifferentialBackend) -> None:
    ids = backend._encode(TEXT)[0]
    old = backend.max_context
    backend.max_context = 16
    backend._cache.clear()
    try:
        assert len(ids) > 3 * backend.max_context
        with backend.as_finetuned() as view:
            rolled = view.rolling_logprob(TEXT)
            full = direct_logprobs(backend.model, ids)
            windows = rolling_windows(len(ids), 16)
            want = []
            for w in windows:
                lp = direct_logprobs(backend.model, ids[w.start : w.end])
                want += [lp[j - 1 - w.start, ids[j]] for j in range(w.score_from, w.end)]
    finally:
        backend.max_context = old
        backend._cache.clear()
    assert rolled.logprobs.shape == (len(ids) - 1,)
    np.testing.assert_array_equal(rolled.token_ids, ids)
    np.testing.assert_allclose(rolled.logprobs, np.array(want), atol=2e-5)
    # The first window saw the whole prefix; later tokens really had a truncated context.
    first = [full[j - 1, ids[j]] for j in range(1, 16)]
    np.testing.assert_allclose(rolled.logprobs[:15], first, atol=2e-5)
    later = np.array([full[j - 1, ids[j]] for j in range(1, len(ids))])
    assert np.abs(rolled.logprobs - later).max() > 1e-3


def test_generate_greedy_and_seeded(backend: MLXDifferentialBackend) -> None:
    with backend.as_finetuned() as view:
        g1 = view.generate(PROMPTS[0], max_new_tokens=8)
        g2 = view.generate(PROMPTS[0], max_new_tokens=8)
        s1 = view.generate(PROMPTS[0], max_new_tokens=8, temperature=1.0, seed=3)
        s2 = view.generate(PROMPTS[0], max_new_tokens=8, temperature=1.0, seed=3)
        assert view.generate(PROMPTS[0], max_new_tokens=0) == ""
    assert g1 == g2 and isinstance(g1, str)
    assert s1 == s2
    # Greedy continues with the top-1 token of the view.
    with backend.as_finetuned() as view:
        top = int(view.next_token_dist(PROMPTS[0], top_k=1).token_ids[0])
        first = view.generate(PROMPTS[0], max_new_tokens=1)
    if top != backend.tokenizer.eos_token_id:
        assert first == backend.tokenizer.decode([top])


# ---------------------------------------------------------------- adapters
def test_info_and_preflight(backend: MLXDifferentialBackend) -> None:
    info = backend.info
    assert info["backend"] == "mlx"
    assert info["dtype"] == "float32"
    assert info["rank"] == 4
    assert info["targets"] == ["q_proj", "v_proj"]
    assert info["modules"] == 4 and info["dora"] is False
    assert backend.vocab_size == 384
    assert backend.preflight_finite_check()[0]


def test_native_mlx_adapter_matches_mlx_lm(tiny_model_dir: Path, tiny_mlx_adapter: Path) -> None:
    """Wrapping by module path gives what mlx-lm's own adapter loading gives."""
    reference, _ = load(str(tiny_model_dir), adapter_path=str(tiny_mlx_adapter))
    with MLXDifferentialBackend(tiny_model_dir, tiny_mlx_adapter) as b:
        ids = b._encode(PROMPTS[2])[0]
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


def test_set_adapter_failure_keeps_previous(
    backend: MLXDifferentialBackend, tmp_path: Path, tiny_peft_adapter: Path
) -> None:
    before = backend.adapter_hash
    with backend.as_finetuned() as view:
        row = full_dist(view, PROMPTS[0])
    bad = tmp_path / "bad"
    shutil.copytree(tiny_peft_adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_proj"]
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    for key in list(tensors):
        tensors[key.replace("layers.1.", "layers.7.")] = tensors.pop(key)
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(ValueError):
        backend.set_adapter(bad)
    assert backend.adapter_hash == before
    backend._cache.clear()
    with backend.as_finetuned() as view:
        np.testing.assert_array_equal(full_dist(view, PROMPTS[0]), row)


def test_dora_base_view_equals_plain_model(tiny_model_dir: Path, tiny_dora_adapter: Path, plain) -> None:
    with MLXDifferentialBackend(tiny_model_dir, tiny_dora_adapter) as b:
        assert b.info["dora"] is True
        ids = b._encode(PROMPTS[4])[0]
        want = direct_logprobs(plain, ids)[-1]
        with b.as_base() as view:
            np.testing.assert_allclose(full_dist(view, PROMPTS[4]), want, atol=1e-5)
        with b.as_scaled_adapter(0.0) as view:
            np.testing.assert_allclose(full_dist(view, PROMPTS[4]), want, atol=1e-5)
        with b.as_finetuned() as view:
            ft = full_dist(view, PROMPTS[4])
        with b.as_scaled_adapter(1.0) as view:
            np.testing.assert_array_equal(full_dist(view, PROMPTS[4]), ft)
        assert np.abs(ft - want).max() > 1e-3
        with b.as_null_adapter(0, mode="norm_matched") as view:
            assert np.all(np.isfinite(full_dist(view, PROMPTS[4])))
        assert b.preflight_finite_check()[0]


def test_preflight_fails_on_nan_adapter(
    tiny_model_dir: Path, tiny_peft_adapter: Path, tmp_path: Path
) -> None:
    def poison(tensors: dict[str, np.ndarray]) -> None:
        key = sorted(k for k in tensors if "lora_A" in k)[0]
        tensors[key] = tensors[key].copy()
        tensors[key][0, 0] = np.nan

    nan_dir = write_modified_peft(tiny_peft_adapter, tmp_path / "nan", poison)
    with MLXDifferentialBackend(tiny_model_dir, nan_dir) as b:
        ok, reason = b.preflight_finite_check()
        assert not ok
        assert "NaN" in reason and "lora_a" in reason
        assert b._nonfinite_adapter_tensors()
        assert b.active_view is None


def test_close_is_idempotent(tiny_model_dir: Path, tiny_peft_adapter: Path) -> None:
    b = MLXDifferentialBackend(tiny_model_dir, tiny_peft_adapter, dtype="fp32")
    b.close()
    b.close()
    assert b.model is None


def test_compiled_forward_follows_the_views(backend: MLXDifferentialBackend) -> None:
    """Scales and factors are arrays in the module tree, so a forward compiled once with
    ``inputs=model.state`` sees every view rather than values baked in at trace time."""
    ids = mx.array([backend._encode(PROMPTS[2])[0]])
    forward = mx.compile(lambda x: backend.model(x), inputs=backend.model.state)
    seen = {}
    for name, opener in (
        ("ft", backend.as_finetuned),
        ("half", lambda: backend.as_scaled_adapter(0.5)),
        ("null", lambda: backend.as_null_adapter(4)),
        ("ft_again", backend.as_finetuned),
    ):
        with opener():
            compiled, eager = forward(ids), backend.model(ids)
            np.testing.assert_array_equal(np.array(compiled), np.array(eager))
            seen[name] = np.array(compiled)
    assert np.abs(seen["half"] - seen["ft"]).max() > 1e-3
    assert np.abs(seen["null"] - seen["ft"]).max() > 1e-3
    np.testing.assert_array_equal(seen["ft_again"], seen["ft"])


def test_full_logits_fallback_agrees(
    backend: MLXDifferentialBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Architectures whose head is not a plain projection get full logits, read the same way."""
    encoded = [backend._encode(p)[0] for p in PROMPTS]
    with backend.as_finetuned():
        last = backend._last_logprobs(encoded)
        tokens = backend._token_logprobs(encoded)
        monkeypatch.setattr(backend, "_inner", backend.model)
        monkeypatch.setattr(backend, "_head", lambda logits: logits)
        np.testing.assert_allclose(backend._last_logprobs(encoded), last, atol=1e-5)
        for a, b in zip(backend._token_logprobs(encoded), tokens, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
