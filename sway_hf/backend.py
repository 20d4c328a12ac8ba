"""The Hugging Face differential backend: one transformers model, one PEFT LoRA adapter.

Views, caching, bucketing, windows and preflight live in
:class:`sway_common.backend.model_views.ModelViews`; this module supplies the torch
:class:`~sway_common.backend.runtime.Runtime`: right-padded batched forwards (no attention mask) with the LM head applied only
where it is needed, chunked per-token scoring, seeded generation, and adapter loading
(PEFT dirs directly, mlx-lm dirs through a conversion to PEFT).
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from sway_common.adapters import read_adapter
from sway_common.backend.generation import Draws, stop_ids
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
from sway_common.models import check_model_dir, resolve_model_dir
from sway_common.suite.placement import accelerate_max_memory
from sway_common.types import TokenDist
from sway_hf import generate, lora, stacked, weight_swap
from sway_hf.loading import (
    as_peft_dir,
    check_remote_code,
    free_memory,
    no_bars_unless_watched,
    pick_device,
    pick_dtype,
    quiet_int8_casts,
    remote_code_translated,
)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class HFRuntime(Runtime):
    """One transformers model with a PEFT adapter attached, and its hooks.

    ``model`` is a local model dir or a Hugging Face id; ``adapter_path`` a PEFT adapter
    dir or an mlx-lm adapter dir (converted to PEFT on load), or None for the model
    alone (only its base view: a second model to compare against, such as a merged
    export). ``device_map`` (e.g.
    ``"auto"``) spreads a model too large for one GPU with accelerate, ``max_memory``
    (``{0: "20GiB", "cpu": "64GiB"}``) caps what each device takes; both need
    ``device="auto"``. ``batch_size="auto"``: 8 rows on the CPU, sized from the free
    GPU memory on CUDA/MPS (``limits.resolve_batch_size``).
    """

    frameworks = ("torch", "transformers", "peft")

    def __init__(
        self,
        model: str | Path,
        adapter_path: str | Path | None,
        *,
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int | str = "auto",
        max_context: int | None = None,
        device_map: str | dict[str, Any] | None = None,
        max_memory: Mapping[Any, Any] | None = None,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.model_dir = resolve_model_dir(model)
        check_model_dir(self.model_dir, allow_pickle=allow_pickle)
        check_remote_code(self.model_dir, trust_remote_code)
        quiet_int8_casts()
        self.allow_pickle = allow_pickle
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(
            str(self.model_dir), trust_remote_code=trust_remote_code
        )
        require_fast_tokenizer(self.tokenizer, self.model_dir)
        if max_memory and device_map is None:
            device_map = "auto"
        if device_map is not None and device != "auto":
            raise ValueError("device_map spreads the model itself; use it with device='auto'")
        spread = device_map is not None
        with remote_code_translated(self.model_dir), no_bars_unless_watched():
            base = AutoModelForCausalLM.from_pretrained(
                str(self.model_dir),
                dtype=_DTYPES[self.dtype],
                device_map=device_map if spread else None,
                max_memory=accelerate_max_memory(max_memory) if max_memory else None,
                low_cpu_mem_usage=True,
                trust_remote_code=trust_remote_code,
                # None lets transformers fall back to pickles; only when the user allowed it.
                use_safetensors=None if allow_pickle else True,
            )
        if not spread:
            # As a Module: transformers' wraps(Module.to) types PreTrainedModel.to unbound.
            cast(torch.nn.Module, base).to(self.device)
        base.eval()
        self._causal_lm: PreTrainedModel | None = base  # None once released
        config = base.config.get_text_config()
        self.max_context = context_limit(
            getattr(config, "max_position_embeddings", None), max_context
        )
        self._softcap = getattr(config, "final_logit_softcapping", None)
        self.vocab_size = int(base.get_output_embeddings().weight.shape[0])
        self._split_head = self._check_split_head()
        free = free_memory(self._input_device())
        self.logit_budget = resolve_logit_budget(free)
        self.step_tokens = resolve_step_tokens(free)
        self.batch_size = resolve_batch_size(
            batch_size,
            free,
            config.to_dict(),
            context=self.max_context,
            dtype_bytes=_DTYPES[self.dtype].itemsize,
            vocab_size=self.vocab_size,
        )
        self._model_name = str(model)
        self._loads = 0
        self.adapter = ""
        self.slots: list[lora.LoraSlot] = []
        self.model: PeftModel | None = None
        self.adapter_path: Path | None = None
        if adapter_path is None:
            self.info = describe(self, "hf", self._model_name, str(self._input_device()), [])
        else:
            self.set_adapter(adapter_path)

    # ------------------------------------------------------------- loading
    def set_adapter(self, adapter_path: str | Path) -> None:
        """Swap in another adapter of the same base model without reloading the base.

        Base-view results stay cached (their key holds no adapter); adapter views are
        keyed by the new adapter's content hash. On failure the previous adapter stays.
        """
        adapter_path = Path(adapter_path)
        weights = read_adapter(adapter_path, allow_pickle=self.allow_pickle)
        assert self._causal_lm is not None, "the backend was closed"
        lora.check_fits(self._causal_lm, weights)
        name = f"sway{self._loads}"
        with as_peft_dir(adapter_path) as peft_dir, warnings.catch_warnings():
            # PEFT reads a property transformers v5 deprecated; not the user's concern.
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            if self.model is None:
                self.model = PeftModel.from_pretrained(
                    self._causal_lm, str(peft_dir), adapter_name=name, is_trainable=False
                )
            else:
                try:
                    self.model.load_adapter(str(peft_dir), adapter_name=name, is_trainable=False)
                except Exception:
                    if name in self.model.peft_config:  # half-injected: take it out again
                        self.model.delete_adapter(name)
                    raise
        self._loads += 1
        previous = self.slots
        try:
            self.model.set_adapter(name)
            slots = lora.attach(self.model, weights)
        except Exception:
            # The old adapter stays active and the new one goes: a failed load changes nothing.
            if self.adapter:
                self.model.set_adapter(self.adapter)
                self.model.delete_adapter(name)
            raise
        # Only now is the old adapter dropped.
        lora.detach(self.model, previous)
        self.model.eval()
        self.adapter = name
        self.slots = slots
        self.adapter_weights = weights
        self.adapter_hash = weights.content_hash
        self.adapter_path = adapter_path
        # A LoRA adapter (read_adapter refuses any other): PEFT's config is a LoraConfig.
        cfg = cast(LoraConfig, self.model.peft_config[name])
        self.info = describe(
            self,
            "hf",
            self._model_name,
            str(self._input_device()),
            self.slots,
            alpha=cfg.lora_alpha,
        )

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
        assert self._causal_lm is not None, "the backend was closed"
        return stacked.install_stacked(self._causal_lm, self.slots, stack, tile_at)

    def install_weights(self, weights: Mapping[str, np.ndarray]) -> Restore:
        assert self._causal_lm is not None, "the backend was closed"
        return weight_swap.install_weights(self._causal_lm, weights)

    # ------------------------------------------------------------- scoring
    def _input_device(self) -> torch.device:
        assert self._causal_lm is not None, "the backend was closed"
        weight = self._causal_lm.get_input_embeddings().weight
        assert isinstance(weight, torch.Tensor)  # an embedding's Parameter
        return weight.device

    def _padded(self, batch: list[list[int]]) -> tuple[torch.Tensor, np.ndarray]:
        """Right-padded ids on the device, and the row lengths.

        Under the causal mask a real token never attends to a later position, so the
        pads after it cannot change its output and no attention mask is passed: the
        model keeps its fused causal attention (with a padding mask, SDPA falls back to
        a slower kernel and transformers builds a (rows, 1, T, T) mask first). Each row
        is read at its own last real index, as on the MLX backend.
        """
        lengths = np.array([len(row) for row in batch], dtype=np.int64)
        ids = np.zeros((len(batch), int(lengths.max())), dtype=np.int64)
        for i, row in enumerate(batch):
            ids[i, : len(row)] = row
        return torch.from_numpy(ids).to(self._input_device()), lengths

    def _hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """What the LM head still has to be applied to.

        Normally the decoder body's final hidden states; for an architecture whose
        causal-LM forward does more than ``lm_head`` after the body, already the logits.
        """
        assert self._causal_lm is not None, "the backend was closed"
        if self._split_head:
            return self._causal_lm.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        return self._causal_lm(input_ids=ids, use_cache=False).logits

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        # Looked up per call: a new adapter may wrap lm_head.
        assert self._causal_lm is not None, "the backend was closed"
        logits = self._causal_lm.get_output_embeddings()(hidden).float()
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of some positions (bf16 cannot go to numpy, nor softmax well)."""
        return self._head(hidden) if self._split_head else hidden.float()

    @torch.inference_mode()
    def _check_split_head(self) -> bool:
        """Does body + ``lm_head`` (+ soft-capping) give the model's own logits?

        Checked once on the plain base model. Where it does not (logit scaling in the
        forward, say) scoring falls back to full-sequence logits: slower, still right.
        """
        ids = torch.arange(1, 6, device=self._input_device())[None, :] % self.vocab_size
        assert self._causal_lm is not None, "the backend was closed"
        reference = self._causal_lm(input_ids=ids, use_cache=False).logits.float()
        try:
            split = self._head(self._causal_lm.get_decoder()(input_ids=ids).last_hidden_state)
        except (AttributeError, TypeError, ValueError):
            return False
        return split.shape == reference.shape and bool(
            torch.allclose(split.to(reference.device), reference, rtol=1e-3, atol=1e-3)
        )

    def _device_last_logprobs(self, batch: list[list[int]]) -> torch.Tensor:
        ids, lengths = self._padded(batch)
        hidden = self._hidden(ids)
        # Stacked views with a shared prefix give each prompt's row once per view.
        last = np.tile(lengths, hidden.shape[0] // len(batch)) - 1
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        picked = hidden[rows, torch.from_numpy(last).to(hidden.device)]
        return torch.log_softmax(self._logits(picked), dim=-1)

    @torch.inference_mode()
    def last_logprobs(self, batch: list[list[int]]) -> np.ndarray:
        return self._device_last_logprobs(batch).cpu().numpy()

    @torch.inference_mode()
    def last_dists(self, batch: list[list[int]], top_k: int) -> list[TokenDist]:
        ids, top, tail = _top_slices(self._device_last_logprobs(batch), top_k)
        return token_dists_from_top(
            ids.cpu().numpy(), top.cpu().numpy(), tail.cpu().numpy(), self.vocab_size
        )

    @torch.inference_mode()
    def position_dists(self, batch: list[list[int]], top_k: int) -> list[list[TokenDist]]:
        ids, lengths = self._padded(batch)
        if int(lengths.max()) <= 1:
            return [[] for _ in batch]
        # The positions that predict a token of their row, flat, as token_logprobs keeps them.
        width = ids.shape[1]
        keep = np.concatenate([i * width + np.arange(n - 1) for i, n in enumerate(lengths)])
        hidden = self._hidden(ids)
        states = hidden.reshape(-1, hidden.shape[-1]).index_select(
            0, torch.from_numpy(keep).to(ids.device)
        )
        step = positions_per_step(1, self.vocab_size, self.logit_budget)
        pieces = [
            _top_slices(torch.log_softmax(self._logits(states[s : s + step]), dim=-1), top_k)
            for s in range(0, states.shape[0], step)
        ]
        top_ids, top, tail = (torch.cat([p[i] for p in pieces]).cpu().numpy() for i in range(3))
        flat = token_dists_from_top(top_ids, top, tail, self.vocab_size)
        bounds = np.cumsum(lengths - 1)
        return [flat[b - (n - 1) : b] for b, n in zip(bounds, lengths, strict=True)]

    @torch.inference_mode()
    def token_logprobs(self, batch: list[list[int]]) -> list[np.ndarray]:
        ids, lengths = self._padded(batch)
        # Position t of row i predicts token t + 1: the flat indices of the positions that
        # have one, made on the host so the forward is never waited on until the end.
        width = ids.shape[1]
        keep = np.concatenate([i * width + np.arange(n - 1) for i, n in enumerate(lengths)])
        keep_at = torch.from_numpy(keep).to(ids.device)
        hidden = self._hidden(ids)
        # A model spread over devices ends on the last one's.
        states = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep_at.to(hidden.device))
        targets = ids.reshape(-1).index_select(0, keep_at + 1)
        # Chunk positions so the float32 (positions × vocab) logits of a long text never
        # exist at once; the small per-position results stay on the device until the end.
        step = positions_per_step(1, self.vocab_size, self.logit_budget)
        pieces = []
        for start in range(0, states.shape[0], step):
            logits = self._logits(states[start : start + step])
            picked = logits.gather(-1, targets[start : start + step, None].to(logits.device))
            pieces.append(picked[:, 0] - torch.logsumexp(logits, dim=-1))
        flat = torch.cat(pieces).cpu().numpy() if pieces else np.zeros(0, np.float32)
        return np.split(flat.astype(np.float32), np.cumsum(lengths - 1)[:-1])

    # ---------------------------------------------------------- generation
    def generate_tokens(
        self, batch: list[list[int]], max_new_tokens: int, temperature: float, draws: Draws | None
    ) -> list[list[int]]:
        assert self._causal_lm is not None, "the backend was closed"
        # Without an adapter there is no PeftModel: the plain model generates.
        model = self.model if self.model is not None else self._causal_lm
        # The same EOS set mlx-lm stops at: the tokenizer's and the model config's.
        stops = stop_ids(self.tokenizer, self._causal_lm.generation_config.eos_token_id)
        return generate.generate_tokens(
            model,
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
        # Process-wide CUDA peak: with two models loaded it covers both.
        if torch.device(self.device).type == "cuda":
            return int(torch.cuda.max_memory_allocated())
        return None

    def release(self) -> None:
        cuda = torch.device(self.device).type == "cuda"
        self.slots = []
        self.model = None
        self._causal_lm = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def mean_hidden(self, batch: list[list[int]]) -> np.ndarray:
        # The decoder body's own output, whatever the LM head does after it; the mean
        # skips the pads, which the causal mask keeps from the real positions.
        ids, lengths = self._padded(batch)
        assert self._causal_lm is not None, "the backend was closed"
        hidden = self._causal_lm.get_decoder()(input_ids=ids, use_cache=False)
        states = hidden.last_hidden_state.float()
        real = (
            torch.arange(ids.shape[1], device=states.device)[None, :]
            < torch.from_numpy(lengths).to(states.device)[:, None]
        )
        summed = (states * real[..., None]).sum(dim=1)
        return (summed / real.sum(dim=1, keepdim=True)).cpu().numpy()


def _top_slices(
    logprobs: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Along the last axis: the ``top_k`` ids and log-probs, most probable first, and
    the log of the mass outside them (-inf when none)."""
    top, ids = logprobs.topk(max(1, min(top_k, logprobs.shape[-1])), dim=-1)
    return ids, top, logprobs.scatter(-1, ids, float("-inf")).logsumexp(dim=-1)


class HFDifferentialBackend(ModelViews):
    """Base, fine-tuned, λ-scaled and null views of one transformers model + PEFT adapter.

    Arguments as :class:`HFRuntime`'s: ``model``, ``adapter_path`` and the keywords
    ``dtype``, ``device``, ``batch_size``, ``max_context``, ``device_map``,
    ``allow_pickle``, ``trust_remote_code``.
    """

    runtime: HFRuntime

    def __init__(self, model: str | Path, adapter_path: str | Path | None, **options: Any) -> None:
        super().__init__(HFRuntime(model, adapter_path, **options))
