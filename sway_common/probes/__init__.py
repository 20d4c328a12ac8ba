"""Probe kinds. Importing this package registers every built-in kind in ``REGISTRY``."""

from . import (  # noqa: F401  (registration)
    adapter_ablation,
    adapter_revert,
    attribution,
    calibration_drift,
    cluster_kl,
    delta_kl,
    external_perplexity,
    leakage,
    null_adapter,
    paraphrase_invariance,
    preference_flip,
    prompt_collapse,
    section_internalization,
    style_fingerprint,
    weight_spectrum,
)
from .base import REGISTRY, Probe, ProbeConfig
from .context import NullCalibration, RunContext
from .null_proxy import NullCalibrationBackendProxy

__all__ = [
    "REGISTRY",
    "NullCalibration",
    "NullCalibrationBackendProxy",
    "Probe",
    "ProbeConfig",
    "RunContext",
]
