"""The torch decoding loop: transformers' ``generate`` on the model as it stands.

Views are installed in the model's layers in place, so whatever view is open is what
generates. Prompts, chunks, seeds and decoding are backend-neutral
(:mod:`sway_common.backend.generation`); this module turns one batch of token ids into
new token ids per row. ``sway_mlx/generate.py`` has the same function for MLX.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from sway_common.backend.generation import Draws, cut_at_stop

# Settings a model's own generation_config may carry that would change what greedy
# decoding picks; generate() fills every setting left unset from that config.
_PLAIN_DECODING: dict[str, Any] = {
    "do_sample": False,
    "num_beams": 1,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_new_tokens": 0,
    "temperature": None,
    "top_k": None,
    "top_p": None,
}


class _InverseCdf(LogitsProcessor):
    """Samples each row from its own draws and leaves only that token's logit finite.

    Greedy decoding then picks exactly the sampled token. Rows keep their place in
    ``generate`` (finished rows are padded, not removed), so row ``i`` reads draw
    ``step`` of its own stream at every step.
    """

    def __init__(self, temperature: float, draws: Draws, device: torch.device) -> None:
        self.temperature = temperature
        self.uniforms = torch.tensor(np.stack(draws), dtype=torch.float32, device=device)
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        # Logits come from the LM head's device: the last one of a spread model.
        u = self.uniforms[:, min(self.step, self.uniforms.shape[1] - 1)].to(scores.device)
        self.step += 1
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        picked = (probs.cumsum(dim=-1) < u[:, None]).sum(dim=-1).clamp(max=scores.shape[-1] - 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picked[:, None], 0.0)


def _left_padded(
    batch: list[list[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """ids and attention mask, pads on the left so every row's next token is the last column.

    ``generate`` derives each row's positions from the mask, so a padded row sees the
    rotary positions it would see alone.
    """
    width = max(len(row) for row in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, row in enumerate(batch):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate_tokens(
    model: Any,
    batch: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    draws: Draws | None,
    stop_ids: Sequence[int],
) -> list[list[int]]:
    """New token ids per row of ``batch``; a row ends at a stop token (left off) or
    after ``max_new_tokens``. ``draws`` None: greedy; otherwise inverse-CDF sampling.

    ``model`` is the PeftModel when an adapter is loaded, else the plain causal LM.
    """
    if max_new_tokens <= 0 or not batch:
        return [[] for _ in batch]
    device = model.get_input_embeddings().weight.device
    pad = stop_ids[0] if stop_ids else 0  # masked out; after a row's stop, cut off
    ids, mask = _left_padded(batch, pad, device)
    processors = None
    if draws is not None:
        processors = LogitsProcessorList([_InverseCdf(temperature, draws, device)])
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=int(max_new_tokens),
        eos_token_id=list(stop_ids) or None,
        pad_token_id=pad,
        logits_processor=processors,
        **_PLAIN_DECODING,
    )
    return [cut_at_stop(row, stop_ids) for row in out[:, ids.shape[1] :].tolist()]
