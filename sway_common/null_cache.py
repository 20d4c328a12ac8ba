"""Null statistics kept across runs, keyed by everything that decides them.

A calibrated probe measures its metric under K seeded null adapters; for the same model
weights, adapter weights, prompts, seeds, mode, scales, dtype, backend, framework versions
and sway version, the numbers come out the same, so a second run reads them instead of
running K more forwards per prompt. The backend keeps one more result here: whether its
stacked views may share the blocks below the first adapted one (a check of the model, not
of any prompt). Keys are content, never paths alone: the model is identified by its
config and its weight files' names, sizes and modification times, the adapter by the
hash of its tensors (for ``fixed``-mode nulls, which do not depend on the trained values,
the hash of its structure). Each entry is one small JSON file written atomically, so two runs
sharing the cache at once leave it valid (the last writer wins with identical content).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sway_common import __version__
from sway_common.atomic import atomic_write_text
from sway_common.backend.nulls import NULL_RECIPE


def model_fingerprint(model_dir: str | Path) -> str:
    """A cheap content identity for a model dir: config text plus weight files' stat."""
    root = Path(model_dir)
    h = hashlib.blake2b(digest_size=16)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        path = root / name
        if path.is_file():
            h.update(name.encode() + path.read_bytes())
    for path in sorted(root.glob("*.safetensors")):
        st = path.stat()
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _adapter_key(info: dict[str, Any], draw: dict[str, Any]) -> str:
    """What of the adapter a null measurement depends on: a ``fixed``-mode null depends on
    its structure alone (module paths, factor shapes, scales), so adapters of one shape
    share those entries (a sweep computes each distinct fixed null once); any other mode
    (``norm_matched``: scaled to each trained module's norm) on its weights."""
    if draw.get("mode") == "fixed" and info.get("adapter_shape"):
        return f"shape:{info['adapter_shape']}"
    return str(info["adapter_hash"])


class NullCache:
    """A directory of per-(backend state, null draw, measurement) results."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._fingerprints: dict[str, str] = {}

    def _model(self, model_dir: str) -> str:
        if model_dir not in self._fingerprints:
            self._fingerprints[model_dir] = model_fingerprint(model_dir) if model_dir else ""
        return self._fingerprints[model_dir]

    def key(
        self, info: dict[str, Any], draw: dict[str, Any], measurement: Sequence[Any]
    ) -> str | None:
        """The entry's name, or None when the backend cannot say what it has loaded."""
        model_dir = str(info.get("model_dir") or "")
        if not model_dir or not info.get("adapter_hash") or not Path(model_dir).is_dir():
            return None
        parts = {
            "version": __version__,
            "recipe": NULL_RECIPE,
            "backend": info.get("backend"),
            "frameworks": info.get("frameworks"),
            "dtype": str(info.get("dtype")),
            "device": str(info.get("device")),
            "model": self._model(model_dir),
            "adapter": _adapter_key(info, draw),
            "draw": draw,
            "measurement": list(measurement),
        }
        blob = json.dumps(parts, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def get(self, key: str) -> Any | None:
        try:
            return json.loads((self.root / key[:2] / f"{key}.json").read_text(encoding="utf-8"))[
                "value"
            ]
        except (OSError, ValueError, KeyError):
            return None  # missing, or unreadable: recompute and overwrite

    def put(self, key: str, value: Any) -> None:
        with contextlib.suppress(OSError):  # a cache that cannot be written only costs time
            atomic_write_text(self.root / key[:2] / f"{key}.json", json.dumps({"value": value}))
