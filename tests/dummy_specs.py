"""Suite specs for the analytic dummy backend (seconds, no model), as a user writes them:
the input of the CLI, report, history and pytest-plugin tests.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROMPTS = ("The keeper said", "In the storm", "A ledger entry")


def dummy_spec(
    adapter: str,
    *,
    runs: int = 4,
    prompts: Sequence[str] = PROMPTS,
    shape_prompts: Sequence[str] | None = PROMPTS[:2],
    doc_options: str = "",
) -> str:
    """YAML of ``null_baseline`` (null_adapter, ``runs`` nulls), ``doc`` (delta_kl on
    ``prompts``; ``doc_options`` such as ", min_effect_ratio: 1000" is added to its
    mapping) and, unless ``shape_prompts`` is None, ``shape`` (adapter_ablation), for the
    dummy adapter named ``adapter`` (trained, untrained, nan, ...)."""
    lines = [
        "version: 1",
        "models:",
        f"  ft: {{kind: dummy, base: dummy, adapter: {adapter}}}",
        "defaults: {seed: 0}",
        "suite:",
        f"  - {{name: null_baseline, kind: null_adapter, runs: {runs}}}",
        f"  - {{name: doc, kind: delta_kl, prompts: {json.dumps(list(prompts))}{doc_options}}}",
    ]
    if shape_prompts is not None:
        shape = json.dumps(list(shape_prompts))
        lines.append(f"  - {{name: shape, kind: adapter_ablation, prompts: {shape}}}")
    return "\n".join(lines) + "\n"


def write_dummy_spec(directory: Path, adapter: str, **options: Any) -> Path:
    """``dummy_spec(adapter, **options)`` written to ``directory/ADAPTER.yaml``."""
    path = directory / f"{adapter}.yaml"
    path.write_text(dummy_spec(adapter, **options))
    return path
