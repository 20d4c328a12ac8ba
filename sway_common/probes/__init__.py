"""Probe kinds. Importing this package registers every built-in kind in ``REGISTRY``."""

from . import adapter_ablation, delta_kl, null_adapter  # noqa: F401  (registration)
from .base import REGISTRY, NullCalibration, Probe, ProbeConfig, RunContext
from .null_proxy import NullCalibrationBackendProxy

__all__ = [
    "REGISTRY",
    "NullCalibration",
    "NullCalibrationBackendProxy",
    "Probe",
    "ProbeConfig",
    "RunContext",
]
