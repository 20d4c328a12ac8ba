"""The MLX decoding loop: mlx-lm's own batched generation on the model as it stands.

Views are installed in the model's layers in place, so whatever view is open is what
generates. Prompts, chunks, seeds and decoding are backend-neutral
(:mod:`sway_common.backend.generation`); this module turns one batch of token ids into
new token ids per row. ``sway_hf/generate.py`` has the same function for torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import BatchGenerator

from sway_common.backend.generation import Draws


def _inverse_cdf_sampler(temperature: float, draws: np.ndarray) -> Callable[[mx.array], mx.array]:
    """One row's sampler: step ``k`` takes the token where the CDF passes ``draws[k]``.

    mlx-lm calls a row's own sampler once per step for that row only, so the row's
    draws are used in order whatever else is in the batch. It asks for one token past
    a row's last (it computes ahead); that token is never returned, so the last draw
    is simply reused.
    """
    uniforms = mx.array(draws.astype(np.float32))
    step = [0]

    def sample(logprobs: mx.array) -> mx.array:
        u = uniforms[min(step[0], uniforms.shape[0] - 1)]
        step[0] += 1
        probs = mx.softmax(logprobs.astype(mx.float32) / temperature, axis=-1)
        picked = mx.sum(mx.cumsum(probs, axis=-1) < u, axis=-1)
        return mx.minimum(picked, logprobs.shape[-1] - 1).astype(mx.uint32)

    return sample


def generate_tokens(
    model: nn.Module,
    batch: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    draws: Draws | None,
    stop_ids: Sequence[int],
) -> list[list[int]]:
    """New token ids per row of ``batch``; a row ends at a stop token (left off) or
    after ``max_new_tokens``. ``draws`` None: greedy; otherwise inverse-CDF sampling.

    mlx-lm's :class:`BatchGenerator` pads, masks and keeps per-row positions; all rows
    are prefilled and decoded together (one prefill and one completion batch).
    """
    if max_new_tokens <= 0 or not batch:
        return [[] for _ in batch]
    generator = BatchGenerator(
        model,
        max_tokens=max_new_tokens,
        stop_tokens=[[t] for t in stop_ids],
        prefill_batch_size=len(batch),
        completion_batch_size=len(batch),
    )
    samplers = None
    if draws is not None:
        samplers = [_inverse_cdf_sampler(temperature, d) for d in draws]
    try:
        uids = generator.insert(batch, samplers=samplers)
        new: dict[int, list[int]] = {uid: [] for uid in uids}
        while responses := generator.next_generated():
            for response in responses:
                if response.finish_reason != "stop":  # the stop token is not text
                    new[response.uid].append(int(response.token))
    finally:
        generator.close()
    return [new[uid] for uid in uids]
