"""Which backend to use here, how to build it, and what `doctor` reports.

``auto`` means: MLX on Apple silicon; HF on CUDA; elsewhere HF if torch is installed,
else MLX. Backends are imported only when chosen, so probing this costs no framework
import unless asked.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys
from typing import Any

from sway_common.backend.model_views import ModelViews
from sway_common.blas import INSTALL_HINT, find_openblas, preloaded_openblas
from sway_common.fast_paths import ENV_VAR, fast_paths_enabled
from sway_common.suite.placement import placement_problem
from sway_common.suite.spec import BACKEND_KINDS, ModelSpec

# Kinds that load a real model (and can train one).
MODEL_BACKEND_KINDS = ("auto", "mlx", "hf")


def is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def cuda_available() -> bool:
    if not installed("torch"):
        return False
    import torch

    return bool(torch.cuda.is_available())


def pick_backend(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    if is_apple_silicon() and installed("mlx_lm"):
        return "mlx"
    if installed("torch") and installed("peft"):
        return "hf"
    return "mlx"


class BackendUnavailableError(RuntimeError):
    pass


def build_backend(
    model: ModelSpec, backend: str = "auto", *, plain: bool = False, **kw: Any
) -> ModelViews:
    """Construct the differential backend for ``model`` (base + adapter).

    ``plain``: the model alone, no adapter (only its base view), e.g. an exported model.
    """
    choice = pick_backend(backend if backend != "auto" else model.kind)
    if problem := placement_problem(choice, model.device_map, model.max_memory):
        raise ValueError(problem)
    if choice == "dummy":
        from sway_common.backend.dummy import DummyDifferentialBackend

        presets = {"trained": 1.0, "untrained": 0.0, "nan": 1.0}
        preset = model.adapter or "trained"
        if preset not in presets:
            raise ValueError(f"dummy adapter must be one of {', '.join(presets)}, got {preset!r}")
        return DummyDifferentialBackend(
            adapter_strength=presets[preset], nan_adapter=preset == "nan"
        )
    if model.adapter is None and not plain:
        raise ValueError("an adapter path is required (models.ft.adapter or --adapter-path)")
    if choice == "mlx":
        if not installed("mlx_lm"):
            raise BackendUnavailableError(
                "the MLX backend needs mlx-lm: pip install 'sway-mlx[mlx]' (or use --backend hf)"
            )
        from sway_mlx.backend import MLXDifferentialBackend

        return MLXDifferentialBackend(
            model.base, None if plain else model.adapter, dtype=model.dtype, **kw
        )
    if choice == "hf":
        if not (installed("torch") and installed("peft") and installed("transformers")):
            raise BackendUnavailableError(
                "the HF backend needs torch, transformers and peft: pip install 'sway-mlx[hf]' "
                "(or use --backend mlx)"
            )
        from sway_hf.backend import HFDifferentialBackend

        adapter = None if plain else model.adapter
        if model.device_map or model.max_memory:
            kw = {**kw, "device_map": model.device_map or "auto", "max_memory": model.max_memory}
        return HFDifferentialBackend(
            model.base, adapter, dtype=model.dtype, device=model.device, **kw
        )
    raise ValueError(f"unknown backend {choice!r}; choose one of {', '.join(BACKEND_KINDS)}")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def blas_report() -> dict[str, Any]:
    """What MLX's float32 matmuls would run on here, and whether torch is exposed to it."""
    openblas = find_openblas()
    if sys.platform == "darwin":
        mlx = "Accelerate"
    elif openblas is not None and not fast_paths_enabled():
        mlx = f"reference BLAS: {ENV_VAR} is set, so sway-mlx does not load OpenBLAS"
    elif openblas is not None:
        mlx = "OpenBLAS, loaded by sway-mlx when the MLX backend runs"
    else:
        mlx = f"reference BLAS (slow float32 matmuls): {INSTALL_HINT}"
    return {
        "openblas": openblas,
        "mlx_cpu_matmuls": mlx,
        "ld_preload_openblas": preloaded_openblas(),
    }


def doctor_report() -> dict[str, Any]:
    """Facts about this machine that decide which backend runs and how fast."""
    report: dict[str, Any] = {
        "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "apple_silicon": is_apple_silicon(),
        "packages": {
            d: _version(d)
            for d in ("sway-mlx", "mlx", "mlx-lm", "torch", "transformers", "peft", "numpy")
        },
        "backends": {},
    }
    for name, module in (("mlx", "mlx_lm"), ("hf", "peft")):
        try:
            importlib.import_module(module)
            report["backends"][name] = "ok"
        except Exception as e:  # a broken install should be reported, not crash doctor
            report["backends"][name] = f"unavailable ({type(e).__name__}: {e})".splitlines()[0]
    report["cuda"] = cuda_available() if report["backends"]["hf"] == "ok" else False
    report["auto_picks"] = pick_backend("auto")
    report["blas"] = blas_report()
    report["fast_paths"] = fast_paths_enabled()
    return report
