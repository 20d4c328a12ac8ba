"""Where a base model's weights go when it does not fit one device: a device map and
per-device memory caps, as a spec's model block and the command line give them.

The HF backend hands both to accelerate (``from_pretrained(device_map=..., max_memory=...)``):
the model's blocks are spread over the devices named, and each forward runs through them
in turn. Views, λ and nulls are unchanged: a null is drawn in numpy and placed on the
device of each adapted module, so the same seed gives the same null however the model
is spread. mlx-lm loads a model onto one device (its ``sharded_load`` spreads one only over
the ranks of an ``mlx.launch`` job, one process per device): the MLX backend refuses both
settings (:func:`placement_problem`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
"""accelerate's placement strategies: ``auto`` and ``balanced`` even out the GPUs,
``balanced_low_0`` leaves GPU 0 the lightest (room for generation), ``sequential`` fills
GPU 0 first."""

# Devices accelerate's max_memory names besides GPU indices.
_OTHER_DEVICES = ("cpu", "mps", "disk")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)

MAX_MEMORY_HELP = "0=20GiB,1=20GiB,cpu=64GiB"


def size_problem(value: Any) -> str | None:
    """Why ``value`` is not a memory size accelerate reads (``20GiB``, ``512MB``, bytes)."""
    if isinstance(value, bool):
        return f"{value!r} is not a size"
    if isinstance(value, int):
        return None if value > 0 else f"{value} is not a positive number of bytes"
    if isinstance(value, str) and (m := _SIZE.match(value)) and float(m.group(1)) > 0:
        return None
    return f"{value!r} is not a size; write it like 20GiB or 512MB"


def device_problem(key: Any) -> str | None:
    """Why ``key`` names no device: a GPU index (0, 1, ...) or cpu, mps, disk."""
    text = str(key).strip()
    if text.isdigit() or text.lower() in _OTHER_DEVICES:
        return None
    return f"{key!r} is not a device; use a GPU index (0, 1, ...) or {', '.join(_OTHER_DEVICES)}"


def max_memory_problems(mapping: Mapping[Any, Any]) -> list[str]:
    """Every problem of a device → size mapping, each naming its device."""
    if not mapping:
        return [f"is empty; name at least one device, e.g. {MAX_MEMORY_HELP}"]
    problems = []
    for key, value in mapping.items():
        problem = device_problem(key) or size_problem(value)
        if problem:
            problems.append(f"{key}: {problem}")
    return problems


def parse_max_memory(text: str) -> dict[str, str]:
    """``0=20GiB,1=20GiB,cpu=64GiB`` as a mapping; ``ValueError`` naming what is wrong."""
    out: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        device, sep, size = part.partition("=")
        if not sep:
            raise ValueError(
                f"{part.strip()!r} has no '='; write DEVICE=SIZE, e.g. {MAX_MEMORY_HELP}"
            )
        out[device.strip().lower()] = size.strip()
    problems = max_memory_problems(out)
    if problems:
        raise ValueError(problems[0])
    return out


def accelerate_max_memory(mapping: Mapping[Any, Any]) -> dict[int | str, int | str]:
    """The mapping accelerate reads: GPU indices as ints, other devices lower-case."""
    out: dict[int | str, int | str] = {}
    for key, value in mapping.items():
        text = str(key).strip().lower()
        out[int(text) if text.isdigit() else text] = (
            value.strip() if isinstance(value, str) else value
        )
    return out


def placement_problem(backend: str, device_map: str | None, max_memory: Any) -> str | None:
    """Why ``backend`` cannot spread a model as asked, as one line with the fix; else None."""
    if not device_map and not max_memory:
        return None
    if backend == "mlx":
        return (
            "the MLX backend loads the model onto one device (mlx-lm spreads a model only "
            "over the processes mlx.launch starts, one per device, which sway-mlx does not "
            "run): remove device_map/max_memory (--device-map/--max-memory), or use the HF "
            "backend (--backend hf)"
        )
    if backend == "dummy":
        return "the dummy backend has no model to spread: remove device_map/max_memory"
    return None
