"""The bare forward: what scoring costs with nothing of sway-mlx in the way.

The reference the scoring ops are measured against. The model is loaded through the
backend itself with no adapter (``adapter_path=None``: no LoRA layer is attached), so
it is the same weights, dtype and device as the views are timed on, in the same
process; then the framework is called directly: one padded batch, full logits, float32
log-softmax and a gather of the next tokens (full-sequence scoring), or the last
position's float32 log-softmax (next-token). No cache, no bucketing, no chunking.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Forward = Callable[[list[list[int]]], np.ndarray]


def _padded(batch: list[list[int]]) -> np.ndarray:
    width = max(len(row) for row in batch)
    ids = np.zeros((len(batch), width), dtype=np.int64)
    for i, row in enumerate(batch):
        ids[i, : len(row)] = row
    return ids


def _hf_forwards(backend: Any) -> tuple[Forward, Forward]:
    import torch

    model = backend.runtime._causal_lm
    device = model.get_input_embeddings().weight.device

    @torch.inference_mode()
    def logprobs(batch: list[list[int]]) -> np.ndarray:
        ids = torch.from_numpy(_padded(batch)).to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        picked = logits.gather(-1, ids[:, 1:, None])[..., 0]
        return (picked - torch.logsumexp(logits, dim=-1)).cpu().numpy()

    @torch.inference_mode()
    def next_token(batch: list[list[int]]) -> np.ndarray:
        ids = torch.from_numpy(_padded(batch)).to(device)
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1].float()
        return torch.log_softmax(logits, dim=-1).cpu().numpy()

    return logprobs, next_token


def _mlx_forwards(backend: Any) -> tuple[Forward, Forward]:
    import mlx.core as mx

    model = backend.runtime.model

    def head(hidden: Any) -> Any:
        if "lm_head" in model:
            return model.lm_head(hidden)
        return model.model.embed_tokens.as_linear(hidden)

    def logprobs(batch: list[list[int]]) -> np.ndarray:
        ids = mx.array(_padded(batch).astype(np.int32))
        logits = model(ids)[:, :-1].astype(mx.float32)
        picked = mx.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
        return np.array(picked - mx.logsumexp(logits, axis=-1))

    def next_token(batch: list[list[int]]) -> np.ndarray:
        ids = mx.array(_padded(batch).astype(np.int32))
        logits = head(model.model(ids)[:, -1:, :])[:, 0].astype(mx.float32)
        return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

    return logprobs, next_token


def bare_forwards(name: str, backend: Any) -> dict[str, Forward]:
    """The bare forward per scoring op, on an adapter-less backend's own model."""
    if backend.adapter_weights is not None:
        raise ValueError("the bare forward needs a backend built with adapter_path=None")
    logprobs, next_token = (_mlx_forwards if name == "mlx" else _hf_forwards)(backend)
    return {"logprob_of_batch": logprobs, "next_token_dist_batch": next_token}


def reset_peak_memory(name: str) -> None:
    """Start the framework allocator's peak afresh, so each phase reports its own."""
    if name == "mlx":
        import mlx.core as mx

        mx.reset_peak_memory()
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def device_name(name: str, backend: Any) -> str:
    """The accelerator's own name (``NVIDIA H100 80GB HBM3``, ``Apple M3 Max``), or ``cpu``."""
    if name == "mlx":
        import mlx.core as mx

        if mx.default_device().type != mx.DeviceType.gpu:
            return "cpu"
        return str(mx.device_info().get("device_name", "gpu"))
    import torch

    device = torch.device(backend.runtime.device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type
