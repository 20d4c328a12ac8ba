"""The contract both real backends keep, asserted once and run on each (MLX, HF).

Views, restore after exceptions, batching, chunking, scoring against a direct forward,
windows, generation, nulls, adapter loading and preflight, on the tiny fixtures.
What only one backend has (compiled forwards, PEFT adapter names, torch RNG state,
dtype and device choice) is tested in ``test_mlx_backend.py`` / ``test_hf_backend.py``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fixtures_build
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sway_common.adapters import read_adapter
from sway_common.backend import limits
from sway_common.backend.model_views import ModelViews
from sway_common.backend.nulls import PlacedNull
from sway_common.backend.scoring import completion_start, rolling_windows, token_dist_from_logprobs
from sway_common.protocols import ViewConflictError

KINDS = [pytest.param("mlx", marks=pytest.mark.mlx), pytest.param("hf", marks=pytest.mark.hf)]
# Each backend's batch size and float32 tolerance for batched against unbatched or direct
# forwards (both backends pad a scoring batch on the right).
BATCH = {"mlx": 4, "hf": 3}
ATOL = {"mlx": 2e-5, "hf": 1e-5}

PROMPTS = [
    "The quick brown fox",
    "What is the capital of France?",
    "Once upon a time there was a small village by the sea, where",
    "A",
    "It is raining today, so we",
    "Fenwick's ledger records the tide, the weather and",
]
TEXT = (
    "Once upon a time there was a small village by the sea, where people fished and told "
    "stories. It is raining today, so we stay inside, drink tea and read books."
)


def make_backend(kind: str, model_dir: Path, adapter: Path, **kw: Any) -> ModelViews:
    # float32 unless a test asks otherwise: the contract compares against float32
    # references, and "auto" is bf16 on a GPU.
    kw.setdefault("dtype", "float32")
    if kind == "mlx":
        from sway_mlx.backend import MLXDifferentialBackend

        return MLXDifferentialBackend(model_dir, adapter, **kw)
    from sway_hf.backend import HFDifferentialBackend

    return HFDifferentialBackend(model_dir, adapter, device="cpu", **kw)


@pytest.fixture(scope="module", params=KINDS)
def backend(request, tiny_model_dir: Path, tiny_peft_adapter: Path):
    b = make_backend(
        request.param, tiny_model_dir, tiny_peft_adapter, batch_size=BATCH[request.param]
    )
    assert b.info["backend"] == request.param
    yield b
    b.close()


@pytest.fixture(scope="module")
def plain(backend, tiny_model_dir: Path) -> Callable[[list[int]], np.ndarray]:
    """log-softmax rows of the tiny model loaded by mlx-lm / transformers alone."""
    if kind_of(backend) == "mlx":
        from mlx_lm.utils import load

        model, _ = load(str(tiny_model_dir))
    else:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    return lambda ids: forward_logprobs(kind_of(backend), model, ids)


# ------------------------------------------------------------------ helpers
def kind_of(backend: ModelViews) -> str:
    return backend.info["backend"]


def forward_logprobs(kind: str, model: Any, ids: list[int]) -> np.ndarray:
    """log-softmax of the full logits of one unpadded sequence, (T, vocab), float32."""
    if kind == "mlx":
        import mlx.core as mx

        logits = model(mx.array([ids])).astype(mx.float32)[0]
        return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits.float()[0]
    return torch.log_softmax(logits, dim=-1).numpy()


def direct_logprobs(backend: ModelViews, ids: list[int]) -> np.ndarray:
    """The open view's model run directly, bypassing the backend's batching and heads."""
    return forward_logprobs(kind_of(backend), backend.runtime.model, ids)


def full_rows(view, prompts: list[str]) -> np.ndarray:
    """Full-vocabulary next-token log-probs per prompt, indexed by token id."""
    dists = view.next_token_dist_batch(prompts, top_k=view.scorer.runtime.vocab_size)
    out = np.empty((len(dists), dists[0].vocab_size), np.float32)
    for i, d in enumerate(dists):
        out[i, d.token_ids] = d.logprobs
    return out


def live_tensors(backend: ModelViews) -> dict[str, np.ndarray]:
    """The factor (and DoRA magnitude) tensors the model computes with right now."""
    out: dict[str, np.ndarray] = {}
    for s in backend.runtime.slots:
        if kind_of(backend) == "mlx":
            tensors = {"a": s.layer.lora_a, "b": s.layer.lora_b}
            if s.dora:
                tensors["m"] = s.layer.m
            out.update({f"{s.path}.{k}": np.array(v) for k, v in tensors.items()})
        else:
            out.update({f"{s.path}.{k}": t.detach().numpy().copy() for k, t in s.tensors().items()})
    return out


def slot_scale(backend: ModelViews, slot: Any) -> float:
    """The scale a module's LoRA term is multiplied by right now."""
    if kind_of(backend) == "mlx":
        return float(np.array(slot.layer.scale))
    return float(slot.layer.scaling[slot.adapter])


