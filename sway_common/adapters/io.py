"""LoRA adapters on disk: detect, read, write, convert between PEFT and mlx-lm.

One in-memory form, :class:`AdapterWeights`, holds every adapter as PEFT orients it:
``a`` is ``(r, in)``, ``b`` is ``(out, r)`` and the update is ``ΔW = scale · b @ a``,
added to ``W`` where ``y = x @ W.T``. Module names are the causal-LM paths that both
transformers and mlx-lm use (``model.layers.3.self_attn.q_proj``).

- PEFT: ``adapter_config.json`` + ``adapter_model.safetensors`` with
  ``base_model.model.<name>.lora_A.weight`` (r, in), ``...lora_B.weight`` (out, r) and,
  for DoRA, ``...lora_magnitude_vector`` (out,). ``scale = alpha / r`` (``alpha / sqrt(r)``
  with rsLoRA); ``rank_pattern`` / ``alpha_pattern`` override r / alpha per module.
- mlx-lm: ``adapter_config.json`` (``fine_tune_type``, ``num_layers``,
  ``lora_parameters: {rank, scale, dropout, keys}``) + ``adapters.safetensors`` (or a
  checkpoint ``NNNNNNN_adapters.safetensors``) with ``<name>.lora_a`` (in, r),
  ``<name>.lora_b`` (r, out) and, for DoRA, ``<name>.m`` (out,).

Anything this form cannot represent (modules_to_save, LoRA biases, embedding or conv
LoRA, other PEFT tuners, base-rewriting initialisations) is refused with
:class:`AdapterFormatError`, never dropped. Only numpy and safetensors are used; a
pickled ``adapter_model.bin`` is read (through torch) only with ``allow_pickle``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from sway_common.adapters.files import (
    AdapterFormatError,
    load_pickled,
    load_safetensors,
    save_safetensors,
)
from sway_common.adapters.formats import mlx_payload, peft_payload, read_mlx, read_peft
from sway_common.adapters.weights import (
    CONFIG_NAME,
    MLX_WEIGHTS,
    PEFT_WEIGHTS,
    AdapterFormat,
    AdapterWeights,
)


# ------------------------------------------------------------------ detection
def _load_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8
        raise AdapterFormatError(f"cannot read {path}: {e}; re-save the adapter") from e
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{path} does not hold a JSON object")
    return cfg


PICKLE_REFUSED = (
    "pickled torch files can run code when loaded: re-save the adapter with safetensors "
    "(PEFT: save_pretrained(..., safe_serialization=True)), or pass --allow-pickle if you "
    "trust its source"
)


def _resolve(path: str | Path, allow_pickle: bool = False) -> tuple[Path, Path | None]:
    """(adapter dir, chosen weights file or None) for a dir or a weights-file path."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p, None
    if p.is_file() and p.suffix == ".safetensors":
        return p.parent, p
    if p.is_file() and p.name == CONFIG_NAME:
        return p.parent, None
    if p.is_file() and p.suffix == ".bin":
        if allow_pickle:
            return p.parent, p
        raise AdapterFormatError(f"{p} is a pickled torch file; {PICKLE_REFUSED}")
    if not p.exists():
        raise AdapterFormatError(f"no adapter at {p}: the path does not exist; check it")
    raise AdapterFormatError(f"no adapter at {p}: expected a directory or a .safetensors file")


def detect_format(path: str | Path) -> AdapterFormat:
    """``"peft"`` or ``"mlx"`` for an adapter dir (or one of its weights files)."""
    root, weights = _resolve(path)
    if weights is not None:
        return "peft" if weights.name.startswith("adapter_model") else "mlx"
    cfg_path = root / CONFIG_NAME
    if cfg_path.is_file():
        cfg = _load_config(cfg_path)
        if "peft_type" in cfg:
            return "peft"
        if "lora_parameters" in cfg or "fine_tune_type" in cfg:
            return "mlx"
    if (root / PEFT_WEIGHTS).is_file() or (root / "adapter_model.bin").is_file():
        return "peft"
    if (root / MLX_WEIGHTS).is_file():
        return "mlx"
    raise AdapterFormatError(
        f"{root} is not a LoRA adapter: expected adapter_config.json with "
        f"{PEFT_WEIGHTS} (PEFT) or {MLX_WEIGHTS} (mlx-lm)"
    )


