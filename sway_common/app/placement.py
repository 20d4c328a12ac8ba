"""--device-map, --max-memory and --dtype: where and in what precision the models run, on
every model command.

The values land in the run's :class:`~sway_common.suite.spec.ModelSpec` (where a spec's
``models.ft.device_map`` / ``max_memory`` / ``dtype`` would put them; the command line
wins). The HF backend hands the placement to accelerate; the MLX backend refuses it (one
line, exit 2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, get_args

import click

from sway_common.models import DType
from sway_common.suite.placement import DEVICE_MAPS, MAX_MEMORY_HELP, parse_max_memory
from sway_common.suite.spec import ModelSpec

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _max_memory(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return parse_max_memory(value)
    except ValueError as e:
        raise click.BadParameter(f"{e} (e.g. {MAX_MEMORY_HELP})") from None


device_map_option: Decorator = click.option(
    "--device-map",
    type=click.Choice(DEVICE_MAPS),
    default=None,
    help="Spread a base model too large for one GPU over several (HF backend, through "
    "accelerate): auto/balanced even out the GPUs, balanced_low_0 keeps GPU 0 lightest, "
    "sequential fills GPU 0 first. Views, λ and nulls are unchanged.",
)

max_memory_option: Decorator = click.option(
    "--max-memory",
    callback=_max_memory,
    metavar="DEVICE=SIZE,...",
    help=f"Most memory each device may take when spreading, e.g. {MAX_MEMORY_HELP} "
    "(alone, it means --device-map auto).",
)

dtype_option: Decorator = click.option(
    "--dtype",
    type=click.Choice(get_args(DType)),
    default=None,
    help="Precision the models run in [default: the spec's, else auto: float32 on a CPU, "
    "the model's half precision on a GPU]. Half precision rounds every forward, which "
    "moves the model as a light adapter does: such an adapter can read no different from "
    "random ones there and separate in float32.",
)

placement_options: list[Decorator] = [device_map_option, max_memory_option, dtype_option]
"""The three options, for a command's ``option_group`` (fields ``device_map``,
``max_memory``, ``dtype``)."""


def placed(
    model: ModelSpec, device_map: str | None, max_memory: Any, dtype: str | None = None
) -> ModelSpec:
    """``model`` with the command line's placement and precision over the spec's."""
    if device_map is None and max_memory is None and dtype is None:
        return model
    return dataclasses.replace(
        model,
        device_map=device_map if device_map is not None else model.device_map,
        max_memory=max_memory if max_memory is not None else model.max_memory,
        dtype=dtype if dtype is not None else model.dtype,
    )