def live_scales(backend: ModelViews) -> list[float]:
    return [slot_scale(backend, s) for s in backend.runtime.slots]


def live_deltas(backend: ModelViews) -> dict[str, np.ndarray]:
    """ΔW = scale · B·A of every module as installed now, (out, in), float64."""
    out = {}
    for s in backend.runtime.slots:
        if kind_of(backend) == "mlx":
            a = np.array(s.layer.lora_a, np.float64).T
            b = np.array(s.layer.lora_b, np.float64).T
        else:
            a = s.a.detach().double().numpy()
            b = s.b.detach().double().numpy()
        out[s.path] = slot_scale(backend, s) * (b @ a)
    return out


def null_deltas(backend: ModelViews, seed: int = 11, **kw: Any) -> dict[str, np.ndarray]:
    with backend.as_null_adapter(seed, **kw):
        return live_deltas(backend)


def last_rows(backend: ModelViews, prompts: list[str]) -> np.ndarray:
    return backend.runtime.last_logprobs([backend.runtime.encode(p)[0] for p in prompts])


# -------------------------------------------------------------------- views
def test_lambda_zero_is_base_and_one_is_ft_exactly(backend) -> None:
    rows = {}
    for name, opener in (
        ("base", backend.as_base),
        ("ft", backend.as_finetuned),
        ("lam0", lambda: backend.as_scaled_adapter(0.0)),
        ("lam1", lambda: backend.as_scaled_adapter(1.0)),
        ("half", lambda: backend.as_scaled_adapter(0.5)),
    ):
        with opener() as view:
            rows[name] = (full_rows(view, PROMPTS), view.rolling_logprob(TEXT).logprobs)
    for i in (0, 1):
        np.testing.assert_array_equal(rows["lam0"][i], rows["base"][i])
        np.testing.assert_array_equal(rows["lam1"][i], rows["ft"][i])
    base, ft, half = rows["base"][0], rows["ft"][0], rows["half"][0]
    assert np.abs(ft - base).max() > 1e-3, "the trained adapter should move the model"
    assert np.abs(half - base).max() > 1e-4 and np.abs(half - ft).max() > 1e-4


def test_real_adapter_restored_after_null_view_raised(backend) -> None:
    real, scales = live_tensors(backend), live_scales(backend)
    with backend.as_finetuned():
        ft_before = last_rows(backend, PROMPTS)
    with pytest.raises(RuntimeError, match="boom"), backend.as_null_adapter(7) as view:
        view.next_token_dist(PROMPTS[0])
        inside = live_tensors(backend)
        assert all(not np.array_equal(inside[k], real[k]) for k in real)
        raise RuntimeError("boom")
    assert backend.active_view is None
    after = live_tensors(backend)
    for key, value in real.items():
        np.testing.assert_array_equal(after[key], value)
    assert live_scales(backend) == scales
    with backend.as_finetuned():
        np.testing.assert_array_equal(last_rows(backend, PROMPTS), ft_before)


