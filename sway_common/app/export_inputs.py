"""export-check's inputs: the export as a model dir, and whether it can be the base's.

Checked before any model loads; bad input is one line on stderr and exit 2.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sway_common import bnb_quant
from sway_common.app.options import fail, first_line
from sway_common.app.platform import pick_backend
from sway_common.models import ModelNotFoundError, gguf_model_dir, resolve_model_dir
from sway_common.suite.export_models import config_mismatch


def _config(model_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((model_dir / "config.json").read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as e:
        fail(f"cannot read {model_dir / 'config.json'}: {first_line(e)}")
    if not isinstance(data, dict):
        fail(f"{model_dir / 'config.json'} is not a JSON object")
    return data


def export_dir_of(export: str, note: Callable[[str], None]) -> Path:
    """The export as a model dir: itself, or a GGUF file dequantized into a cached dir."""
    path = Path(export).expanduser()
    if not path.exists():
        fail(
            f"export {export} does not exist; give the directory mlx_lm fuse, mlx_lm convert or "
            "save_pretrained wrote, or a .gguf file"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            fail(
                f"export {export} is a file but not a .gguf; give a model directory or a GGUF file"
            )
        note("reading the GGUF export (dequantized once, then cached)")
        try:
            # transformers' GGUF reader draws its own tqdm bar, whatever the settings say.
            with contextlib.redirect_stderr(io.StringIO()):
                return gguf_model_dir(path)
        except ImportError as e:
            fail(first_line(e))
        except Exception as e:  # a GGUF transformers cannot read is bad input, not a crash
            fail(f"cannot read the GGUF export {export}: {first_line(e)}")
    if not (path / "config.json").is_file():
        fail(
            f"export {export} is not a model directory (no config.json); give the directory "
            "mlx_lm fuse or save_pretrained wrote"
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        fail(f"export {export} holds no weights (*.safetensors or *.bin)")
    return path.resolve()


def check_pair(
    model: str, export_dir: Path, backend: str | None, export_cfg: dict[str, Any] | None = None
) -> Path:
    """Refuse an export that cannot be the base model fine-tuned; return the base dir.
    ``backend`` None: no model will load (``--weights-only``), any export is readable;
    ``export_cfg``: the export's config when it has no config.json (a GGUF's header)."""
    try:
        base_dir = resolve_model_dir(model)
    except (ModelNotFoundError, OSError) as e:
        fail(first_line(e))
    base_cfg = _config(base_dir)
    export_cfg = _config(export_dir) if export_cfg is None else export_cfg
    problem = config_mismatch(base_cfg, export_cfg)
    if problem:
        fail(f"{problem}: the export is not a version of {model}")
    for which, cfg in (("base model", base_cfg), ("export", export_cfg)):
        refuse_foreign_quantization(which, cfg)
        if quant_method(cfg) == BNB:
            check_bnb(which, backend)
    if backend is not None and "quantization" in export_cfg and pick_backend(backend) == "hf":
        fail(
            "the export is quantized by mlx-lm (config 'quantization'); only the MLX backend "
            "reads it: use --backend mlx"
        )
    return base_dir


# Checkpoints quantized by a transformers quantizer ("quantization_config.quant_method").
# bitsandbytes (4- and 8-bit) runs on a CPU: the HF backend loads it, the weight check
# and the noise floor dequantize and re-quantize its weights with bitsandbytes' own
# functions. GPTQ and AWQ need gptqmodel / autoawq, whose kernels are GPU builds: refused.
# mlx-lm's own quantization ("quantization", no quant_method) is read too.
BNB = "bitsandbytes"
_GPU_BUILDS = {"gptq": "gptqmodel", "awq": "autoawq"}
_FLOAT_HINT = (
    "give the float model instead (for an adapter trained on the quantized model: the float "
    "model it was quantized from, and an export merged into it)"
)


def quant_method(cfg: dict[str, Any]) -> str | None:
    """The transformers quantizer a config names (``quantization_config.quant_method``)."""
    qc = cfg.get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    return str(method) if method else None


def refuse_foreign_quantization(which: str, cfg: dict[str, Any]) -> None:
    """One line and exit 2 for a model quantized by GPTQ, AWQ or another transformers
    quantizer but bitsandbytes: export-check reads float, MLX-quantized, bitsandbytes
    and GGUF models."""
    method = quant_method(cfg)
    if method is None or method == BNB:
        return
    package = _GPU_BUILDS.get(method.lower())
    why = (
        f"its kernels come from {package}, a GPU build this tool does not run"
        if package
        else "export-check reads float, MLX-quantized, bitsandbytes and GGUF models"
    )
    fail(f"the {which} is quantized by {method} (config quantization_config): {why}; {_FLOAT_HINT}")


def check_bnb(which: str, backend: str | None) -> None:
    """A bitsandbytes model needs bitsandbytes, and the HF backend to run it."""
    if not bnb_quant.available():
        fail(
            f"the {which} is quantized by bitsandbytes, which is not installed: {bnb_quant.INSTALL}"
        )
    if backend is not None and pick_backend(backend) == "mlx":
        fail(
            f"the {which} is quantized by bitsandbytes; only the HF backend runs it: "
            "use --backend hf"
        )
