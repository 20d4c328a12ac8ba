"""The backend-neutral half of text generation: prompts in, texts out.

A runtime supplies only its decoding loop (``generate_tokens``: token ids of a padded
batch in, new token ids per row out, stop token left off). Everything around it lives
here once, so the backends cannot drift apart on it: the chat template, the check
against the context window, chunking into the backend's batch size, the random draws
of seeded sampling and decoding the new tokens to text.

Seeded sampling is inverse-CDF sampling from uniforms drawn in numpy: row ``i`` of a
call uses the stream ``(seed, i)``, and at each step takes the first token whose
cumulative probability under ``softmax(logprobs / temperature)`` exceeds the next
uniform. A row's sample thus depends on its seed, its place in the call and its own
logits only: not on the batch size, on the other prompts, or on which framework's RNG
runs. The same seed mostly gives the same text on MLX and on torch; a row parts where
the backends' float32 logits (~1e-4 nats apart) move a CDF boundary past its draw, and
from there on it differs. Plain temperature sampling, no top-k/top-p, so a seed means
the same thing on every model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from sway_common.backend.scoring import length_buckets

Draws = list[NDArray[np.float64]]
"""Per row, one uniform in [0, 1) per new token (None in a loop's call: greedy)."""


class Generating(Protocol):
    """What :func:`generate_texts` reads from a runtime."""

    tokenizer: Any
    batch_size: int

    @property
    def prompt_limit(self) -> int | None: ...

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]: ...

    def generate_tokens(
        self, batch: list[list[int]], max_new_tokens: int, temperature: float, draws: Draws | None
    ) -> list[list[int]]: ...

    def decode_new(self, ids: list[int]) -> str: ...


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(backend: Generating, prompt: str, chat: bool) -> list[int]:
    """The token ids generation starts from.

    Plain: encoded as every scoring call encodes text. Chat: the prompt as one user
    turn of the tokenizer's template, with the assistant's turn opened; the rendered
    template already holds its special tokens, so none are added again. A tokenizer
    without a template gets the plain text.
    """
    if chat and has_chat_template(backend.tokenizer):
        text = backend.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = list(backend.tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        ids = backend.encode(prompt)[0]
    if not ids:
        raise ValueError(f"prompt {prompt[:40]!r} encodes to no tokens; give a non-empty prompt")
    return ids


def check_room(batch: Sequence[Sequence[int]], max_new_tokens: int, limit: int | None) -> None:
    """Refuse a prompt whose continuation would run past the context window.

    Positions past it are ones the model never saw in training: what it writes there
    is not the model's behaviour, so this fails before any token is generated.
    """
    if limit is None:
        return
    for i, ids in enumerate(batch):
        if len(ids) + max_new_tokens > limit:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it "
                f"would run past the context window of {limit} tokens"
            )


def row_draws(seed: int, rows: int, max_new_tokens: int) -> Draws:
    """The uniforms of rows ``0..rows-1`` for ``seed`` (see the module docstring)."""
    base = int(seed) % (1 << 64)  # SeedSequence takes non-negative entropy only
    return [np.random.default_rng([base, i]).random(max_new_tokens) for i in range(rows)]


def inverse_cdf_np(logprobs: NDArray[np.floating], temperature: float, u: float) -> int:
    """The sampled token of one row in numpy: what the backends do on their arrays."""
    scaled = logprobs.astype(np.float32) / np.float32(temperature)
    probs = np.exp(scaled - scaled.max())
    cdf = np.cumsum(probs / probs.sum(), dtype=np.float32)
    return int(min(np.sum(cdf < np.float32(u)), len(cdf) - 1))


def stop_ids(tokenizer: Any, configured: int | Iterable[int] | None) -> list[int]:
    """Tokens that end a row: the tokenizer's EOS and the model config's EOS id(s)."""
    ids = set()
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(t) for t in configured)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def cut_at_stop(ids: Sequence[int], stops: Sequence[int]) -> list[int]:
    """``ids`` up to, not including, the first stop token."""
    for n, token in enumerate(ids):
        if token in stops:
            return list(ids[:n])
    return list(ids)


def decode_new(tokenizer: Any, ids: list[int]) -> str:
    """Only the new text: special tokens (a chat turn's end, padding) are not text."""
    return str(tokenizer.decode(ids, skip_special_tokens=True))


def generate_texts(
    backend: Generating,
    prompts: Sequence[str],
    max_new_tokens: int,
    temperature: float,
    seed: int,
    chat: bool,
) -> list[str]:
    """One continuation per prompt, in order, through the runtime's decoding loop.

    Prompts of similar length share a batch (less padding); each batch holds at most
    ``backend.batch_size`` rows. ``temperature <= 0`` is greedy.
    """
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if max_new_tokens == 0 or not prompts:
        return [""] * len(prompts)
    batch = [prompt_ids(backend, p, chat) for p in prompts]
    check_room(batch, max_new_tokens, backend.prompt_limit)
    draws = row_draws(seed, len(batch), max_new_tokens) if temperature > 0 else None
    out = [""] * len(batch)
    for rows in length_buckets([len(ids) for ids in batch], backend.batch_size):
        new = backend.generate_tokens(
            [batch[i] for i in rows],
            max_new_tokens,
            float(temperature),
            [draws[i] for i in rows] if draws is not None else None,
        )
        for i, ids in zip(rows, new, strict=True):
            out[i] = backend.decode_new(ids[:max_new_tokens])
    return out
