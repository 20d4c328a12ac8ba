"""The MLX backend's platform fixes; ``SWAY_MLX_NO_FAST_PATHS=1`` turns each one off.

- **OpenBLAS** (Linux, :func:`load_openblas`): the ``mlx[cpu]`` wheel links a reference
  BLAS, far slower than OpenBLAS at float32 matmuls. Loaded with ``RTLD_GLOBAL`` before
  ``mlx.core`` is imported, MLX binds to it, in this process only: torch must never share
  a process with it (torch runs slower under it), so it is not preloaded for every
  process, only for an MLX child process such as mlx-lm's trainer
  (:func:`with_openblas_preload`).
- **CPU SwiGLU** (:func:`use_cpu_swiglu`): MLX's CPU ``exp`` (behind ``sigmoid`` and
  ``silu``) costs many multiplies; :func:`cpu_swiglu` computes the same SwiGLU from
  multiplies and adds, fused by ``mx.compile``.
- **Dense on the CPU** (:func:`dense_on_cpu`): MLX's CPU quantized matmul does not go
  through the BLAS; an mlx-lm 4-bit model's layers are dequantized once at load (the
  values its kernel multiplies with) and run as float matmuls.

The measurements behind both are in docs/benchmarks.md.

Importing this module imports no mlx: ``sway_mlx`` loads OpenBLAS from here first.
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast

from sway_common.blas import find_openblas, openblas_mapped, preloaded_openblas
from sway_common.fast_paths import fast_paths_enabled

if TYPE_CHECKING:
    import mlx.core as mx
    import mlx.nn as nn

__all__ = [
    "cpu_swiglu",
    "dense_on_cpu",
    "fast_paths_enabled",
    "load_openblas",
    "use_cpu_swiglu",
    "with_openblas_preload",
]

# Cody-Waite split of ln 2: n·_LN2_HI is exact in float32 for the n an exp can take.
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4


# -------------------------------------------------------------------- OpenBLAS
def load_openblas() -> str:
    """Make MLX use OpenBLAS in this process if it can; say what happened.

    Returns ``"openblas"`` (loaded now or already), ``"reference"`` (``mlx.core`` was
    imported first and bound to its own BLAS), ``"missing"`` (no OpenBLAS here),
    ``"off"`` (fast paths off: not loaded), or ``"native"`` off Linux (Accelerate on macOS).
    """
    if not sys.platform.startswith("linux"):
        return "native"
    if openblas_mapped():
        return "openblas"
    if not fast_paths_enabled():
        return "off"
    if "mlx.core" in sys.modules:
        return "reference"
    path = find_openblas()
    if path is None:
        return "missing"
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return "missing"
    return "openblas"


def with_openblas_preload(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a child process that runs MLX only: OpenBLAS put first in
    ``LD_PRELOAD`` where there is one (unchanged with fast paths off)."""
    openblas = find_openblas()
    if openblas is None or preloaded_openblas(env) or not fast_paths_enabled():
        return dict(env)
    return {**env, "LD_PRELOAD": (openblas + " " + env.get("LD_PRELOAD", "")).strip()}


