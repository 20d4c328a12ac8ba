"""Random-weight models of real architectures for the benchmarks: no download, any machine.

Each shape is a Llama-architecture config written in code. :func:`build_model` turns it
into a Hugging Face model dir (random weights, saved as safetensors) with a byte-level
BPE tokenizer trained in a second on a word list, plus a random r=8 PEFT LoRA on
q_proj/v_proj. The same dir loads in transformers and, through the MLX backend's config
normalisation, in mlx-lm, so both frameworks time the very same weights.

The tokenizer has 2,048 tokens but the model keeps the architecture's full vocabulary:
the LM head and the float32 log-softmax over it are a large share of scoring's cost, so
they must be the real size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

_LLAMA: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "bos_token_id": 0,
    "eos_token_id": 0,
}

SHAPES: dict[str, dict[str, Any]] = {
    # SmolLM2-135M: 30 thin layers, 49k vocabulary.
    "smollm2-135m": {
        **_LLAMA,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "rope_theta": 100000.0,
    },
    # Llama-3.2-1B: 16 wide layers, 128k vocabulary (1.24B parameters, tied head). Its
    # long-context rope scaling is left out: it changes no FLOP at these lengths.
    "llama-1b": {
        **_LLAMA,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
    },
    # Llama-3.1-8B: 32 layers of 4096, 128k vocabulary, untied head (8.0B parameters).
    # Build it on the GPU (build_model(..., device="cuda")): on a CPU the random init is slow.
    "llama-8b": {
        **_LLAMA,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
    # A few layers of nothing much: checks the benchmark's plumbing on a busy CPU.
    "tiny": {
        **_LLAMA,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 2048,
        "rope_theta": 10000.0,
    },
}

# The 1B model is saved in bfloat16: half the disk and load time, and random weights
# lose nothing by it; the backends cast to the dtype they run in.
_SAVE_DTYPE = {"llama-1b": "bfloat16", "llama-8b": "bfloat16"}

WORDS = [
    "light",
    "keeper",
    "storm",
    "ledger",
    "tide",
    "granite",
    "beam",
    "harbour",
    "schooner",
    "lamp",
    "garden",
    "steps",
    "gallery",
    "winter",
    "oil",
    "green",
    "flash",
    "reef",
    "crew",
]


def _tokenizer(model_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()  # without it decode() leaks "Ġ" and texts re-encode longer
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    rng = np.random.default_rng(0)
    tok.train_from_iterator([" ".join(rng.choice(WORDS, 64)) for _ in range(200)], trainer)
    special = "<|endoftext|>"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=special, bos_token=special, pad_token=special
    )
    fast.save_pretrained(str(model_dir))


def build_model(work: Path, shape: str = "smollm2-135m", device: str = "cpu") -> tuple[Path, Path]:
    """(model dir, adapter dir) of ``shape`` under ``work/shape``, built once and reused.

    ``device``: where the random weights are drawn (``cuda``: seconds for an 8B model)."""
    root = work / shape
    model_dir, adapter_dir = root / "model", root / "adapter"
    if (adapter_dir / "adapter_config.json").exists():
        return model_dir, adapter_dir
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    _tokenizer(model_dir)
    dtype = getattr(torch, _SAVE_DTYPE.get(shape, "float32"))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape]), dtype=dtype)
    model.save_pretrained(str(model_dir))
    peft = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    peft.save_pretrained(str(adapter_dir))
    return model_dir, adapter_dir


def texts_of_length(backend: Any, n: int, tokens: int, seed: int) -> list[str]:
    """n distinct texts of about ``tokens`` tokens (decode-then-encode may merge a few)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = backend.runtime.encode(" ".join(rng.choice(WORDS, tokens * 2)))[0][:tokens]
        out.append(backend.tokenizer.decode(ids))
    return out
