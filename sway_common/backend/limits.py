"""Limits and load-time checks every real backend applies the same way."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

# The most float32 logits one scoring step may hold (2**25 floats = 128 MiB): long texts
# are scored in chunks of positions so (rows × positions × vocab) never exists at once.
LOGIT_BUDGET = 1 << 25
# Rolling windows cost O(T²) attention memory; cap what "the model's context" means
# unless the caller asks for more (some configs advertise 128k positions).
DEFAULT_MAX_CONTEXT = 2048


# On an accelerator a step may hold more: this share of the free memory, at most 1 GiB of
# float32. Every step costs a few kernel launches (docs/benchmarks.md: how many steps the
# CPU's budget made on an H100).
LOGIT_MEMORY_SHARE = 0.05
MAX_LOGIT_BUDGET = 1 << 28


def positions_per_step(rows: int, vocab_size: int, budget: int | None = None) -> int:
    """How many positions of ``rows`` sequences one chunk of logits may cover.

    ``budget``: floats of logits per chunk (a backend's :func:`resolve_logit_budget`);
    None reads :data:`LOGIT_BUDGET` at call time, so a test can shrink it.
    """
    return max(1, (budget or LOGIT_BUDGET) // max(1, rows * vocab_size))


def resolve_logit_budget(free_bytes: int | None) -> int | None:
    """Floats of logits one scoring step may hold: None off an accelerator (the default
    :data:`LOGIT_BUDGET`), else sized from the memory left free after loading."""
    if not free_bytes:
        return None
    return int(min(MAX_LOGIT_BUDGET, max(LOGIT_BUDGET, free_bytes * LOGIT_MEMORY_SHARE // 4)))


# Off an accelerator: rows per forward as before (a CPU gains little from more rows).
CPU_BATCH_SIZE = 8
# Off an accelerator, what one more forward costs in padded tokens (for
# scoring.length_buckets): a CPU forward reads every weight once, whatever its size.
# Chosen by a sweep on a CPU (docs/benchmarks.md, "Measurements behind the defaults").
# On an accelerator a step's fixed cost dwarfs its padding: batches stay full there.
CPU_STEP_TOKENS = 96.0
# On an accelerator: at most this many rows, and activations in at most this share of
# the memory left free after loading (the rest: the allocator, the logits, the system).
MAX_AUTO_BATCH = 256
MEMORY_SHARE = 0.5


def resolve_step_tokens(free_bytes: int | None) -> float | None:
    """What one more forward costs in padded tokens (``scoring.length_buckets``):
    :data:`CPU_STEP_TOKENS` off an accelerator (no free memory to report), else None."""
    return CPU_STEP_TOKENS if free_bytes is None else None


def resolve_batch_size(
    requested: int | str,
    free_bytes: int | None,
    config: Mapping[str, Any],
    *,
    context: int,
    dtype_bytes: int,
    vocab_size: int,
) -> int:
    """Rows per forward: ``requested``, or for ``"auto"`` sized from the device.

    ``free_bytes`` is the accelerator memory left after loading (None on a CPU, which
    keeps :data:`CPU_BATCH_SIZE`). A row is costed at ``context`` tokens with
    ``config``'s widths: a few residual- and MLP-wide activations, and attention scores
    of every head plus a float32 mask (eager attention, the worst case), so a batch of
    the longest windows still fits; the last-position logits stay in the logit budget.
    """
    if requested != "auto":
        if isinstance(requested, str) and not requested.isdigit():
            raise ValueError(f"batch_size must be a positive integer or 'auto', got {requested!r}")
        return max(1, int(requested))
    if not free_bytes:
        return CPU_BATCH_SIZE
    text = config.get("text_config") or config
    hidden = int(text.get("hidden_size") or 4096)
    mlp = int(text.get("intermediate_size") or 4 * hidden)
    heads = int(text.get("num_attention_heads") or 32)
    per_row = context * (6 * hidden + 3 * mlp) * dtype_bytes
    per_row += context * context * (2 * heads * dtype_bytes + 4)
    rows = int((free_bytes * MEMORY_SHARE - 4 * LOGIT_BUDGET) // per_row)
    return max(1, min(rows, MAX_AUTO_BATCH, LOGIT_BUDGET // max(1, vocab_size)))


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
