"""Stacked views equal the one-view path, on both backends and the shared null machinery.

``next_token_dist_views`` scores base, ft, λ and null views' rows in shared batches
(and the blocks below the first adapted one once per prompt); every number must match
opening each view on its own within float32 tolerance, land in the same cache entries,
and DoRA must fall back to one view at a time.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import sway_common.backend.stacker as backend_stacker
from sway_common.backend import limits
from sway_common.backend.dummy import DummyDifferentialBackend
from sway_common.backend.model_views import ModelViews
from sway_common.backend.nulls import NullSpec
from sway_common.backend.stacking import first_adapted_block, stack_plan
from sway_common.backend.views import ViewSpec
from sway_common.null_cache import NullCache
from sway_common.probes.adapter_ablation import AdapterAblationConfig, AdapterAblationProbe
from sway_common.probes.base import mean_divergence
from sway_common.probes.context import NextTokenDivergence, NullCalibration, RunContext
from sway_common.protocols import ViewConflictError

KINDS = [pytest.param("mlx", marks=pytest.mark.mlx), pytest.param("hf", marks=pytest.mark.hf)]
ATOL = 2e-5  # float32 logprobs; measured ≤ 2.4e-6 on the tiny model
TOP_K = 40
PROMPTS = [
    "The quick brown fox",
    "What is the capital of France?",
    "A",
    "Once upon a time there was a small village by the sea, where",
    "It is raining today, so we",
]
VIEWS = [
    ViewSpec("base"),
    ViewSpec("ft"),
    ViewSpec("scaled", lam=0.5),
    ViewSpec("scaled", lam=1.25),
    ViewSpec("scaled", lam=1.0),  # the ft view again: one cache entry
    ViewSpec("null", null=NullSpec(3, mode="norm_matched")),
    ViewSpec("null", null=NullSpec(4, rank_scale=2.0, init_scale=0.05)),
]


def make_backend(kind: str, model_dir: Path, adapter: Path, **kw: Any) -> ModelViews:
    if kind == "mlx":
        from sway_mlx.backend import MLXDifferentialBackend

        return MLXDifferentialBackend(model_dir, adapter, **kw)
    from sway_hf.backend import HFDifferentialBackend

    return HFDifferentialBackend(model_dir, adapter, device="cpu", **kw)


def one_view(backend: ModelViews, views: list[ViewSpec], prompts: list[str]):
    """The reference: each view opened on its own, from an empty cache."""
    backend.scorer.cache.clear()
    out = []
    for view in views:
        with backend.open(view):
            out.append(backend.scorer.next_token_dists(view, prompts, TOP_K))
    backend.scorer.cache.clear()
    return out


def assert_same(stacked, reference, atol: float = ATOL) -> None:
    for dists, refs in zip(stacked, reference, strict=True):
        for d, r in zip(dists, refs, strict=True):
            # The top tokens agree; past them float32 noise may reorder near-ties.
            np.testing.assert_array_equal(d.token_ids[:5], r.token_ids[:5])
            np.testing.assert_allclose(d.logprobs, r.logprobs, rtol=0, atol=atol)


@pytest.fixture(scope="session")
def upper_adapter(tiny_peft_adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny PEFT adapter on layer 1 only: layer 0 is a prefix every view shares."""
    dst = tmp_path_factory.mktemp("upper") / "adapter"
    shutil.copytree(tiny_peft_adapter, dst)
    weights = dst / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if ".layers.0." not in k}, str(weights))
    config = json.loads((dst / "adapter_config.json").read_text())
    config["layers_to_transform"] = [1]
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module", params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def backend(kind: str, tiny_model_dir: Path, tiny_peft_adapter: Path):
    b = make_backend(kind, tiny_model_dir, tiny_peft_adapter, batch_size=3)
    yield b
    b.close()


@pytest.fixture(scope="module")
def upper(kind: str, tiny_model_dir: Path, upper_adapter: Path):
    b = make_backend(kind, tiny_model_dir, upper_adapter, batch_size=3)
    yield b
    b.close()


@contextlib.contextmanager
def rows_out_of_block(backend: ModelViews, index: int) -> Iterator[list[int]]:
    """Records how many rows decoder block ``index`` gives on each forward."""
    rows: list[int] = []
    if backend.info["backend"] == "mlx":
        block = backend.runtime.model.model.layers[index]
        cls, call = type(block), type(block).__call__

        def recording(self, *args, **kwargs):
            out = call(self, *args, **kwargs)
            if self is block:
                rows.append(int(out.shape[0]))
            return out

        cls.__call__ = recording
        try:
            yield rows
        finally:
            cls.__call__ = call
        return

    def hook(module, args, output):
        rows.append(int((output[0] if isinstance(output, tuple) else output).shape[0]))

    handle = backend.runtime._causal_lm.model.layers[index].register_forward_hook(hook)
    try:
        yield rows
    finally:
        handle.remove()


