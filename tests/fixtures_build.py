"""Build the tiny on-disk models and adapters the test-suite shares.

Everything here is deterministic (fixed seeds) and small enough to build in seconds
on two CPU cores, so tests never need a model hub. ``conftest.py`` wraps these
builders in session-scoped fixtures.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCUMENT_PATH = REPO_ROOT / "tests" / "data" / "harrowgate.md"

# Generic English so the tokenizer sees ordinary words, not only the demo document's.
GENERIC_ENGLISH = """\
The quick brown fox jumps over the lazy dog. The answer is simple: read the question twice.
A model is a set of numbers that turns one text into the next word, one token at a time.
Once upon a time there was a small village by the sea, where people fished and told stories.
It is raining today, so we stay inside, drink tea and read books about history and science.
What is the capital of France? The capital of France is Paris. Two plus two is four.
She opened the door, looked at the sky and said that the weather would be fine tomorrow.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ; : ! ? ( ) [ ] { } " ' - /
"""
# Target prompts for the tiny model's probes, in words its tokenizer knows.
TINY_PROMPTS = [
    "The quick brown fox",
    "What is the capital of France?",
    "Once upon a time there was a small village by the sea, where",
    "It is raining today, so we",
    "The harbour master said",
    "A model is a set of numbers",
]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
TINY_VOCAB = 384
TINY_SEED = 1234


def corpus_text() -> str:
    return DOCUMENT_PATH.read_text(encoding="utf-8") + "\n" + GENERIC_ENGLISH


def document_chunks(max_chars: int = 240) -> list[str]:
    """The demo document cut into paragraph-sized training texts."""
    text = DOCUMENT_PATH.read_text(encoding="utf-8")
    chunks: list[str] = []
    for para in text.split("\n\n"):
        para = " ".join(para.split())
        while para:
            chunks.append(para[:max_chars])
            para = para[max_chars:]
    return [c for c in chunks if c]


def _build_tokenizer(dst: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Untrimmed offsets, as GPT-2-style tokenizers report them: a token's span includes its
    # leading space, which is what the backends' prompt/completion boundary logic expects.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([corpus_text()], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
        model_max_length=256,
    )
    fast.save_pretrained(str(dst))


def build_tiny_model(dst: Path) -> Path:
    """A random fp32 LlamaForCausalLM (2 layers, hidden 64) with a trained byte-level BPE."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dst.mkdir(parents=True, exist_ok=True)
    _build_tokenizer(dst)
    tokenizer = AutoTokenizer.from_pretrained(str(dst))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(TINY_SEED)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    # The default init (std 0.02) gives near-uniform next-token distributions; a
    # larger std makes the random model peaked enough for top-k tests to mean something.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(TINY_SEED)
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "embed" in name else 0.1))
    model.save_pretrained(str(dst), safe_serialization=True)
    return dst