def test_a_null_is_placed_once_and_installed_without_copies(backend, monkeypatch) -> None:
    """A null's factors become the backend's arrays once per draw; opening it again
    points the layers at those very arrays, and closing it brings the trained ones back."""
    placed: list[PlacedNull] = []
    runtime = backend.runtime

    def place(factors: dict[str, Any]) -> PlacedNull:
        placed.append(type(runtime).place_null(runtime, factors))
        return placed[-1]

    monkeypatch.setattr(runtime, "place_null", place)
    real = live_tensors(backend)
    for _ in range(2):
        with backend.as_null_adapter(23):
            for s in backend.runtime.slots:
                a = s.layer.lora_a if kind_of(backend) == "mlx" else s.a.data
                mine = placed[0][s.path].a
                assert a is mine or a.data_ptr() == mine.data_ptr(), s.path
    assert len(placed) == 1, "a null is converted once per draw"
    after = live_tensors(backend)
    for key, value in real.items():
        np.testing.assert_array_equal(after[key], value)


def test_scaled_view_restores_scales_after_raise(backend) -> None:
    scales = live_scales(backend)
    with pytest.raises(KeyError), backend.as_scaled_adapter(1.7):
        assert live_scales(backend) == pytest.approx([s * 1.7 for s in scales])
        raise KeyError("x")
    assert live_scales(backend) == scales


def test_base_view_restored_after_exception(backend) -> None:
    with backend.as_finetuned():
        ft = last_rows(backend, PROMPTS[:2])
    with pytest.raises(KeyError), backend.as_base():
        raise KeyError("x")
    with backend.as_finetuned():
        np.testing.assert_array_equal(last_rows(backend, PROMPTS[:2]), ft)


def test_two_open_views_conflict(backend) -> None:
    with backend.as_base() as v:
        with pytest.raises(ViewConflictError), backend.as_finetuned():
            pass
        with pytest.raises(ViewConflictError), backend.as_null_adapter(1):
            pass
        assert backend.active_view is v.spec
        v.next_token_dist(PROMPTS[0])
    with (
        backend.as_null_adapter(1),
        pytest.raises(ViewConflictError),
        backend.as_scaled_adapter(0.5),
    ):
        pass
    with backend.as_finetuned():
        pass  # the failed entries left nothing open


def test_view_used_after_its_block_raises(backend) -> None:
    with backend.as_finetuned() as view:
        view.next_token_dist(PROMPTS[0])
    with pytest.raises(ViewConflictError):
        view.next_token_dist(PROMPTS[1])
    with pytest.raises(ViewConflictError):
        view.logprob_of("The", " lighthouse")
    with backend.as_base(), pytest.raises(ViewConflictError):
        view.logprob_of("a", " b")


def test_set_adapter_refused_while_a_view_is_open(backend) -> None:
    with backend.as_base(), pytest.raises(ViewConflictError):
        backend.set_adapter(backend.runtime.adapter_path)


# ----------------------------------------------------------------- batching
def test_batched_equals_per_prompt(backend) -> None:
    atol = ATOL[kind_of(backend)]
    encoded = [backend.runtime.encode(p)[0] for p in PROMPTS]
    assert len({len(e) for e in encoded}) > 2  # really mixed lengths, so padding happens
    with backend.as_finetuned():
        batched = backend.runtime.last_logprobs(encoded)
        single = np.stack([backend.runtime.last_logprobs([e])[0] for e in encoded])
        np.testing.assert_allclose(batched, single, atol=atol)
        for e, row in zip(encoded, backend.runtime.token_logprobs(encoded), strict=True):
            assert row.shape == (len(e) - 1,)
            np.testing.assert_allclose(row, backend.runtime.token_logprobs([e])[0], atol=atol)
    # And through the public API: a batch equals prompts scored one by one.
    completions = [" jumps", " Paris.", " people", " b", " stay", " and the wind"]
    backend.scorer.cache.clear()
    with backend.as_finetuned() as view:
        dists = view.next_token_dist_batch(PROMPTS, top_k=16)
        full = full_rows(view, PROMPTS)
        batched_lp = view.logprob_of_batch(PROMPTS, completions)
    backend.scorer.cache.clear()
    with backend.as_finetuned() as view:
        for prompt, d in zip(PROMPTS, dists, strict=True):
            one = view.next_token_dist(prompt, top_k=16)
            np.testing.assert_array_equal(one.token_ids[:3], d.token_ids[:3])
            np.testing.assert_allclose(one.logprobs, d.logprobs, atol=atol)
        single_full = np.concatenate([full_rows(view, [p]) for p in PROMPTS])
        single_lp = [view.logprob_of(p, c) for p, c in zip(PROMPTS, completions, strict=True)]
    np.testing.assert_allclose(full, single_full, atol=atol, rtol=0)
    np.testing.assert_allclose(batched_lp, single_lp, atol=atol, rtol=0)