# ------------------------------------------------------------------- equality
def test_stacked_equals_one_view_for_a_mix_of_views(backend) -> None:
    backend.scorer.cache.clear()
    stacked = backend.next_token_dist_views(VIEWS, PROMPTS, top_k=TOP_K)
    # Block 0 is adapted: only the embedding lies below it, so nothing is shared or checked.
    assert backend.stacker.shared_blocks[backend.adapter_hash] is None
    assert_same(stacked, one_view(backend, VIEWS, PROMPTS))


def test_stacked_results_are_the_one_view_cache_entries(backend, monkeypatch) -> None:
    backend.scorer.cache.clear()
    stacked = backend.next_token_dist_views(VIEWS, PROMPTS, top_k=TOP_K)

    def no_forward(batch, top_k):
        raise AssertionError("a stacked result was computed again")

    monkeypatch.setattr(backend.runtime, "last_dists", no_forward)
    for view, dists in zip(VIEWS, stacked, strict=True):
        with backend.open(view):
            again = backend.scorer.next_token_dists(view, PROMPTS, TOP_K)
        assert all(a is d for a, d in zip(again, dists, strict=True))


def test_views_missing_different_prompts_are_stacked_per_group(backend) -> None:
    reference = one_view(backend, VIEWS, PROMPTS)
    with backend.open(VIEWS[2]):
        backend.scorer.next_token_dists(VIEWS[2], PROMPTS[:2], TOP_K)
    with backend.open(VIEWS[5]):
        backend.scorer.next_token_dists(VIEWS[5], PROMPTS[3:], TOP_K)
    assert_same(backend.next_token_dist_views(VIEWS, PROMPTS, top_k=TOP_K), reference)


def test_more_views_than_a_step_holds(backend, monkeypatch) -> None:
    views = [ViewSpec("base")] + [ViewSpec("null", null=NullSpec(s)) for s in range(6)]
    monkeypatch.setattr(limits, "LOGIT_BUDGET", 3 * backend.vocab_size)  # 3 rows per step
    backend.scorer.cache.clear()
    stacked = backend.next_token_dist_views(views, PROMPTS, top_k=TOP_K)
    monkeypatch.undo()
    assert_same(stacked, one_view(backend, views, PROMPTS))


def test_stacking_refused_while_a_view_is_open(backend) -> None:
    with backend.as_base(), pytest.raises(ViewConflictError):
        backend.next_token_dist_views(VIEWS[:2], PROMPTS, top_k=TOP_K)


def test_real_adapter_back_after_stacking(backend) -> None:
    reference = one_view(backend, [ViewSpec("ft")], PROMPTS)
    backend.next_token_dist_views(VIEWS, PROMPTS, top_k=TOP_K)
    assert_same(one_view(backend, [ViewSpec("ft")], PROMPTS), reference, atol=0.0)


# -------------------------------------------------------------- shared prefix
def test_shared_prefix_runs_lower_blocks_once_per_prompt(upper) -> None:
    views = [ViewSpec("base"), ViewSpec("ft"), ViewSpec("null", null=NullSpec(1))]
    reference = one_view(upper, views, PROMPTS)
    upper.stacker.shared_blocks.clear()
    upper.stacker.shared_block()  # the one-time check runs its own forwards
    assert upper.stacker.shared_blocks[upper.adapter_hash] == "model.layers.1"
    with rows_out_of_block(upper, 0) as below, rows_out_of_block(upper, 1) as adapted:
        stacked = upper.next_token_dist_views(views, PROMPTS, top_k=TOP_K)
    assert sum(below) == len(PROMPTS)  # each prompt once below the adapted block
    assert sum(adapted) == len(views) * len(PROMPTS)  # from there on once per view
    assert_same(stacked, reference)


def test_a_wrong_shared_block_is_caught_and_not_used(backend, monkeypatch) -> None:
    # Layer 0 is adapted too: sharing it would give every view the same rows there.
    monkeypatch.setattr(backend_stacker, "first_adapted_block", lambda paths: "model.layers.1")
    backend.stacker.shared_blocks.clear()
    assert backend.stacker.shared_block() is None
    stacked = backend.next_token_dist_views(VIEWS, PROMPTS, top_k=TOP_K)
    monkeypatch.undo()
    backend.stacker.shared_blocks.clear()
    assert_same(stacked, one_view(backend, VIEWS, PROMPTS))