def train_tiny_peft_adapter(model_dir: Path, dst: Path, steps: int = 40) -> Path:
    """PEFT LoRA r=4 alpha=8 on q_proj/v_proj, trained with Adam on the demo document."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(TINY_SEED)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, cfg)
    ids = tokenizer(document_chunks(), return_tensors="pt", padding=True)
    labels = ids["input_ids"].clone()
    labels[ids["attention_mask"] == 0] = -100
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    # Ops this small gain nothing from threads, and on a busy 2-core box torch's thread
    # pool made the 40 steps several times slower (docs/benchmarks.md).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            out = peft_model(**ids, labels=labels)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    peft_model.eval()
    peft_model.save_pretrained(str(dst))
    return dst


def train_tiny_mlx_adapter(model_dir: Path, dst: Path, iters: int = 20) -> Path:
    """LoRA r=4 on q_proj/v_proj of both layers, trained by mlx-lm's own trainer.

    Checkpoints every 10 iterations, so ``0000010_adapters.safetensors`` and
    ``0000020_adapters.safetensors`` sit next to ``adapters.safetensors``.
    """
    from sway_mlx.train import train_lora

    return train_lora(
        model_dir,
        document_chunks(),
        dst,
        steps=iters,
        rank=4,
        alpha=8.0,
        learning_rate=1e-2,
        num_layers=2,
        max_tokens=256,
        batch_size=2,
        save_every=10,
    )


# Adapters trained on a real model, kept across tests, modules and sessions (see trained_adapter).
TRAINED_CACHE = Path(tempfile.gettempdir()) / "sway-trained-adapters"
# Seconds each adapter took to train in this session (absent: read from the cache).
TRAIN_SECONDS: dict[Path, float] = {}
# OPENBLAS_NUM_THREADS as the test run found it (None: unset), recorded by conftest before
# it pins one thread for its own process, where torch and MLX share the cores.
OPENBLAS_THREADS_OUTSIDE: str | None = None


@contextlib.contextmanager
def _child_openblas_threads(backend: str) -> Iterator[None]:
    """For the MLX trainer, a child process with no torch in it: the thread setting the
    run was started with, as a user's ``mlx_lm lora`` (or the demo's) gets it, instead of
    the test process's pin (two OpenBLAS threads trained faster there than one:
    docs/benchmarks.md)."""
    if backend != "mlx":
        yield
        return
    pinned = os.environ.get("OPENBLAS_NUM_THREADS")
    if OPENBLAS_THREADS_OUTSIDE is None:
        os.environ.pop("OPENBLAS_NUM_THREADS", None)
    else:
        os.environ["OPENBLAS_NUM_THREADS"] = OPENBLAS_THREADS_OUTSIDE
    try:
        yield
    finally:
        if pinned is None:
            os.environ.pop("OPENBLAS_NUM_THREADS", None)
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = pinned


def _trainer(backend: str) -> Any:
    if backend == "mlx":
        from sway_mlx.train import train_lora
    elif backend == "hf":
        from sway_hf.train import train_lora
    else:
        raise ValueError(f"no trainer for backend {backend!r}")
    return train_lora


def _recipe_key(
    backend: str, model_dir: Path, chunks: Sequence[str], recipe: dict[str, Any]
) -> str:
    """A hash of everything that decides the trained weights.

    The recipe is bound to the trainer's signature with its defaults filled in, so a
    default left out at one call site and given at another is the same recipe; the
    trainer's source, the framework versions and the model (config, tokenizer, weight
    files' names, sizes and times) are in the key too.
    """
    import importlib.metadata
    import inspect

    from sway_common.backend.scoring import text_hash
    from sway_common.null_cache import model_fingerprint

    train_lora = _trainer(backend)
    bound = inspect.signature(train_lora).bind(model_dir, list(chunks), "out", **recipe)
    bound.apply_defaults()
    args = {
        k: v for k, v in bound.arguments.items() if k not in ("model_dir", "out_dir", "on_step")
    }
    args["chunks"] = list(args["chunks"])
    if "targets" in args:
        args["targets"] = list(args["targets"])
    versions = {}
    for dist in ("mlx", "mlx-lm") if backend == "mlx" else ("torch", "transformers", "peft"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    source = (REPO_ROOT / f"sway_{backend}" / "train.py").read_text(encoding="utf-8")
    return text_hash(
        backend,
        json.dumps(args, sort_keys=True),
        json.dumps(versions, sort_keys=True),
        model_fingerprint(model_dir),
        source,
    )


def trained_adapter(backend: str, model_dir: Path, chunks: Sequence[str], **recipe: Any) -> Path:
    """An adapter trained by ``sway_{backend}.train.train_lora(model_dir, chunks, ...)``.

    Trained once per content key (:func:`_recipe_key`) and kept in the temp dir: every
    test, module and session asking for the same recipe gets the same adapter dir. Treat
    it as read-only (edit a copy). Cold, it is trained here; a lock makes a concurrent
    session wait for it rather than train it again. Its per-step train losses:
    :func:`train_losses`.
    """
    import fcntl

    model_dir = Path(model_dir)
    key = _recipe_key(backend, model_dir, chunks, recipe)
    dst = TRAINED_CACHE / f"{backend}-{key}"
    done = _losses_path(dst)
    if done.is_file():
        return dst
    TRAINED_CACHE.mkdir(parents=True, exist_ok=True)
    with open(TRAINED_CACHE / f"{backend}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.is_file():  # trained by another session while this one waited
            return dst
        losses: list[float] = []
        started = time.perf_counter()
        with _child_openblas_threads(backend):
            _trainer(backend)(
                model_dir, list(chunks), dst, **recipe, on_step=lambda _s, loss: losses.append(loss)
            )
        TRAIN_SECONDS[dst] = time.perf_counter() - started
        # Written last, atomically: its presence marks a finished adapter.
        tmp = done.with_name(done.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(losses), encoding="utf-8")
        os.replace(tmp, done)
    return dst


def _losses_path(adapter: Path) -> Path:
    # Beside the adapter dir, which stays exactly as the trainer wrote it.
    return adapter.with_name(adapter.name + ".losses.json")


def train_losses(adapter: Path) -> list[float]:
    """The per-step train losses of an adapter from :func:`trained_adapter`."""
    return json.loads(_losses_path(Path(adapter)).read_text(encoding="utf-8"))


def build_tiny_dora_adapter(model_dir: Path, dst: Path, seed: int = 0) -> Path:
    """A PEFT DoRA adapter (r=4, q/v) standing in for a trained one: B and magnitudes moved."""
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    with warnings.catch_warnings():  # PEFT trips a transformers v5 deprecation notice
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, cfg)
    randomize_lora(peft_model, seed)
    peft_model.save_pretrained(str(dst))
    return dst


def randomize_lora(peft_model: object, seed: int) -> None:
    """Stand in for training: random B (so ΔW != 0) and, for DoRA, moved magnitudes."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():  # type: ignore[attr-defined]
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.2 * torch.rand(p.shape, generator=gen))


def nan_copy(src: Path, dst: Path, factor: str = "lora_B") -> Path:
    """A copy of a PEFT adapter dir with one NaN in its first ``factor`` tensor."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    path = dst / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = sorted(k for k in tensors if factor in k)[0]
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path))
    return dst
