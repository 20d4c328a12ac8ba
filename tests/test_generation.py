"""Batched generation behind ``generate_batch``, on each real backend and the dummy.

The tiny fixtures check the contract on both backends (batch == one at a time, per-row
stops, ``max_new_tokens``, seeds, views, the chat template, the context window); the
SmolLM2 tests check that MLX and torch write the same greedy text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fixtures_build
import numpy as np
import pytest

from sway_common.backend.dummy import DummyDifferentialBackend, DummyRuntime
from sway_common.backend.generation import prompt_ids, row_draws
from sway_common.backend.model_views import ModelViews
from sway_common.backend.runtime import Runtime

KINDS = [pytest.param("mlx", marks=pytest.mark.mlx), pytest.param("hf", marks=pytest.mark.hf)]
# Different lengths, so rows of one batch are padded; five prompts and batch size 3 make
# two chunks.
PROMPTS = [
    "The quick brown fox",
    "Once upon a time there was a small village by the sea, where",
    "A",
    "What is the capital of France?",
    "It is raining today, so we",
]
N_NEW = 10
# A plain user/assistant template in the tiny tokenizer's special tokens.
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_backend(kind: str, model_dir: Path, adapter: Path | None, **kw: Any):
    kw.setdefault("dtype", "float32")
    if kind == "mlx":
        from sway_mlx.backend import MLXDifferentialBackend

        return MLXDifferentialBackend(model_dir, adapter, **kw)
    from sway_hf.backend import HFDifferentialBackend

    return HFDifferentialBackend(model_dir, adapter, device="cpu", **kw)


def loop_module(backend: ModelViews) -> Any:
    """The backend's own ``generate.py`` (same function on both)."""
    if backend.info["backend"] == "mlx":
        from sway_mlx import generate
    else:
        from sway_hf import generate
    return generate


@pytest.fixture(scope="module", params=KINDS)
def backend(request, tiny_model_dir: Path, tiny_peft_adapter: Path):
    b = make_backend(request.param, tiny_model_dir, tiny_peft_adapter, batch_size=3)
    yield b
    b.close()


# ------------------------------------------------------------------ greedy
def test_batch_greedy_equals_one_at_a_time(backend) -> None:
    with backend.as_finetuned() as view:
        batched = view.generate_batch(PROMPTS, max_new_tokens=N_NEW)
        single = [view.generate(p, max_new_tokens=N_NEW) for p in PROMPTS]
    assert batched == single
    assert all(isinstance(t, str) and t for t in batched)
    assert len(set(batched)) > 1, "different prompts should not all give one text"


def test_greedy_starts_with_the_views_top_token(backend) -> None:
    with backend.as_finetuned() as view:
        dists = view.next_token_dist_batch(PROMPTS, top_k=1)
        ids = [prompt_ids(backend.runtime, p, False) for p in PROMPTS]
        new = loop_module(backend).generate_tokens(
            backend.runtime.model, ids, max_new_tokens=1, temperature=0.0, draws=None, stop_ids=[]
        )
    assert [row[0] for row in new] == [int(d.token_ids[0]) for d in dists]


def test_each_row_stops_at_its_own_stop_token(backend) -> None:
    """A stop token in one row's greedy text ends that row there and no other."""
    ids = [prompt_ids(backend.runtime, p, False) for p in PROMPTS]
    loop = loop_module(backend).generate_tokens
    with backend.as_finetuned():
        free = loop(
            backend.runtime.model,
            ids,
            max_new_tokens=N_NEW,
            temperature=0.0,
            draws=None,
            stop_ids=[],
        )
        assert all(len(row) == N_NEW for row in free), "max_new_tokens without a stop"
        # A token that appears in some rows' text (not first) and is missing from others'.
        stop = next(t for row in free for t in row[2:] if any(t not in other for other in free))
        cut = loop(
            backend.runtime.model,
            ids,
            max_new_tokens=N_NEW,
            temperature=0.0,
            draws=None,
            stop_ids=[stop],
        )
    for row, short in zip(free, cut, strict=True):
        want = row[: row.index(stop)] if stop in row else row
        assert short == want
    assert any(stop not in row for row in free) and any(stop in row for row in free)


