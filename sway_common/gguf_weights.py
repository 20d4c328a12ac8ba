"""Read named weights of a GGUF file (llama.cpp) for the weight check, module by module.

The ``gguf`` package (the ``gguf`` extra) parses the header and memory-maps the file;
only the tensors asked for are dequantized (``gguf.quants.dequantize``: every type it
knows, k-quants included). Names are mapped from the Hugging Face module paths an
adapter uses (``model.layers.3.self_attn.q_proj``) to GGUF's (``blk.3.attn_q``) by
gguf's own table for the file's architecture. llama.cpp's converter permutes the rows
of a Llama's q and k projections (rotary halves interleaved); that is undone here as
transformers undoes it (``LlamaTensorProcessor``), so the weights compare row for row
with the base model's.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from sway_common.weight_reader import Storage, WeightReadError

# Architectures whose q/k rows llama.cpp's converter permutes (transformers' list).
PERMUTED_ARCHS = ("llama",)


def unpermute(w: NDArray[np.float32], n_head: int) -> NDArray[np.float32]:
    """Undo llama.cpp's ``permute`` of a q (``n_head`` heads) or k (KV heads) weight."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def permute(w: NDArray[np.float32], n_head: int) -> NDArray[np.float32]:
    """llama.cpp's ``permute`` (``convert_hf_to_gguf.py``), for tests and writers."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, dim, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


class GGUFWeights:
    """The weights of one GGUF file, dequantized tensor by tensor on demand."""

    def __init__(self, path: Path) -> None:
        if importlib.util.find_spec("gguf") is None:
            raise WeightReadError("reading a GGUF file needs gguf: pip install 'sway-mlx[gguf]'")
        from gguf import MODEL_ARCH_NAMES, GGUFReader, get_tensor_name_map

        self.path = Path(path)
        try:
            reader = GGUFReader(self.path)
        except Exception as e:  # gguf raises ValueError, struct errors, ...: all "unreadable"
            raise WeightReadError(f"cannot read the GGUF file {path}: {e}") from None
        self.arch = str(_field(reader, "general.architecture") or "")
        arch = {name: key for key, name in MODEL_ARCH_NAMES.items()}.get(self.arch)
        blocks = _field(reader, f"{self.arch}.block_count")
        if arch is None or blocks is None:
            raise WeightReadError(
                f"{path}: GGUF architecture {self.arch or '(none)'} is not one gguf can map "
                "to Hugging Face names"
            )
        self.names = get_tensor_name_map(arch, int(blocks))
        self.tensors = {t.name: t for t in reader.tensors}
        self.n_head = _field(reader, f"{self.arch}.attention.head_count")
        self.n_kv = _field(reader, f"{self.arch}.attention.head_count_kv") or self.n_head
        self.config = {
            "hidden_size": _field(reader, f"{self.arch}.embedding_length"),
            "num_hidden_layers": int(blocks),
            "num_attention_heads": self.n_head,
        }

    def weight_name(self, module: str) -> str:
        name = self.names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if name is None or name not in self.tensors:
            raise WeightReadError(f"{self.path} has no tensor for {module}.weight")
        return str(name)

    def module_weight(
        self, module: str, shape: tuple[int, ...] | None = None
    ) -> tuple[NDArray[np.float32], Storage]:
        """``module``'s weight in Hugging Face layout (float32) and its GGUF type."""
        from gguf import quants

        name = self.weight_name(module)
        t = self.tensors[name]
        try:
            w = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError as e:
            raise WeightReadError(f"{self.path}: {name}: {e}") from None
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        heads = {".attn_q.": self.n_head, ".attn_k.": self.n_kv}
        for part, n in heads.items():
            if self.arch in PERMUTED_ARCHS and part in name and n:
                w = unpermute(w, int(n))
        return w, Storage("gguf", qtype=t.tensor_type.name)