# ------------------------------------------------------------------- CPU SwiGLU
@functools.cache
def cpu_swiglu() -> Callable[[mx.array, mx.array], mx.array]:
    """The CPU SwiGLU: mlx-lm's ``swiglu`` (``silu(gate) · x``) to float32 rounding, with
    silu's derivative. Built once, on the first call (it needs mlx)."""
    import mlx.core as mx

    @functools.partial(mx.compile, shapeless=True)
    def exp_parts(x: mx.array) -> tuple[mx.array, mx.array]:
        """``(e**r, bits of 2**n)`` with ``exp(x) = e**r · 2**n``, ``|r| <= ln2/2``, ``e**r``
        by its Taylor series to ``r**7`` (truncation < 1e-8 relative)."""
        x = mx.clip(x.astype(mx.float32), -87.0, 88.0)
        n = mx.floor(x * (1 / math.log(2)) + 0.5)
        r = (x - n * _LN2_HI) - n * _LN2_LO
        p = 1 + r * (
            1 + r * (1 / 2 + r * (1 / 6 + r * (1 / 24 + r * (1 / 120 + r * (1 / 720 + r / 5040)))))
        )
        # 2**n as a float32's exponent bits; clipped as integers (NaN has no integer value).
        return p, mx.left_shift(mx.clip(n.astype(mx.int32) + 127, 0, 255), 23)

    def sigmoid(x: mx.array) -> mx.array:
        # The bits are read as float32 outside mx.compile: a shapeless graph cannot hold a view.
        p, bits = exp_parts(-x)
        return 1 / (1 + p * bits.view(mx.float32))

    @functools.partial(mx.compile, shapeless=True)
    def swiglu_from(gate: mx.array, x: mx.array, p: mx.array, two_n: mx.array) -> mx.array:
        g = gate.astype(mx.float32)
        return (g * x.astype(mx.float32) / (1 + p * two_n)).astype(x.dtype)

    @mx.custom_function
    def swiglu(gate: mx.array, x: mx.array) -> mx.array:
        p, bits = exp_parts(-gate)
        return swiglu_from(gate, x, p, bits.view(mx.float32))

    @swiglu.vjp
    def swiglu_vjp(
        primals: tuple[mx.array, mx.array], cotangent: mx.array, output: mx.array
    ) -> tuple[mx.array, mx.array]:
        # The exponent bits have no derivative; silu's is written out.
        gate, x = primals
        s = sigmoid(gate).astype(gate.dtype)
        return cotangent * x * s * (1 + gate * (1 - s)), cotangent * gate * s

    # A custom_function calls like the function it wraps (its stub returns object).
    return cast(Callable[[mx.array, mx.array], mx.array], swiglu)


class _SwiGLUModule(Protocol):
    """An architecture's module that imported mlx-lm's ``swiglu``."""

    swiglu: Callable[[mx.array, mx.array], mx.array]


def use_cpu_swiglu(model: nn.Module) -> bool:
    """On the CPU, run the SwiGLU of ``model``'s architecture with :func:`cpu_swiglu`.

    The architecture's module (``mlx_lm.models.llama`` and the others that import
    mlx-lm's ``swiglu``) gets it for the process; returns whether it did. On a GPU, or
    with fast paths off, that module gets mlx-lm's ``swiglu`` back if it had ours.
    """
    import mlx.core as mx
    from mlx_lm.models import activations

    module = sys.modules.get(type(model).__module__)
    if module is None or getattr(module, "swiglu", None) not in (activations.swiglu, cpu_swiglu()):
        return False
    arch = cast(_SwiGLUModule, module)  # checked just above: it holds a swiglu
    if not fast_paths_enabled() or mx.default_device().type != mx.DeviceType.cpu:
        arch.swiglu = activations.swiglu
        return False
    arch.swiglu = cpu_swiglu()
    return True


# ------------------------------------------------------------ dense on the CPU
def dense_on_cpu(model: nn.Module) -> bool:
    """On the CPU, dequantize ``model``'s quantized layers in place (mlx-lm's own
    ``dequantize_model``); returns whether it did.

    MLX's CPU quantized matmul does not use the BLAS that :func:`load_openblas` gives
    float32 matmuls (the measurement is in docs/export-check.md). The weights are the
    ones the quantized kernel computes with; the cost is memory (float weights, 8× a
    4-bit model's packed ones). On a GPU, or with fast paths off, the model stays
    quantized.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import dequantize_model

    if not fast_paths_enabled() or mx.default_device().type != mx.DeviceType.cpu:
        return False
    quantized = (nn.QuantizedLinear, nn.QuantizedEmbedding)
    if not any(isinstance(m, quantized) for _, m in model.named_modules()):
        return False
    dequantize_model(model)
    return True