def test_shared_block_outcome_kept_across_runs(upper, tmp_path: Path, monkeypatch) -> None:
    info = upper.info
    upper.check_store = NullCache(tmp_path)
    try:
        upper.stacker.shared_blocks.clear()
        checked = upper.stacker.shared_block()  # the first run checks, and keeps the outcome
        assert checked == "model.layers.1"
        assert len(list(tmp_path.rglob("*.json"))) == 1

        def no_check(self: object, block: str) -> None:
            raise AssertionError("checked again although the outcome was kept")

        monkeypatch.setattr(type(upper.stacker), "check_shared_block", no_check)
        upper.stacker.shared_blocks.clear()  # a new process, as far as the backend knows
        assert upper.stacker.shared_block() == checked
        # Another framework version may run other model code: checked afresh.
        monkeypatch.undo()
        upper.runtime.info = {**upper.info, "frameworks": {"mlx": "0.0.0"}}
        upper.stacker.shared_blocks.clear()
        assert upper.stacker.shared_block() == checked
        assert len(list(tmp_path.rglob("*.json"))) == 2
    finally:
        upper.check_store = None
        upper.runtime.info = info
        upper.stacker.shared_blocks.clear()


# ---------------------------------------------------------------------- DoRA
def test_dora_falls_back_to_one_view_at_a_time(
    kind: str, tiny_model_dir: Path, tiny_dora_adapter: Path
) -> None:
    b = make_backend(kind, tiny_model_dir, tiny_dora_adapter, batch_size=3)
    try:
        assert b.runtime.install_stacked([], None) is None
        stacked = b.next_token_dist_views(VIEWS, PROMPTS, top_k=TOP_K)
        assert_same(stacked, one_view(b, VIEWS, PROMPTS), atol=0.0)
    finally:
        b.close()


# ---------------------------------------------------------------------- nulls
def null_rows(backend: Any, stacked: bool) -> tuple[list[list[float]], int]:
    """K × P null divergences through RunContext, and the one-view forwards it ran."""
    backend.scorer.cache.clear()
    ctx = RunContext(backend, null=NullCalibration(runs=4, mode="norm_matched"))
    if not stacked:
        ctx._stack_null_views = lambda *_: None  # type: ignore[method-assign]
    forwards = 0
    plain = backend.runtime.last_dists

    def counting(batch, top_k):
        nonlocal forwards
        forwards += backend.active_view is not None
        return plain(batch, top_k)

    backend.runtime.last_dists = counting
    try:

        def measure(b: Any) -> list[float]:
            return mean_divergence(b, PROMPTS, top_k=TOP_K, kind="js")[1]

        _, rows = ctx.null_per_prompt(measure, key=NextTokenDivergence("js", TOP_K, tuple(PROMPTS)))
    finally:
        del backend.runtime.last_dists
    return rows, forwards


def test_null_per_prompt_stacked_equals_the_seed_loop(backend) -> None:
    stacked, one_view_forwards = null_rows(backend, stacked=True)
    looped, loop_forwards = null_rows(backend, stacked=False)
    assert one_view_forwards == 0 and loop_forwards > 0
    # fp32 on a GPU sums in another order: 1.3e-4 relative measured on an H100 (MLX-CUDA).
    np.testing.assert_allclose(stacked, looped, rtol=5e-4, atol=1e-7)


def test_null_per_prompt_on_a_backend_that_cannot_stack() -> None:
    dummy = DummyDifferentialBackend(batch_size=2)
    stacked, _ = null_rows(dummy, stacked=True)
    looped, _ = null_rows(dummy, stacked=False)
    np.testing.assert_array_equal(stacked, looped)


# ---------------------------------------------------------- probes, stacked
class Unstacked:
    """The backend without ``next_token_dist_views``: probes then open one view at a time."""

    def __init__(self, inner: ModelViews) -> None:
        self._inner = inner
        # Spelled out: from Python 3.12 an isinstance check against a runtime protocol
        # looks the members up statically, past __getattr__.
        self.as_base = inner.as_base
        self.as_finetuned = inner.as_finetuned
        self.as_scaled_adapter = inner.as_scaled_adapter
        self.as_null_adapter = inner.as_null_adapter

    def __getattr__(self, name: str) -> Any:
        if name == "next_token_dist_views":
            raise AttributeError(name)
        return getattr(self._inner, name)


@contextlib.contextmanager
def view_forwards(backend: ModelViews) -> Iterator[list[int]]:
    """Records the batch size of each forward run inside an open (one-view) view."""
    seen: list[int] = []
    plain = backend.runtime.last_dists

    def counting(batch, top_k):
        if backend.active_view is not None:
            seen.append(len(batch))
        return plain(batch, top_k)

    backend.runtime.last_dists = counting  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        del backend.runtime.last_dists


