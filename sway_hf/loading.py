"""Loading a transformers model for the HF backend: device and dtype, memory, and
refusing a model that needs its own Python code (unless the user trusts it)."""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from sway_common.adapters import convert_adapter, detect_format
from sway_common.models import ModelFormatError, parse_dtype


def pick_device(device: str = "auto") -> str:
    """``auto``: cuda, then mps, then cpu."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _mps_half_works() -> bool:
    try:
        x = torch.ones(2, 2, dtype=torch.float16, device="mps")
        return bool(torch.isfinite(x @ x).all())
    except (RuntimeError, TypeError):
        return False


def pick_dtype(dtype: str, device: str) -> str:
    """``auto``: bfloat16 on CUDA, float16 on MPS (float32 where it fails), float32 on CPU.

    Half precision on CPU runs slower than float32 with torch, and is less exact.
    """
    chosen = parse_dtype(dtype)
    if chosen not in (None, "auto"):
        return chosen
    kind = torch.device(device).type
    if kind == "cuda":
        return "bfloat16"
    if kind == "mps":
        return "float16" if _mps_half_works() else "float32"
    return "float32"


@contextmanager
def no_bars_unless_watched() -> Iterator[None]:
    """No "Loading weights" bars where nobody watches (CI logs, pipes): there they are
    noise between sway-mlx's own lines. In a terminal they stay."""
    from transformers.utils import logging as hf_logging

    if sys.stderr.isatty() or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


class _NoInt8CastNotes(logging.Filter):
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast from torch.float32 to float16"
    at every forward of every 8-bit layer: hundreds of lines per check, on how LLM.int8
    always computes, with nothing for the user to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def quiet_int8_casts() -> None:
    """Drop that note (only it) from bitsandbytes' log; once per process."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _NoInt8CastNotes) for f in logger.filters):
        logger.addFilter(_NoInt8CastNotes())


def _remote_code_refused(model_dir: Path) -> ModelFormatError:
    return ModelFormatError(
        f"{model_dir} needs its own Python code to load (auto_map in config.json); "
        "sway-mlx runs none unless you pass --trust-remote-code (only for a source you trust)"
    )


def check_remote_code(model_dir: Path, trust_remote_code: bool) -> None:
    """Refuse, before loading, a model only its own Python code can build.

    A config with ``auto_map`` whose model type transformers knows loads with the
    library's own code; one it does not know would need the repo's code run.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if trust_remote_code or "auto_map" not in cfg or cfg.get("model_type") in CONFIG_MAPPING:
        return
    raise _remote_code_refused(model_dir)


@contextmanager
def remote_code_translated(model_dir: Path) -> Iterator[None]:
    """transformers' own refusal of a model's Python code, as one line with the fix."""
    try:
        yield
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise _remote_code_refused(model_dir) from None


def free_memory(device: torch.device) -> int | None:
    """Accelerator memory (CUDA, MPS) not yet taken; None on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "mps":
        return max(0, torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    return None


@contextmanager
def as_peft_dir(adapter_path: Path) -> Iterator[Path]:
    """A PEFT adapter dir for ``adapter_path``: itself, or a converted temporary copy.

    mlx-lm dirs and single weights files (checkpoints) go through the conversion.
    """
    if adapter_path.is_dir() and detect_format(adapter_path) == "peft":
        yield adapter_path
        return
    with tempfile.TemporaryDirectory(prefix="sway-hf-adapter-") as tmp:
        out = Path(tmp) / "peft"
        convert_adapter(adapter_path, out, to="peft")
        yield out