def test_max_new_tokens_zero_and_no_prompts(backend) -> None:
    with backend.as_finetuned() as view:
        assert view.generate_batch(PROMPTS[:2], max_new_tokens=0) == ["", ""]
        assert view.generate_batch([], max_new_tokens=5) == []
        assert view.generate(PROMPTS[0], max_new_tokens=0) == ""
        with pytest.raises(ValueError, match="max_new_tokens"):
            view.generate_batch(PROMPTS[:1], max_new_tokens=-1)
        one = view.generate_batch(PROMPTS[:1], max_new_tokens=1)[0]
        longer = view.generate_batch(PROMPTS[:1], max_new_tokens=N_NEW)[0]
    assert one and longer.startswith(one) and len(longer) > len(one)


def test_prompt_past_the_context_window_is_refused(backend) -> None:
    long = " ".join(["word"] * backend.max_context)
    with backend.as_finetuned() as view:
        with pytest.raises(ValueError, match="context window"):
            view.generate_batch([PROMPTS[0], long], max_new_tokens=4)
        # Room for the prompt but not for the new tokens: refused as well.
        n = backend.token_count(PROMPTS[0])
        with pytest.raises(ValueError, match="context window"):
            view.generate_batch([PROMPTS[0]], max_new_tokens=backend.max_context - n + 1)
        with pytest.raises(ValueError, match="no tokens"):
            view.generate_batch([""], max_new_tokens=4)


# ---------------------------------------------------------------- sampling
def test_seeded_sampling_is_reproducible_and_per_row(backend) -> None:
    kw = {"max_new_tokens": N_NEW, "temperature": 1.0}
    with backend.as_finetuned() as view:
        a = view.generate_batch(PROMPTS, seed=5, **kw)
        b = view.generate_batch(PROMPTS, seed=5, **kw)
        c = view.generate_batch(PROMPTS, seed=6, **kw)
        # Row i draws from stream (seed, i): neither the other prompts nor the chunking
        # change it, so a one-prompt call matches row 0.
        first = view.generate(PROMPTS[0], seed=5, **kw)
        same = view.generate_batch([PROMPTS[0]] * 3, seed=5, **kw)
        greedy = view.generate_batch(PROMPTS, max_new_tokens=N_NEW)
    assert a == b
    assert a != c
    assert first == a[0]
    assert len(set(same)) > 1, "repeated prompts in one call are separate draws"
    assert a != greedy


def test_row_draws_depend_on_seed_and_row_only() -> None:
    a, b = row_draws(5, 3, 4), row_draws(5, 2, 4)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(a[0], row_draws(6, 1, 4)[0])
    assert all(((d >= 0) & (d < 1)).all() for d in a)


# ------------------------------------------------------------------- views
def test_views_generate_their_own_text_and_restore(backend) -> None:
    kw = {"max_new_tokens": N_NEW}
    with backend.as_finetuned() as view:
        ft = view.generate_batch(PROMPTS, **kw)
    with backend.as_base() as view:
        base = view.generate_batch(PROMPTS, **kw)
    with backend.as_scaled_adapter(0.0) as view:
        assert view.generate_batch(PROMPTS, **kw) == base
    with backend.as_scaled_adapter(1.0) as view:
        assert view.generate_batch(PROMPTS, **kw) == ft
    nulls = []
    for seed in (5, 5, 6):
        with backend.as_null_adapter(seed, init_scale=0.2) as view:
            nulls.append(view.generate_batch(PROMPTS, **kw))
    with backend.as_finetuned() as view:
        again = view.generate_batch(PROMPTS, **kw)
    assert ft != base, "the trained adapter changes what the model writes"
    assert nulls[0] == nulls[1], "a null view is fixed by its seed"
    assert nulls[0] != nulls[2] and nulls[0] != ft
    assert again == ft, "leaving a view restores the fine-tune"


# -------------------------------------------------------------------- chat
def test_chat_applies_the_tokenizers_template(backend) -> None:
    tokenizer = backend.tokenizer
    assert not tokenizer.chat_template, "the tiny tokenizer has no template of its own"
    prompt = PROMPTS[3]
    with backend.as_finetuned() as view:
        # Without a template chat=True is the plain text.
        plain = view.generate_batch([prompt], max_new_tokens=N_NEW)
        assert view.generate_batch([prompt], max_new_tokens=N_NEW, chat=True) == plain
        tokenizer.chat_template = TEMPLATE
        try:
            ids = prompt_ids(backend.runtime, prompt, True)
            chat = view.generate_batch([prompt], max_new_tokens=N_NEW, chat=True)
            rendered = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
            by_hand = view.generate_batch([rendered], max_new_tokens=N_NEW)
        finally:
            tokenizer.chat_template = None
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids == backend.runtime.encode(rendered)[0]
    assert chat == by_hand
    assert chat != plain