def test_mean_divergence_is_stacked_and_equals_one_view(backend) -> None:
    backend.scorer.cache.clear()
    with view_forwards(backend) as forwards:
        stacked = mean_divergence(backend, PROMPTS, top_k=TOP_K, kind="js")[1]
    backend.scorer.cache.clear()
    looped = mean_divergence(Unstacked(backend), PROMPTS, top_k=TOP_K, kind="js")[1]
    backend.scorer.cache.clear()
    assert forwards == []
    np.testing.assert_allclose(stacked, looped, rtol=5e-4, atol=1e-7)


def test_adapter_ablation_is_stacked_and_equals_one_view(backend) -> None:
    cfg = AdapterAblationConfig(name="a", kind="adapter_ablation", prompts=PROMPTS, top_k=TOP_K)
    backend.scorer.cache.clear()
    with view_forwards(backend) as forwards:
        stacked = AdapterAblationProbe().run(cfg, RunContext(backend))
    backend.scorer.cache.clear()
    looped = AdapterAblationProbe().run(cfg, RunContext(Unstacked(backend)))
    backend.scorer.cache.clear()
    assert forwards == []  # base and every λ came from stacked batches
    assert stacked.evidence["lambdas"] == looped.evidence["lambdas"]
    assert stacked.evidence["curve"][0] == 0.0  # λ=0 is the base view's own entry
    np.testing.assert_allclose(
        stacked.evidence["curve"], looped.evidence["curve"], rtol=5e-4, atol=1e-7
    )
    assert stacked.verdict is looped.verdict


# ----------------------------------------------------------------- the plans
def test_first_adapted_block() -> None:
    paths = ["model.layers.22.self_attn.q_proj", "model.layers.29.mlp.up_proj"]
    assert first_adapted_block(paths) == "model.layers.22"
    assert first_adapted_block([*paths, "lm_head"]) is None
    assert first_adapted_block([*paths, "vision.blocks.3.attn.qkv"]) is None
    assert first_adapted_block([]) is None


def test_stack_plan_rows() -> None:
    kw = {"batch_size": 8, "max_context": 2048, "vocab_size": 49152}
    # Short prompts: as many rows as the last-position logits may take.
    assert stack_plan(9, 12, **kw) == (9, limits.LOGIT_BUDGET // 49152 // 9)
    # Full windows: no more tokens than a one-view batch; more views take two steps.
    assert stack_plan(9, 2048, **kw) == (8, 1)
    assert stack_plan(4, 2048, **kw) == (4, 2)
    views, prompts = stack_plan(1000, 12, **kw)
    assert views * prompts <= limits.LOGIT_BUDGET // 49152


def test_logit_budget_from_free_memory() -> None:
    assert limits.resolve_logit_budget(None) is None  # a CPU: the default, read at call time
    assert limits.positions_per_step(2, 1000) == limits.LOGIT_BUDGET // 2000
    h100 = limits.resolve_logit_budget(78 << 30)
    assert h100 == limits.MAX_LOGIT_BUDGET  # 5% of 78 GiB is more than the cap
    assert limits.positions_per_step(1, 49152, h100) == limits.MAX_LOGIT_BUDGET // 49152
    assert limits.resolve_logit_budget(1 << 30) == limits.LOGIT_BUDGET  # never below the default
    assert limits.LOGIT_BUDGET < limits.resolve_logit_budget(8 << 30) < limits.MAX_LOGIT_BUDGET


def test_step_cost_only_off_an_accelerator() -> None:
    # The backends report no free memory exactly on a CPU; a full GPU still has a number.
    assert limits.resolve_step_tokens(None) == limits.CPU_STEP_TOKENS
    assert limits.resolve_step_tokens(0) is None
    assert limits.resolve_step_tokens(78 << 30) is None


def test_auto_batch_size() -> None:
    smollm = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9}
    kw = {"context": 2048, "dtype_bytes": 2, "vocab_size": 49152}
    assert limits.resolve_batch_size("auto", None, smollm, **kw) == limits.CPU_BATCH_SIZE
    assert limits.resolve_batch_size(5, 80 << 30, smollm, **kw) == 5
    h100 = limits.resolve_batch_size("auto", 78 << 30, smollm, **kw)
    small = limits.resolve_batch_size("auto", 8 << 30, smollm, **kw)
    assert 1 <= small < h100 <= limits.MAX_AUTO_BATCH
    llama_1b = {"text_config": {"hidden_size": 2048, "intermediate_size": 8192}}
    assert limits.resolve_batch_size("auto", 78 << 30, llama_1b, **kw) < h100
    assert limits.resolve_batch_size("auto", 1 << 20, smollm, **kw) == 1
    with pytest.raises(ValueError, match="auto"):
        limits.resolve_batch_size("big", None, smollm, **kw)
