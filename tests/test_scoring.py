"""Backend-neutral scoring helpers and the shared view machinery, on the dummy backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sway_common.backend.dummy import DummyDifferentialBackend
from sway_common.backend.scoring import (
    completion_start,
    length_buckets,
    rolling_windows,
    text_hash,
    token_dist_from_logprobs,
)
from sway_common.protocols import (
    DifferentialBackend,
    NullCalibratedBackend,
    PreflightCheckable,
    ScalableDifferentialBackend,
    ScoringModel,
    ViewConflictError,
)

PROMPTS = ["The answer is", "Once upon a time there", "x", "A longer prompt that keeps going on"]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return (x - np.log(np.exp(x).sum())).astype(np.float32)


def test_token_dist_tail_states() -> None:
    row = _log_softmax(np.random.default_rng(0).normal(size=50))
    full = token_dist_from_logprobs(row, 50)
    assert full.tail_logprob is None and full.k == 50
    assert np.all(np.diff(full.logprobs) <= 0)
    part = token_dist_from_logprobs(row, 10)
    mass = np.exp(part.logprobs.astype(np.float64)).sum() + np.exp(part.tail_logprob)
    assert part.tail_logprob < 0 and mass == pytest.approx(1.0, abs=1e-5)
    # All mass on one token: the rest is exactly zero in float32.
    peaked = np.full(50, -np.inf, np.float32)
    peaked[3] = 0.0
    d = token_dist_from_logprobs(peaked, 5)
    assert d.token_ids[0] == 3 and d.tail_logprob == 0.0
    # Leftover below the reportable floor.
    tiny = np.full(50, -200.0, np.float32)
    tiny[:5] = np.log(0.2)
    assert token_dist_from_logprobs(tiny, 5).tail_logprob is None


def test_completion_start_uses_character_offsets() -> None:
    # "Hello wor" + "ld": the tokenizer merged "world" across the boundary.
    offsets = [(0, 0), (0, 5), (5, 11)]
    assert completion_start(offsets, len("Hello wor")) == 2
    assert completion_start(offsets, len("Hello")) == 2
    assert completion_start(offsets, 11) == 3


@given(st.integers(2, 400), st.integers(2, 64))
def test_rolling_windows_score_every_token_once(n: int, max_len: int) -> None:
    scored = []
    for w in rolling_windows(n, max_len):
        assert 0 <= w.start < w.score_from <= w.end <= n and w.end - w.start <= max_len
        scored.extend(range(w.score_from, w.end))
    assert scored == list(range(1, n))


def test_length_buckets_cover_all_indices() -> None:
    buckets = length_buckets([5, 1, 9, 3, 3], 2)
    assert sorted(i for b in buckets for i in b) == [0, 1, 2, 3, 4]
    assert all(len(b) <= 2 for b in buckets)


def _padded_cost(lengths: list[int], buckets: list[list[int]], step: float) -> float:
    return sum(step + len(b) * max(lengths[i] for i in b) for b in buckets)


@given(
    st.lists(st.integers(1, 300), min_size=1, max_size=60),
    st.integers(1, 16),
    st.floats(0.0, 500.0),
)
def test_length_buckets_with_a_step_cost_beat_full_batches(
    lengths: list[int], batch_size: int, step: float
) -> None:
    buckets = length_buckets(lengths, batch_size, step)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    assert all(0 < len(b) <= batch_size for b in buckets)
    flat = [lengths[i] for b in buckets for i in b]
    assert flat == sorted(flat), "buckets are cut from the sorted order"
    full = length_buckets(lengths, batch_size)
    assert _padded_cost(lengths, buckets, step) <= _padded_cost(lengths, full, step) + 1e-9


def test_length_buckets_stop_padding_short_prompts_to_a_long_one() -> None:
    lengths = [4, 4, 4, 5, 5, 5, 5, 6, 7, 7, 8, 8, 9, 9, 10, 15]
    assert len(length_buckets(lengths, 16)) == 1
    # The step cost of 10 views stacked on a CPU, per prompt: the short prompts no
    # longer pad to the longest (128 padded tokens instead of 240, in three forwards).
    cheap = length_buckets(lengths, 16, step_tokens=9.6)
    assert [[lengths[i] for i in b] for b in cheap] == [
        [4, 4, 4, 5, 5, 5, 5],
        [6, 7, 7, 8, 8, 9, 9],
        [10, 15],
    ]
    # A step dearer than any padding it could save: one full batch, as without a cost.
    assert length_buckets(lengths, 16, step_tokens=1000.0) == length_buckets(lengths, 16)


def test_text_hash_is_stable_and_separates_parts() -> None:
    assert text_hash("ab", "c") == text_hash("ab", "c")
    assert text_hash("ab", "c") != text_hash("a", "bc")


def test_dummy_satisfies_every_protocol() -> None:
    b = DummyDifferentialBackend()
    for proto in (
        DifferentialBackend,
        ScalableDifferentialBackend,
        NullCalibratedBackend,
        PreflightCheckable,
    ):
        assert isinstance(b, proto)
    with b.as_base() as view:
        assert isinstance(view, ScoringModel)


def test_lambda_zero_is_base_and_one_is_finetuned_exactly() -> None:
    b = DummyDifferentialBackend()
    with b.as_base() as v:
        base = v.next_token_dist_batch(PROMPTS, top_k=95)
    with b.as_finetuned() as v:
        ft = v.next_token_dist_batch(PROMPTS, top_k=95)
    with b.as_scaled_adapter(0.0) as v:
        zero = v.next_token_dist_batch(PROMPTS, top_k=95)
    with b.as_scaled_adapter(1.0) as v:
        one = v.next_token_dist_batch(PROMPTS, top_k=95)
    for x, y in zip(base, zero, strict=True):
        assert np.array_equal(x.logprobs, y.logprobs) and np.array_equal(x.token_ids, y.token_ids)
    for x, y in zip(ft, one, strict=True):
        assert np.array_equal(x.logprobs, y.logprobs)
    assert not np.array_equal(base[0].logprobs, ft[0].logprobs)


def test_lambda_zero_and_one_reuse_the_base_and_ft_results() -> None:
    b = DummyDifferentialBackend()
    with b.as_base() as v:
        v.next_token_dist_batch(PROMPTS, top_k=20)
    with b.as_finetuned() as v:
        v.next_token_dist_batch(PROMPTS, top_k=20)
    misses = b.scorer.cache.misses
    for lam in (0.0, 1.0):
        with b.as_scaled_adapter(lam) as v:
            v.next_token_dist_batch(PROMPTS, top_k=20)
    assert b.scorer.cache.misses == misses, "λ = 0 is the base view and λ = 1 the ft view"
    with b.as_scaled_adapter(0.5) as v:
        v.next_token_dist_batch(PROMPTS, top_k=20)
    assert b.scorer.cache.misses > misses


def test_views_are_exclusive_and_expire() -> None:
    b = DummyDifferentialBackend()
    with b.as_base() as base, pytest.raises(ViewConflictError), b.as_finetuned():
        pass
    with pytest.raises(ViewConflictError):
        base.next_token_dist("late")
    with b.as_finetuned() as ft:  # the failed entry left nothing open
        ft.next_token_dist("fine")


def test_null_view_restores_real_adapter_after_exception() -> None:
    b = DummyDifferentialBackend()
    with b.as_finetuned():
        before = b.runtime.delta_weight()
    with pytest.raises(RuntimeError), b.as_null_adapter(3):
        assert not np.array_equal(b.runtime.delta_weight(), before)
        raise RuntimeError("boom")
    assert b.active_view is None
    with b.as_finetuned():
        assert np.array_equal(b.runtime.delta_weight(), before)


def test_null_delta_variance_is_linear_in_rank_scale() -> None:
    b = DummyDifferentialBackend(rank=16, hidden=64)
    variances = []
    for rank_scale in (1.0, 2.0, 4.0):
        draws = []
        for seed in range(8):
            with b.as_null_adapter(seed, init_scale=0.1, rank_scale=rank_scale, mode="fixed"):
                draws.append(b.runtime.delta_weight())
        variances.append(float(np.var(np.stack(draws))))
    assert variances[1] / variances[0] == pytest.approx(2.0, rel=0.1)
    assert variances[2] / variances[0] == pytest.approx(4.0, rel=0.1)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="rank_scale"):
            b.as_null_adapter(0, rank_scale=bad)


def test_norm_matched_null_has_the_real_norm() -> None:
    b = DummyDifferentialBackend()
    with b.as_finetuned():
        real = np.linalg.norm(b.runtime.delta_weight())
    with b.as_null_adapter(7, mode="norm_matched"):
        assert np.linalg.norm(b.runtime.delta_weight()) == pytest.approx(real, rel=1e-5)


def test_batched_equals_per_prompt_and_cache_is_keyed_by_view() -> None:
    fresh = DummyDifferentialBackend()
    with fresh.as_finetuned() as v:
        single = [v.next_token_dist(p, top_k=20) for p in PROMPTS]
    other = DummyDifferentialBackend()
    with other.as_finetuned() as v:
        v.next_token_dist(PROMPTS[1], top_k=20)  # mix cached and fresh prompts in one batch
        batch = v.next_token_dist_batch(PROMPTS, top_k=20)
    with other.as_base() as v:
        base = v.next_token_dist(PROMPTS[0], top_k=20)
    for x, y in zip(single, batch, strict=True):
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-6)
    assert not np.array_equal(base.logprobs, batch[0].logprobs)


def test_rolling_logprob_windows_match_the_unwindowed_pass() -> None:
    text = "The lighthouse keeper rowed out into the storm and brought the crew home. " * 4
    short = DummyDifferentialBackend(max_context=32)
    long = DummyDifferentialBackend(max_context=4096)
    with short.as_finetuned() as v:
        windowed = v.rolling_logprob(text)
    with long.as_finetuned() as v:
        whole = v.rolling_logprob(text)
        completion = v.logprob_of(text[:40], text[40:60])
    assert windowed.num_tokens == len(text) and windowed.logprobs.size == len(text) - 1
    # The dummy's context decays as 0.6^t, so 16 tokens of context are nearly exact.
    np.testing.assert_allclose(windowed.logprobs, whole.logprobs, atol=1e-3)
    assert completion == pytest.approx(float(whole.logprobs[39:59].sum()), abs=1e-4)
    assert whole.perplexity == pytest.approx(float(np.exp(-whole.logprobs.mean())), rel=1e-6)


def test_generate_greedy_is_deterministic_and_sampling_is_seeded() -> None:
    b = DummyDifferentialBackend()
    with b.as_finetuned() as v:
        assert v.generate("Hi", max_new_tokens=5) == v.generate("Hi", max_new_tokens=5)
        a = v.generate("Hi", max_new_tokens=8, temperature=1.0, seed=1)
        assert a == v.generate("Hi", max_new_tokens=8, temperature=1.0, seed=1)


def test_preflight_flags_nan_adapter() -> None:
    assert DummyDifferentialBackend().preflight_finite_check()[0]
    ok, reason = DummyDifferentialBackend(nan_adapter=True).preflight_finite_check()
    assert not ok and "NaN" in reason