def read_adapter(path: str | Path, *, allow_pickle: bool = False) -> AdapterWeights:
    """Read a PEFT or mlx-lm adapter dir, or one chosen weights/checkpoint file.

    Only safetensors are read unless ``allow_pickle``: a pickled ``adapter_model.bin``
    is then read with torch's weights-only loader.
    """
    root, weights = _resolve(path, allow_pickle)
    fmt = detect_format(path) if weights is None or weights.suffix != ".bin" else "peft"
    cfg_path = root / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterFormatError(f"{root} has no {CONFIG_NAME}; it is needed for rank and scale")
    cfg = _load_config(cfg_path)
    name = PEFT_WEIGHTS if fmt == "peft" else MLX_WEIGHTS
    weights = weights or _weights_file(root, name, allow_pickle)
    tensors = load_pickled(weights) if weights.suffix == ".bin" else load_safetensors(weights)
    integral = sorted(k for k, t in tensors.items() if not np.issubdtype(t.dtype, np.floating))
    if integral:  # cast to float they would read as a (usually zero) adapter: say what it is
        raise AdapterFormatError(
            f"{weights}: tensor {integral[0]} holds {tensors[integral[0]].dtype} values; LoRA "
            "factors are floating point (float32, float16 or bfloat16): re-save the adapter"
        )
    try:
        modules, dora = (read_peft if fmt == "peft" else read_mlx)(cfg, tensors)
    except AdapterFormatError as e:
        if str(e).startswith(f"{CONFIG_NAME}:"):  # a bad field: say which file holds it
            raise AdapterFormatError(
                f"{cfg_path}{str(e)[len(CONFIG_NAME) :]}; correct it"
            ) from None
        raise
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError, re.error) as e:
        # A config whose fields have the wrong types: name the file, not a Python internal.
        raise AdapterFormatError(
            f"{cfg_path} is malformed ({type(e).__name__}: {e}); re-save the adapter"
        ) from None
    return AdapterWeights(fmt=fmt, dora=dora, modules=modules, config=cfg, path=weights)


def _weights_file(root: Path, name: str, allow_pickle: bool) -> Path:
    """The weights file of an adapter dir; a pickled PEFT file only when allowed."""
    if (root / name).is_file():
        return root / name
    pickled = root / "adapter_model.bin"
    if name == PEFT_WEIGHTS and pickled.is_file():
        if allow_pickle:
            return pickled
        raise AdapterFormatError(f"{root} holds only adapter_model.bin; {PICKLE_REFUSED}")
    raise AdapterFormatError(f"{root} has no {name}; it holds no adapter weights")


# ------------------------------------------------------------------ writing
def write_mlx_adapter(w: AdapterWeights, dst: str | Path, *, allow_rescale: bool = False) -> Path:
    """Write ``w`` as an mlx-lm adapter dir that ``mlx_lm`` loads as-is.

    mlx-lm has one rank, one scale and a "last ``num_layers`` blocks" rule. So:

    - ``num_layers`` is kept from an mlx-lm source, else -1 (every block); mlx-lm then
      also wraps untargeted (block, key) pairs, whose ``lora_b`` stays zero: ΔW = 0;
    - smaller ranks are zero-padded to the largest one (same ΔW);
    - per-module scales are folded into ``lora_b`` relative to one shared scale. When
      a module's ratio is a power of two the fold is exact and our reader undoes it
      bit for bit; otherwise it would round, so it is refused unless
      ``allow_rescale=True``;
    - the true per-module rank and scale go in the ``sway_lora`` config field, which
      :func:`read_adapter` uses to give back the original factors.
    """
    tensors, cfg = mlx_payload(w, allow_rescale=allow_rescale)
    return _write_dir(Path(dst), MLX_WEIGHTS, tensors, cfg, "mlx")


def write_peft_adapter(
    w: AdapterWeights, dst: str | Path, base_model_name_or_path: str | None = None
) -> Path:
    """Write ``w`` as a PEFT LoRA dir (float32) that ``PeftModel.from_pretrained`` loads.

    Targets are exact: ``target_modules`` lists block-relative keys plus
    ``layers_to_transform`` when the adapter covers every (block, key) pair of its
    blocks, else a regex naming each module. Per-module ranks and scales go in
    ``rank_pattern`` / ``alpha_pattern``, with alpha chosen so that alpha / r gives
    back each scale exactly.
    """
    tensors, cfg = peft_payload(w, base_model_name_or_path)
    return _write_dir(Path(dst), PEFT_WEIGHTS, tensors, cfg, "pt")


def _write_dir(
    dst: Path, weights_name: str, tensors: dict[str, np.ndarray], cfg: dict, fmt: str
) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, dst / weights_name, fmt)
    # The config goes last: a dir with a config is a finished adapter.
    tmp = dst / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(dst / CONFIG_NAME)
    return dst


def convert_adapter(
    src: str | Path, dst: str | Path, to: AdapterFormat, *, allow_rescale: bool = False
) -> Path:
    """Read the adapter at ``src`` and write it in format ``to`` under ``dst``."""
    w = read_adapter(src)
    if to == "mlx":
        return write_mlx_adapter(w, dst, allow_rescale=allow_rescale)
    if to == "peft":
        base = w.config.get("base_model_name_or_path") or w.config.get("model")
        return write_peft_adapter(w, dst, base_model_name_or_path=base)
    raise ValueError(f"unknown adapter format {to!r}; choose 'mlx' or 'peft'")