def test_dummy_generates_batches_and_ignores_chat() -> None:
    backend = DummyDifferentialBackend()
    with backend.as_finetuned() as view:
        batched = view.generate_batch(["Hi", "Hello there"], max_new_tokens=6)
        assert batched == [view.generate(p, max_new_tokens=6) for p in ["Hi", "Hello there"]]
        assert view.generate_batch(["Hi"], max_new_tokens=6, chat=True) == batched[:1]
        kw = {"max_new_tokens": 6, "temperature": 1.0}
        a = view.generate_batch(["Hi", "Hi"], seed=1, **kw)
        assert a == view.generate_batch(["Hi", "Hi"], seed=1, **kw)
        assert a != view.generate_batch(["Hi", "Hi"], seed=2, **kw)
        assert a[0] != a[1]
    assert all(len(t) == 6 for t in batched)


def test_a_backend_without_the_token_loop_is_refused_by_name() -> None:
    # Every hook but generate_tokens: refused when built, not on its first generate call.
    hooks = {
        name: getattr(DummyRuntime, name)
        for name in Runtime.__abstractmethods__ - {"generate_tokens"}
    }
    no_loop = type("NoLoop", (Runtime,), hooks)
    with pytest.raises(TypeError, match="generate_tokens"):
        no_loop()


# --------------------------------------------------- SmolLM2, across backends
SMOL_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three primary colours are",
    "Water boils at",
    "My favourite book is",
]
SMOL_NEW = 24


@pytest.fixture(scope="module")
def smol_pair(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """SmolLM2 fp32 on both backends with one deterministic PEFT adapter (random B)."""
    pytest.importorskip("mlx_lm")
    pytest.importorskip("peft")
    adapter = build_smol_adapter(smollm2_dir, tmp_path_factory.mktemp("smol_gen_adapter"))
    mlx_b = make_backend("mlx", smollm2_dir, adapter, batch_size=8)
    hf_b = make_backend("hf", smollm2_dir, adapter, batch_size=8)
    yield mlx_b, hf_b
    mlx_b.close()
    hf_b.close()


def build_smol_adapter(model_dir: Path, dst: Path) -> Path:
    """LoRA r=4 on q_proj/v_proj of the last 8 layers, seeded A and a small random B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    torch.manual_seed(0)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        layers_to_transform=list(range(22, 30)),
    )
    peft_model = get_peft_model(model, cfg)
    fixtures_build.randomize_lora(peft_model, seed=0)
    peft_model.save_pretrained(str(dst))
    return dst


def first_difference(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


@pytest.mark.slow
@pytest.mark.mlx
@pytest.mark.hf
@pytest.mark.parametrize("opener", ["as_base", "as_finetuned"])
def test_smollm2_same_greedy_text_on_mlx_and_torch(smol_pair, opener: str) -> None:
    mlx_b, hf_b = smol_pair
    texts = []
    for b in smol_pair:
        with getattr(b, opener)() as view:
            texts.append(view.generate_batch(SMOL_PROMPTS, max_new_tokens=SMOL_NEW))
    assert texts[0] == texts[1]
    assert all(texts[0])


@pytest.mark.slow
@pytest.mark.mlx
@pytest.mark.hf
def test_smollm2_adapter_changes_the_text_and_chat_uses_the_template(smol_pair) -> None:
    mlx_b, hf_b = smol_pair
    with mlx_b.as_base() as view:
        base = view.generate_batch(SMOL_PROMPTS, max_new_tokens=SMOL_NEW)
    with mlx_b.as_finetuned() as view:
        ft = view.generate_batch(SMOL_PROMPTS, max_new_tokens=SMOL_NEW)
    assert base != ft
    question = ["What is the capital of France?"]
    chats = []
    for b in smol_pair:
        ids = prompt_ids(b.runtime, question[0], True)
        assert ids[0] == b.tokenizer.convert_tokens_to_ids("<|im_start|>")
        with b.as_base() as view:
            chats.append(view.generate_batch(question, max_new_tokens=SMOL_NEW, chat=True))
            plain = view.generate_batch(question, max_new_tokens=SMOL_NEW)
        assert chats[-1] != plain
    assert chats[0] == chats[1]