@pytest.mark.parametrize("top_k", [1, 16, 10_000])
def test_top_k_on_the_device_equals_slicing_full_rows_on_the_host(backend, top_k: int) -> None:
    encoded = [backend.runtime.encode(p)[0] for p in PROMPTS]
    with backend.as_finetuned():
        on_device = backend.runtime.last_dists(encoded, top_k)
        rows = backend.runtime.last_logprobs(encoded)
    assert len(on_device) == len(rows)
    for dist, row in zip(on_device, rows, strict=True):
        host = token_dist_from_logprobs(row, top_k)
        assert dist.vocab_size == host.vocab_size
        assert len(dist.token_ids) == len(host.token_ids) == min(top_k, backend.vocab_size)
        # Ties may order differently; the values in rank order and the id sets may not.
        np.testing.assert_allclose(dist.logprobs, host.logprobs, atol=1e-6)
        np.testing.assert_array_equal(np.sort(dist.token_ids[:-1]), np.sort(host.token_ids[:-1]))
        if host.tail_logprob is None:
            assert dist.tail_logprob is None
        else:
            assert dist.tail_logprob == pytest.approx(host.tail_logprob, abs=1e-4)


def test_token_logprobs_chunked_like_unchunked(backend, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = [backend.runtime.encode(t)[0] for t in (TEXT, PROMPTS[1], PROMPTS[3])]
    with backend.as_finetuned():
        whole = backend.runtime.token_logprobs(ids)
        # A budget of a few positions per step forces many chunks.
        monkeypatch.setattr(limits, "LOGIT_BUDGET", 3 * 2 * backend.vocab_size)
        chunked = backend.runtime.token_logprobs(ids)
    for w, c, row in zip(whole, chunked, ids, strict=True):
        assert w.dtype == np.float32 and w.shape == (len(row) - 1,)
        np.testing.assert_allclose(w, c, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ scoring
def test_base_view_equals_plain_model(backend, plain) -> None:
    ids = backend.runtime.encode(PROMPTS[1])[0]
    with backend.as_base() as view:
        row = full_rows(view, [PROMPTS[1]])[0]
    np.testing.assert_allclose(row, plain(ids)[-1], atol=1e-5)


@pytest.mark.parametrize("which", ["base", "ft"])
def test_logprob_of_matches_direct_forward(backend, which: str) -> None:
    cases = [
        ("The lighthouse stands on", " Quill Point, a granite spur", False),
        # A clean token boundary, so the direct sum is unambiguous.
        ("What is the capital of France?", " The capital of France is Paris.", True),
    ]
    opener = backend.as_base if which == "base" else backend.as_finetuned
    with opener() as view:
        for prompt, completion, clean in cases:
            got = view.logprob_of(prompt, completion)
            ids, offsets = backend.runtime.encode(prompt + completion)
            start = completion_start(offsets, len(prompt))
            assert 0 < start < len(ids)
            if clean:
                assert ids[:start] == backend.runtime.encode(prompt)[0]
            direct = direct_logprobs(backend, ids)
            want = sum(float(direct[i - 1, ids[i]]) for i in range(start, len(ids)))
            assert got == pytest.approx(want, abs=1e-4)
            assert got < 0
        last = full_rows(view, [cases[0][0]])[0]
        np.testing.assert_allclose(
            last, direct_logprobs(backend, backend.runtime.encode(cases[0][0])[0])[-1], atol=1e-5
        )


def test_rolling_logprob_beyond_max_context(backend, monkeypatch: pytest.MonkeyPatch) -> None:
    atol = ATOL[kind_of(backend)]
    monkeypatch.setattr(backend.runtime, "max_context", 16)
    text = TEXT + " (rolling)"  # a text no other test has cached
    with backend.as_finetuned() as view:
        rolled = view.rolling_logprob(text)
        ids = backend.runtime.encode(text)[0]
        full = direct_logprobs(backend, ids)
        windows = rolling_windows(len(ids), 16)
        want = []
        for w in windows:
            lp = direct_logprobs(backend, ids[w.start : w.end])
            want += [lp[j - 1 - w.start, ids[j]] for j in range(w.score_from, w.end)]
    assert len(ids) > 3 * 16, "the text must span several windows"
    assert rolled.logprobs.shape == (len(ids) - 1,)
    np.testing.assert_array_equal(rolled.token_ids, ids)
    np.testing.assert_allclose(rolled.logprobs, np.array(want), atol=atol)
    # The first window saw the whole prefix; later tokens really had a truncated context.
    first = [full[j - 1, ids[j]] for j in range(1, 16)]
    np.testing.assert_allclose(rolled.logprobs[:15], first, atol=atol)
    later = np.array([full[j - 1, ids[j]] for j in range(1, len(ids))])
    assert np.abs(rolled.logprobs - later).max() > 1e-3


def test_generate_greedy_and_seeded(backend) -> None:
    prompt = "The lighthouse"
    with backend.as_finetuned() as view:
        g1 = view.generate(prompt, max_new_tokens=12)
        g2 = view.generate(prompt, max_new_tokens=12)
        s1 = view.generate(prompt, max_new_tokens=12, temperature=1.0, seed=5)
        s2 = view.generate(prompt, max_new_tokens=12, temperature=1.0, seed=5)
        s3 = view.generate(prompt, max_new_tokens=12, temperature=1.0, seed=6)
        assert view.generate(prompt, max_new_tokens=0) == ""
        top = int(view.next_token_dist(prompt, top_k=1).token_ids[0])
        first = view.generate(prompt, max_new_tokens=1)
    assert g1 == g2 and isinstance(g1, str) and g1
    assert s1 == s2 and s1 != s3
    assert not g1.startswith(prompt), "only the new text is returned"
    # Greedy continues with the top-1 token of the view.
    if top != backend.tokenizer.eos_token_id:
        assert first == backend.tokenizer.decode([top])


# -------------------------------------------------------------------- nulls
def test_null_variance_linear_in_rank_scale(backend) -> None:
    # One seed: only B carries sqrt(rank_scale), so ΔW scales exactly by it.
    one = {
        k: np.mean([d.var() for d in null_deltas(backend, rank_scale=k).values()])
        for k in (1, 2, 4)
    }
    assert one[2] / one[1] == pytest.approx(2.0, rel=1e-3)
    assert one[4] / one[1] == pytest.approx(4.0, rel=1e-3)
    # Absolute level, pooled over seeds: Var(ΔW) = scale² · r · σ_A² · σ_B².
    slot = backend.runtime.slots[0]
    expected = live_scales(backend)[0] ** 2 * slot.rank * 0.02**4
    assert one[1] == pytest.approx(expected, rel=0.2)
    pooled = {}
    for k in (1.0, 2.0, 4.0):
        draws = [null_deltas(backend, 100 * int(k) + i, rank_scale=k) for i in range(8)]
        pooled[k] = float(np.var(np.concatenate([d.ravel() for x in draws for d in x.values()])))
    assert pooled[1.0] == pytest.approx(expected, rel=0.1)
    assert pooled[2.0] / pooled[1.0] == pytest.approx(2.0, rel=0.1)
    assert pooled[4.0] / pooled[1.0] == pytest.approx(4.0, rel=0.1)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_rank_scale_must_be_positive(backend, bad: float) -> None:
    with pytest.raises(ValueError, match="rank_scale"):
        backend.as_null_adapter(0, rank_scale=bad)
    with pytest.raises(ValueError, match="rank_scale"), backend.as_null_adapter(1, rank_scale=bad):
        pass
    assert backend.active_view is None


def test_norm_matched_nulls_match_real_norms(backend) -> None:
    real = {p: float(np.linalg.norm(d)) for p, d in live_deltas(backend).items()}
    from_file = read_adapter(backend.runtime.adapter_path).frobenius_norms()
    assert real.keys() == from_file.keys()  # every module checked below, none skipped
    assert all(r > 0 for r in real.values())
    for path, norm in real.items():
        assert from_file[path] == pytest.approx(norm, rel=1e-4)
    with backend.as_null_adapter(3, mode="norm_matched"):
        matched = {p: float(np.linalg.norm(d)) for p, d in live_deltas(backend).items()}
        inside = live_tensors(backend)
    with backend.as_null_adapter(3, mode="fixed"):
        fixed = {p: float(np.linalg.norm(d)) for p, d in live_deltas(backend).items()}
        inside_fixed = live_tensors(backend)
    for path, norm in real.items():
        assert matched[path] == pytest.approx(norm, rel=1e-4)
        assert abs(fixed[path] - norm) / norm > 0.1
    # Same seed, same direction: norm matching only rescales B.
    for key, value in inside.items():
        if key.endswith((".a", ".lora_A")):
            np.testing.assert_array_equal(value, inside_fixed[key])


def test_same_seed_same_null(backend) -> None:
    first = null_deltas(backend, 11, init_scale=0.05)
    again = null_deltas(backend, 11, init_scale=0.05)
    other = null_deltas(backend, 12, init_scale=0.05)
    paths = sorted(first)
    for p in paths:
        np.testing.assert_array_equal(first[p], again[p])
        assert not np.allclose(first[p], other[p])
    # Each module gets its own draw, not one draw repeated.
    assert not np.allclose(first[paths[0]][:8, :8], first[paths[2]][:8, :8])
    rows = []
    for seed in (3, 3, 4):
        backend.scorer.cache.clear()  # make every draw run the model again
        with backend.as_null_adapter(seed, init_scale=0.05) as view:
            rows.append(full_rows(view, PROMPTS[:2]))
    np.testing.assert_array_equal(rows[0], rows[1])
    assert np.abs(rows[0] - rows[2]).max() > 1e-6


# ----------------------------------------------------------------- adapters
def test_info_and_preflight(backend, tiny_peft_adapter: Path) -> None:
    info = backend.info
    assert info["backend"] in ("mlx", "hf")
    assert info["dtype"] == "float32" and info["rank"] == 4
    assert info["targets"] == ["q_proj", "v_proj"]
    assert info["modules"] == 4 and info["dora"] is False
    assert backend.adapter_hash == read_adapter(tiny_peft_adapter).content_hash
    assert backend.max_context == 256 and backend.vocab_size == 384
    assert backend.preflight_finite_check() == (
        True,
        "base and fine-tuned views give finite logits",
    )


def _renamed_layers(src: Path, dst: Path) -> Path:
    """An adapter for a layer the model does not have."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_proj"]
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(dst / "adapter_model.safetensors"))
    for key in list(tensors):
        tensors[key.replace("layers.1.", "layers.7.")] = tensors.pop(key)
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def _wrong_shape(src: Path, dst: Path) -> Path:
    """An adapter whose first lora_A does not fit its layer (which takes 64 inputs)."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "adapter_model.safetensors"))
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[key] = np.zeros((4, 7), np.float32)
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


# A layer the model lacks is caught by sway itself (ValueError); a shape may be refused
# first by the reader, PEFT or mlx-lm, each with its own exception.
@pytest.mark.parametrize(
    ("make_bad", "error"), [(_renamed_layers, ValueError), (_wrong_shape, Exception)]
)
def test_set_adapter_failure_keeps_previous(
    backend, tmp_path: Path, tiny_peft_adapter: Path, make_bad, error: type[Exception]
) -> None:
    before = (backend.adapter_hash, live_tensors(backend))
    with backend.as_finetuned():
        row = last_rows(backend, PROMPTS)
    bad = make_bad(tiny_peft_adapter, tmp_path / "bad")
    with pytest.raises(error):
        backend.set_adapter(bad)
    assert backend.adapter_hash == before[0]
    for key, value in live_tensors(backend).items():
        np.testing.assert_array_equal(value, before[1][key])
    with backend.as_finetuned():
        np.testing.assert_array_equal(last_rows(backend, PROMPTS), row)


@pytest.mark.parametrize("factor", ["lora_A", "lora_B"])
@pytest.mark.parametrize("kind", KINDS)
def test_preflight_fails_on_nan_adapter(
    kind: str, factor: str, tiny_model_dir: Path, tiny_peft_adapter: Path, tmp_path: Path
) -> None:
    bad = fixtures_build.nan_copy(tiny_peft_adapter, tmp_path / "nan", factor=factor)
    # Each backend names tensors as its own library does (mlx-lm: lora_a, PEFT: lora_A).
    name = factor.lower() if kind == "mlx" else factor
    with make_backend(kind, tiny_model_dir, bad) as b:
        ok, reason = b.preflight_finite_check()
        assert b.runtime.nonfinite_adapter_tensors()
        assert b.active_view is None
    assert not ok
    assert "NaN/Inf" in reason and name in reason


@pytest.mark.parametrize("kind", KINDS)
def test_close_is_idempotent(kind: str, tiny_model_dir: Path, tiny_peft_adapter: Path) -> None:
    b = make_backend(kind, tiny_model_dir, tiny_peft_adapter, dtype="fp32")
    b.close()
    b.close()
    assert b.runtime.model is None


# --------------------------------------------------------------------- DoRA
def test_dora_views(backend, plain, tiny_model_dir: Path, tiny_dora_adapter: Path) -> None:
    prompts = PROMPTS[:5]
    with make_backend(kind_of(backend), tiny_model_dir, tiny_dora_adapter) as b:
        assert b.info["dora"] is True and all(s.dora for s in b.runtime.slots)
        with b.as_base() as view:
            base = last_rows(b, prompts)
            base_full = full_rows(view, [prompts[4]])[0]
        with b.as_finetuned():
            ft = last_rows(b, prompts)
        with b.as_scaled_adapter(0.0):
            np.testing.assert_array_equal(last_rows(b, prompts), base)
        with b.as_scaled_adapter(1.0):
            np.testing.assert_array_equal(last_rows(b, prompts), ft)
        # Base really is the plain model: DoRA's magnitudes are switched off, not scaled.
        np.testing.assert_allclose(base_full, plain(b.runtime.encode(prompts[4])[0])[-1], atol=1e-5)
        assert np.abs(ft - base).max() > 1e-3
        real = live_tensors(b)
        with pytest.raises(RuntimeError), b.as_null_adapter(0, mode="norm_matched") as view:
            assert np.all(np.isfinite(full_rows(view, [prompts[4]])))
            raise RuntimeError("stop")
        for key, value in live_tensors(b).items():
            np.testing.assert_array_equal(value, real[key])
        with b.as_finetuned():
            np.testing.assert_array_equal(last_rows(b, prompts), ft)
        assert b.preflight_finite_check()[0]


# ------------------------------------------------------------------- shape
@pytest.mark.mlx
@pytest.mark.hf
def test_same_public_methods() -> None:
    """The two runtimes are used through one surface: no method only one has; the two
    packages hold the same modules."""
    from sway_hf.backend import HFRuntime
    from sway_mlx.backend import MLXRuntime

    def public(cls: type) -> set[str]:
        return {n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))}

    assert public(MLXRuntime) == public(HFRuntime)
    root = Path(__file__).resolve().parent.parent
    files = [{p.name for p in (root / pkg).glob("*.py")} for pkg in ("sway_mlx", "sway_hf")]
    assert files[0] == files[1]


@pytest.mark.mlx
@pytest.mark.hf
def test_lora_modules_have_the_same_functions() -> None:
    """``sway_mlx/lora.py`` and ``sway_hf/lora.py``: same public functions, same parameters."""
    import inspect

    from sway_hf import lora as hf_lora
    from sway_hf import stacked as hf_stacked
    from sway_mlx import lora as mlx_lora
    from sway_mlx import stacked as mlx_stacked

    def surface(module: Any) -> dict[str, list[str]]:
        return {
            name: list(inspect.signature(obj).parameters)
            for name, obj in vars(module).items()
            if not name.startswith("_")
            and inspect.isfunction(obj)
            and obj.__module__ == module.__name__
        }

    mlx_surface = surface(mlx_lora)
    assert mlx_surface == surface(hf_lora)
    assert {"attach", "detach", "install_base", "install_scaled", "install_null"} <= set(
        mlx_surface
    )
    assert mlx_surface["install_scaled"] == ["slots", "lam"]
    assert mlx_surface["install_null"] == ["slots", "placed"]
    assert (
        surface(mlx_stacked)
        == surface(hf_stacked)
        == {"install_stacked": ["model", "slots", "stack", "tile_at"]}
    )
