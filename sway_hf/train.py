"""Train a LoRA adapter with PEFT on a few text chunks: the demo's trainer on torch.

Deliberately small: AdamW over the chunks for a fixed number of steps, each step on
``batch_size`` chunks taken in turn (all of them by default).
Writes a standard PEFT adapter dir (and Trainer-style ``checkpoint-N/`` dirs when
``save_every`` is set), atomically, so a cache never holds a half-written adapter.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import cast


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """No "Loading weights" bar and no deprecation notice between the caller's progress
    lines: the trainer's caller (the demo, a test) shows its own progress."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # PEFT reads a property transformers v5 deprecated; not the user's concern.
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def train_lora(
    model_dir: str | Path,
    chunks: Sequence[str],
    out_dir: str | Path,
    *,
    steps: int,
    rank: int = 8,
    alpha: float = 16.0,
    learning_rate: float = 1e-3,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    num_layers: int = 8,
    seed: int = 0,
    max_tokens: int = 128,
    batch_size: int | None = None,
    save_every: int | None = None,
    dora: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with _quiet_loading():
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    # Moved in place (PreTrainedModel.to returns the model itself). Called as a Module:
    # transformers' wraps(Module.to) leaves PreTrainedModel.to typed with an unbound self.
    cast(torch.nn.Module, base).to(device)
    # Only the last blocks, as mlx-lm's --num-layers does: backprop then stops there,
    # which is most of the cost of a step on a CPU.
    depth = base.config.num_hidden_layers
    config = LoraConfig(
        r=rank,
        # Annotated int, used as a number (scaling = alpha / r): a float alpha is kept as given.
        lora_alpha=cast(int, alpha),
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        layers_to_transform=list(range(max(0, depth - num_layers), depth)),
        use_dora=dora,
    )
    with _quiet_loading():
        model = get_peft_model(base, config)
    encoded = tokenizer(
        list(chunks), return_tensors="pt", padding=True, truncation=True, max_length=max_tokens
    ).to(device)
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    size = min(batch_size or len(chunks), len(chunks))
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=learning_rate, weight_decay=0.0
    )

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".train-", dir=out.parent))
    try:
        model.train()
        for step in range(1, steps + 1):
            rows = [((step - 1) * size + i) % len(chunks) for i in range(size)]
            batch = {k: v[rows] for k, v in encoded.items()}
            loss = model(**batch, labels=labels[rows]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if on_step is not None:
                on_step(step, float(loss.detach()))
            if save_every and step % save_every == 0 and step < steps:
                model.save_pretrained(str(tmp / f"checkpoint-{step}"))
        model.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
