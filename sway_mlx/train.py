"""Train a LoRA adapter with mlx-lm's own trainer: the demo's trainer on MLX.

Runs ``python -m mlx_lm lora`` exactly as a user would after writing the chunks as
a JSONL data set, so the adapter (and its ``NNNNNNN_adapters.safetensors``
checkpoints) is what mlx-lm itself produces. Written atomically.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from sway_mlx.platform_fixes import with_openblas_preload

# mlx-lm's report lines: "Iter 3: Train loss 2.345, ..." (older) or "     3    2.345 ▼ ..." (0.32's
# table). Only the progress display depends on this; the adapter does not.
REPORT_LINE = re.compile(r"^\s*(?:Iter\s+)?(\d+):?\s+(?:Train loss\s+)?([0-9]+\.[0-9]+)\b")


def trainer_env() -> dict[str, str]:
    """The trainer's environment: its own process, so OpenBLAS may be preloaded into it
    (``sway_mlx.platform_fixes``)."""
    env = with_openblas_preload(dict(os.environ))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def train_lora(
    model_dir: str | Path,
    chunks: Sequence[str],
    out_dir: str | Path,
    *,
    steps: int,
    rank: int = 8,
    alpha: float = 16.0,
    learning_rate: float = 1e-3,
    targets: Sequence[str] = ("self_attn.q_proj", "self_attn.v_proj"),
    num_layers: int = 8,
    seed: int = 0,
    max_tokens: int = 128,
    batch_size: int | None = None,
    save_every: int | None = None,
    dora: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """Train with ``python -m mlx_lm lora``; ``dora`` trains mlx-lm's DoRA layers instead."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".train-", dir=out.parent))
    try:
        data = tmp / "data"
        data.mkdir()
        lines = "".join(json.dumps({"text": c}) + "\n" for c in chunks)
        (data / "train.jsonl").write_text(lines, encoding="utf-8")
        (data / "valid.jsonl").write_text(lines, encoding="utf-8")
        # The CLI takes rank, scale and target keys only from a config file (JSON is YAML).
        config = {
            "lora_parameters": {
                "rank": rank,
                "scale": alpha / rank,
                "dropout": 0.0,
                "keys": list(targets),
            }
        }
        (tmp / "lora.yaml").write_text(json.dumps(config), encoding="utf-8")
        adapter = tmp / "adapter"
        cmd = [
            sys.executable,
            "-m",
            "mlx_lm",
            "lora",
            "--model",
            str(model_dir),
            "--train",
            "--data",
            str(data),
            "--iters",
            str(steps),
            "--batch-size",
            str(min(batch_size or len(chunks), len(chunks))),
            "--num-layers",
            str(num_layers),
            "--learning-rate",
            str(learning_rate),
            "--seed",
            str(seed),
            "--max-seq-length",
            str(max_tokens),
            "--steps-per-report",
            "1",
            "--steps-per-eval",
            str(steps + 1),
            "--val-batches",
            "1",
            "--save-every",
            str(save_every or steps + 1),
            "--adapter-path",
            str(adapter),
            "--fine-tune-type",
            "dora" if dora else "lora",
            "-c",
            str(tmp / "lora.yaml"),
        ]
        proc = subprocess.Popen(
            cmd, env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        log = []
        assert proc.stdout is not None
        for line in proc.stdout:
            log.append(line)
            match = REPORT_LINE.match(line)
            if on_step is not None and match:
                on_step(int(match.group(1)), float(match.group(2)))
        if proc.wait() != 0 or not (adapter / "adapters.safetensors").exists():
            raise RuntimeError("mlx_lm lora failed:\n" + "".join(log[-30:]))
        if out.exists():
            shutil.rmtree(out)
        adapter.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
