"""export-check's two models: what the export must be to be compared with the base, and
how much memory holding both took."""

from __future__ import annotations

import resource
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from sway_common.backend.model_views import ModelViews
from sway_common.protocols import ScoringModel


class ExportModel(Protocol):
    """The export: a model whose base view is all that is read."""

    def as_base(self) -> AbstractContextManager[ScoringModel]: ...


def peak_memory(*backends: object) -> dict[str, int | None]:
    """Peak resident memory of this process and the framework's own allocator peak."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is bytes on macOS, KiB on Linux.
    rss_bytes = int(rss if sys.platform == "darwin" else rss * 1024)
    framework = None
    for b in backends:
        value = b.peak_memory_bytes() if isinstance(b, ModelViews) else None
        framework = value if value is not None else framework
    return {"peak_rss_bytes": rss_bytes, "framework_peak_bytes": framework}


def check_same_tokens(backend: ModelViews, export: ExportModel, texts: Sequence[str]) -> None:
    """Raise ValueError when the two models cannot be compared token for token."""
    if not isinstance(export, ModelViews):
        return  # a stand-in export: nothing to compare
    va, vb = backend.vocab_size, export.vocab_size
    if va and vb and va != vb:
        raise ValueError(f"the export's vocabulary has {vb} tokens, the base model's {va}")
    ta, tb = backend.tokenizer, export.tokenizer
    if ta is None or tb is None:
        return
    for text in texts:
        if ta(text)["input_ids"] != tb(text)["input_ids"]:
            raise ValueError(
                f"the export's tokenizer encodes {text[:40]!r} differently from the base "
                "model's; compare models that share one tokenizer"
            )


# Config fields that must agree for an export to be "the same model" (any nesting level).
_SAME_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def _text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    inner = cfg.get("text_config")
    return {**cfg, **inner} if isinstance(inner, dict) else cfg


def config_mismatch(base: dict[str, Any], export: dict[str, Any]) -> str | None:
    """Why the export cannot be a version of the base model (config.json dicts), or None."""
    a, b = _text_config(base), _text_config(export)
    for name in _SAME_FIELDS:
        if name in a and name in b and a[name] != b[name]:
            return f"the export's {name} is {b[name]!r}, the base model's {a[name]!r}"
    return None
