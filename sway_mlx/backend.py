"""The MLX differential backend: one mlx-lm model, LoRA views swapped in place.

Views, caching, bucketing, windows and preflight live in
:class:`sway_common.backend.model_views.ModelViews`; this module supplies the MLX
:class:`~sway_common.backend.runtime.Runtime`: padded batched forwards, the LM head
applied only where it is needed, and generation through mlx-lm.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import mlx.core as mx
import numpy as np
from mlx_lm.utils import load

from sway_common.adapters import read_adapter
from sway_common.backend.generation import Draws
from sway_common.backend.limits import (
    context_limit,
    positions_per_step,
    require_fast_tokenizer,
    resolve_batch_size,
    resolve_logit_budget,
    resolve_step_tokens,
)
from sway_common.backend.model_views import ModelViews, describe
from sway_common.backend.nulls import NullFactors, PlacedNull
from sway_common.backend.runtime import Runtime
from sway_common.backend.scoring import token_dists_from_top
from sway_common.backend.stacking import StackedView
from sway_common.backend.views import Restore, scaled_slots
from sway_common.models import check_model_dir, normalize_config, resolve_model_dir
from sway_common.types import TokenDist
from sway_mlx import generate, lora, stacked, weight_swap
from sway_mlx.loading import free_memory, pick_dtype, split_forward
from sway_mlx.platform_fixes import dense_on_cpu, use_cpu_swiglu

if TYPE_CHECKING:
    import mlx.nn as nn
    from mlx_lm.tokenizer_utils import TokenizerWrapper

_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class MLXRuntime(Runtime):
    """One mlx-lm model with a LoRA adapter attached, and its hooks.

    ``model`` is a local model dir or a Hugging Face id; ``adapter_path`` an mlx-lm
    adapter dir (or one of its ``NNNNNNN_adapters.safetensors`` checkpoints) or a PEFT
    adapter dir, or None for the model alone (only its base view: a second model to
    compare against, such as a fused export). ``batch_size="auto"``: 8 rows on the CPU,
    sized from the free GPU memory on Metal/CUDA (``limits.resolve_batch_size``).
    """

    frameworks = ("mlx", "mlx-lm")

    def __init__(
        self,
        model: str | Path,
        adapter_path: str | Path | None,
        *,
        dtype: str = "auto",
        batch_size: int | str = "auto",
        max_context: int | None = None,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.model_dir = resolve_model_dir(model)
        # mlx-lm reads safetensors only, so a pickle is refused whatever allow_pickle says.
        check_model_dir(self.model_dir)
        self.allow_pickle = allow_pickle
        # transformers v5 configs keep rope_theta inside rope_parameters, where mlx-lm
        # does not look: load from a normalised copy or the logits are silently wrong.
        # return_config=True makes it the 3-tuple of load's annotated union.
        loaded = cast(
            "tuple[nn.Module, TokenizerWrapper, dict[str, Any]]",
            load(
                str(normalize_config(self.model_dir)),
                return_config=True,
                trust_remote_code=trust_remote_code,
                tokenizer_config={"trust_remote_code": trust_remote_code},
            ),
        )
        mlx_model, self._wrapper, config = loaded
        self.model: nn.Module | None = mlx_model  # None once released
        self.model.eval()
        use_cpu_swiglu(self.model)
        dense_on_cpu(self.model)  # before the dtype: its float weights take it too
        self.dtype = pick_dtype(dtype, config)
        self.model.set_dtype(_DTYPES[self.dtype])
        mx.eval(self.model.parameters())
        # The wrapper has no __call__; the HF fast tokenizer inside it gives offsets.
        self.tokenizer = self._wrapper._tokenizer
        require_fast_tokenizer(self.tokenizer, self.model_dir)
        text_config = config.get("text_config") or {}
        advertised = config.get("max_position_embeddings") or text_config.get(
            "max_position_embeddings"
        )
        self.max_context = context_limit(advertised, max_context)
        self._inner, self._head = split_forward(self.model)
        self.vocab_size = int(self._head(self._inner(mx.array([[0]]))).shape[-1])
        free = free_memory()
        self.logit_budget = resolve_logit_budget(free)
        self.step_tokens = resolve_step_tokens(free)
        self.batch_size = resolve_batch_size(
            batch_size,
            free,
            config,
            context=self.max_context,
            dtype_bytes=_DTYPES[self.dtype].size,
            vocab_size=self.vocab_size,
        )
        self._model_name = str(model)
        self.slots: list[lora.LoraSlot] = []
        self.adapter_path: Path | None = None
        if adapter_path is None:
            self.info = describe(self, "mlx", self._model_name, str(mx.default_device()), [])
        else:
            self.set_adapter(adapter_path)

    # ------------------------------------------------------------- loading
    def set_adapter(self, adapter_path: str | Path) -> None:
        """Swap in another adapter of the same base model without reloading the base.

        Base-view results stay cached (their key holds no adapter); adapter views are
        keyed by the new adapter's content hash.
        """
        weights = read_adapter(adapter_path, allow_pickle=self.allow_pickle)
        assert self.model is not None, "the backend was closed"
        lora.check_fits(self.model, weights)  # before the old adapter comes out
        # mlx-lm wraps a Linear once: the old layers come out before the new go in.
        lora.detach(self.model, self.slots)
        try:
            slots = lora.attach(self.model, weights)
        except Exception:
            # Leave the backend as it was: the previous adapter, attached again.
            if self.slots and self.adapter_weights is not None:
                self.slots = lora.attach(self.model, self.adapter_weights)
                self.model.eval()
            raise
        self.slots = slots
        # New layers start in training mode; eval keeps any dropout off.
        self.model.eval()
        mx.eval([(s.a, s.b, s.scale) for s in self.slots])
        self.adapter_weights = weights
        self.adapter_hash = weights.content_hash
        self.adapter_path = Path(adapter_path)
        self.info = describe(self, "mlx", self._model_name, str(mx.default_device()), self.slots)

    # --------------------------------------------------------------- views
    # Which of these runs for which view is decided in ViewSwitch._install (switch.py).
    def install_base(self) -> Restore:
        return lora.install_base(self.slots)

    def install_scaled(self, lam: float, modules: frozenset[str] | None = None) -> Restore:
        return lora.install_scaled(scaled_slots(self.slots, modules), lam)

    def place_null(self, factors: Mapping[str, NullFactors]) -> PlacedNull:
        return lora.null_arrays(self.slots, factors)

    def install_null(self, placed: PlacedNull) -> Restore:
        return lora.install_null(self.slots, placed)

    def install_stacked(self, stack: Sequence[StackedView], tile_at: str | None) -> Restore | None:
        if not self.slots or any(s.dora for s in self.slots):
            return None  # DoRA: one view at a time (stacked.install_stacked says why)
        assert self.model is not None, "the backend was closed"
        return stacked.install_stacked(self.model, self.slots, stack, tile_at)

    def install_weights(self, weights: Mapping[str, np.ndarray]) -> Restore:
        assert self.model is not None, "the backend was closed"
        return weight_swap.install_weights(self.model, weights)

    # ------------------------------------------------------------- scoring
    def _padded(self, batch: list[list[int]]) -> tuple[mx.array, np.ndarray]:
        """Right-padded ids and row lengths.

        With a causal mask, a real token never attends to a later position, so the pads
        after it cannot change its output and positions need no offset; each row is read
        at its own last real index rather than at the last column.
        """
        lengths = np.array([len(ids) for ids in batch], dtype=np.int64)
        ids = np.zeros((len(batch), int(lengths.max())), dtype=np.int32)
        for i, row in enumerate(batch):
            ids[i, : len(row)] = row
        return mx.array(ids), lengths

    def _device_last_logprobs(self, batch: list[list[int]]) -> mx.array:
        ids, lengths = self._padded(batch)
        hidden = self._inner(ids)
        # Stacked views with a shared prefix give each prompt's row once per view.
        lengths = np.tile(lengths, hidden.shape[0] // len(batch))
        last = hidden[mx.arange(hidden.shape[0]), mx.array(lengths - 1)]
        logits = self._head(last[:, None, :])[:, 0, :].astype(mx.float32)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def last_logprobs(self, batch: list[list[int]]) -> np.ndarray:
        return np.array(self._device_last_logprobs(batch))

    def last_dists(self, batch: list[list[int]], top_k: int) -> list[TokenDist]:
        ids, top, tail = _top_slices(self._device_last_logprobs(batch), top_k)
        mx.eval(ids, top, tail)
        return token_dists_from_top(np.array(ids), np.array(top), np.array(tail), self.vocab_size)

    def position_dists(self, batch: list[list[int]], top_k: int) -> list[list[TokenDist]]:
        ids, lengths = self._padded(batch)
        hidden = self._inner(ids)
        n_pos = hidden.shape[1] - 1
        if n_pos <= 0:
            return [[] for _ in batch]
        # Chunked as token_logprobs is: each chunk's logits are reduced to their slices
        # (queued, not waited on) before the next chunk's exist.
        step = positions_per_step(len(batch), self.vocab_size, self.logit_budget)
        pieces = []
        for start in range(0, n_pos, step):
            logits = self._head(hidden[:, start : min(n_pos, start + step)]).astype(mx.float32)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            pieces.append(_top_slices(logprobs, top_k))
            mx.async_eval(*pieces[-1])
        top_ids, top, tail = (
            np.array(mx.concatenate([p[i] for p in pieces], axis=1)) for i in range(3)
        )
        return [
            token_dists_from_top(
                top_ids[r, : n - 1], top[r, : n - 1], tail[r, : n - 1], self.vocab_size
            )
            for r, n in enumerate(lengths)
        ]

    def token_logprobs(self, batch: list[list[int]]) -> list[np.ndarray]:
        ids, lengths = self._padded(batch)
        hidden = self._inner(ids)
        targets = ids[:, 1:]
        n_pos = targets.shape[1]
        if n_pos == 0:
            return [np.zeros(0, np.float32) for _ in batch]
        # Chunk positions so the float32 (rows × positions × vocab) logits never exist
        # at once for long texts. Each chunk is queued as it is built (its logits freed
        # once reduced) and the host waits once, at the end, not once per chunk.
        step = positions_per_step(len(batch), self.vocab_size, self.logit_budget)
        pieces = []
        for start in range(0, n_pos, step):
            end = min(n_pos, start + step)
            logits = self._head(hidden[:, start:end]).astype(mx.float32)
            picked = mx.take_along_axis(logits, targets[:, start:end, None], axis=-1)[..., 0]
            pieces.append(picked - mx.logsumexp(logits, axis=-1))
            mx.async_eval(pieces[-1])
        full = np.array(mx.concatenate(pieces, axis=1))
        return [full[i, : n - 1].astype(np.float32) for i, n in enumerate(lengths)]

    # ---------------------------------------------------------- generation
    def generate_tokens(
        self, batch: list[list[int]], max_new_tokens: int, temperature: float, draws: Draws | None
    ) -> list[list[int]]:
        # The wrapper's EOS set: the tokenizer's EOS and the model config's EOS id(s).
        stops = sorted(self._wrapper.eos_token_ids)
        assert self.model is not None, "the backend was closed"
        return generate.generate_tokens(
            self.model,
            batch,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            draws=draws,
            stop_ids=stops,
        )

    # -------------------------------------------------------------- checks
    def nonfinite_adapter_tensors(self) -> list[str]:
        return lora.nonfinite(self.slots)

    def peak_memory_bytes(self) -> int | None:
        # MLX's allocator peak for the process (Metal memory on a Mac): both models.
        return int(mx.get_peak_memory())

    def release(self) -> None:
        if self.slots:
            assert self.model is not None  # release empties the slots as it drops the model
            lora.detach(self.model, self.slots)
        self.slots = []
        self.model = None
        gc.collect()
        mx.clear_cache()

    def mean_hidden(self, batch: list[list[int]]) -> np.ndarray:
        # The trunk's output (the logits, for a model that could not be split). Right
        # padding cannot reach real positions under the causal mask; the mean skips it.
        ids, lengths = self._padded(batch)
        hidden = self._inner(ids).astype(mx.float32)
        real = mx.arange(hidden.shape[1])[None, :] < mx.array(lengths)[:, None]
        summed = (hidden * real[..., None]).sum(axis=1)
        return np.array(summed / mx.array(lengths.astype(np.float32))[:, None])


def _top_slices(logprobs: mx.array, top_k: int) -> tuple[mx.array, mx.array, mx.array]:
    """Along the last axis: the ``top_k`` ids and log-probs, most probable first, and
    the log of the mass outside them (-inf when none)."""
    k = max(1, min(top_k, logprobs.shape[-1]))
    part = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., :k]
    values = mx.take_along_axis(logprobs, part, axis=-1)
    order = mx.argsort(-values, axis=-1)
    ids = mx.take_along_axis(part, order, axis=-1)
    rest = mx.put_along_axis(logprobs, ids, mx.array(-mx.inf, mx.float32), axis=-1)
    return ids, mx.take_along_axis(values, order, axis=-1), mx.logsumexp(rest, axis=-1)


class MLXDifferentialBackend(ModelViews):
    """Base, fine-tuned, λ-scaled and null views of one mlx-lm model and a LoRA adapter.

    Arguments as :class:`MLXRuntime`'s: ``model``, ``adapter_path`` and the keywords
    ``dtype``, ``batch_size``, ``max_context``, ``allow_pickle``, ``trust_remote_code``.
    """

    runtime: MLXRuntime

    def __init__(self, model: str | Path, adapter_path: str | Path | None, **options: Any) -> None:
        super().__init__(MLXRuntime(model, adapter_path, **options))
