"""Limits and load-time checks every real backend applies the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The most float32 logits one scoring step may hold (2**25 floats = 128 MiB): long texts
# are scored in chunks of positions so (rows × positions × vocab) never exists at once.
LOGIT_BUDGET = 1 << 25
# Rolling windows cost O(T²) attention memory; cap what "the model's context" means
# unless the caller asks for more (some configs advertise 128k positions).
DEFAULT_MAX_CONTEXT = 2048


def positions_per_step(rows: int, vocab_size: int) -> int:
    """How many positions of ``rows`` sequences one chunk of logits may cover."""
    # Read at call time, so a test can shrink the budget to force many chunks.
    return max(1, LOGIT_BUDGET // max(1, rows * vocab_size))


def context_limit(advertised: int | None, requested: int | None) -> int:
    """The window length to score with: the caller's, else the model's capped at the default."""
    if requested:
        return int(requested)
    return min(int(advertised or DEFAULT_MAX_CONTEXT), DEFAULT_MAX_CONTEXT)


def require_fast_tokenizer(tokenizer: Any, model_dir: Path) -> None:
    """Character offsets split prompt from completion tokens; only fast tokenizers give them."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{model_dir} has no fast tokenizer (tokenizer.json); character offsets "
            "are needed to split prompt and completion tokens"
        )
