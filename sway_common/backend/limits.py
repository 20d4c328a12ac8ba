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


# ---------------------------------------------------------------- adapter fit
ANOTHER_BASE = "the adapter was likely trained on another base model; evaluate it with that one"


def missing_module(path: str) -> str:
    """Why an adapter module has no layer to sit on: the same words on every backend."""
    return f"adapter targets {path!r}, which this model does not have: {ANOTHER_BASE}"


def misfit(
    path: str, a: tuple[int, ...], b: tuple[int, ...], weight: tuple[int, int]
) -> str | None:
    """Why factors ``a`` (r, in) and ``b`` (out, r) do not fit a layer of ``weight`` (out, in).

    None when they fit. Torch's own words for this ("size mismatch for ...") name neither
    the cause nor the fix, so both backends check before loading and say this instead.
    """
    if (int(b[0]), int(a[1])) == tuple(weight):
        return None
    return (
        f"adapter factors for {path!r} have shapes A{tuple(a)} B{tuple(b)}, which do not fit "
        f"this model's layer of weight {tuple(weight)} (out, in): {ANOTHER_BASE}"
    )
