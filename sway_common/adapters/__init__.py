"""LoRA adapters on disk and in memory: one canonical form, PEFT and mlx-lm formats."""

from sway_common.adapters.files import AdapterFormatError
from sway_common.adapters.io import (
    convert_adapter,
    detect_format,
    read_adapter,
    write_mlx_adapter,
    write_peft_adapter,
)
from sway_common.adapters.weights import AdapterWeights, LoraModule

__all__ = [
    "AdapterFormatError",
    "AdapterWeights",
    "LoraModule",
    "convert_adapter",
    "detect_format",
    "read_adapter",
    "write_mlx_adapter",
    "write_peft_adapter",
]
