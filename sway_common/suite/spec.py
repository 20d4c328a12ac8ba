"""Suite specs: the ``sway.yaml`` v1 format (as dlm-sway 0.1.0 reads it), validated up front.

Every problem in a spec is collected and reported at once, with its path
(``suite[2].promts``) and a did-you-mean for typos, before any model is loaded: a
typo should cost a second, not a model download.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sway_common.probes import REGISTRY, ProbeConfig
from sway_common.probes.adapter_ablation import AdapterAblationConfig
from sway_common.probes.calibration_drift import CalibrationDriftConfig
from sway_common.probes.context import NullCalibration
from sway_common.probes.delta_kl import DeltaKLConfig
from sway_common.probes.external_perplexity import ExternalPerplexityConfig
from sway_common.probes.null_adapter import NullAdapterConfig
from sway_common.probes.weight_spectrum import WeightSpectrumConfig
from sway_common.suite.fields import build_dataclass, did_you_mean, unknown_keys
from sway_common.suite.placement import DEVICE_MAPS, max_memory_problems, placement_problem

SUPPORTED_VERSION = 1
# The backends a spec's ``kind`` (and ``--backend``) may name; "dummy" is the analytic
# test backend, which needs no model.
BACKEND_KINDS = ("auto", "mlx", "hf", "dummy")
# Probe fields that name local files: relative to the spec file, like the model paths.
PATH_FIELDS = ("doc", "corpus", "pack", "embedding_model")
# Values of those fields that name built-in data, not files.
SPECIAL_PATH_VALUES = ("builtin", "none")
# The quick eval's answer to "did it break general knowledge?": small, so it stays quick.
QUICK_DRIFT_ITEMS = 24
QUICK_PROSE_CHUNKS = 4
QUICK_CHUNK_CHARS = 1024


class SpecError(ValueError):
    """All problems found in one spec."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


@dataclass
class ModelSpec:
    base: str
    kind: str = "auto"
    adapter: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    """Spread the model over several devices (HF, through accelerate): one of
    :data:`~sway_common.suite.placement.DEVICE_MAPS`."""
    max_memory: dict[str, str] | None = None
    """Most memory per device when spreading (``{0: 20GiB, 1: 20GiB, cpu: 64GiB}``);
    without ``device_map`` it means ``device_map: auto``."""


@dataclass
class Defaults:
    seed: int = 0
    top_k: int = 256
    differential: bool = True
    coverage_threshold: float = 0.5
    score_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class SuiteSpec:
    probes: list[ProbeConfig]
    defaults: Defaults = field(default_factory=Defaults)
    model: ModelSpec | None = None
    """The fine-tuned model (base + adapter); None when a backend is handed in directly."""
    source: str = "<suite>"

    def null_calibration(self) -> NullCalibration:
        for cfg in self.probes:
            if isinstance(cfg, NullAdapterConfig) and cfg.enabled:
                return cfg.calibration()
        return NullCalibration()


# --------------------------------------------------------------------------- parsing
def _parse_probe(
    entry: Any, i: int, problems: list[str], base_dir: Path | None = None
) -> ProbeConfig | None:
    path = f"suite[{i}]"
    if not isinstance(entry, dict):
        problems.append(f"{path}: expected a mapping with name and kind")
        return None
    name, kind = entry.get("name"), entry.get("kind")
    if isinstance(name, str):
        path = f"suite[{i}] ({name})"
    if not isinstance(kind, str):
        problems.append(f"{path}.kind: required; one of {', '.join(sorted(REGISTRY))}")
        return None
    if kind not in REGISTRY:
        problems.append(
            f"{path}.kind: unknown probe kind {kind!r}{did_you_mean(kind, REGISTRY)}"
            f" (known: {', '.join(sorted(REGISTRY))})"
        )
        return None
    probe_cls = REGISTRY[kind]
    cfg = build_dataclass(probe_cls.Config, entry, path, problems)
    if cfg is not None:
        escaped = _confine_probe_paths(cfg, base_dir) if base_dir is not None else []
        problems.extend(f"{path}.{p}" for p in escaped)
        if not escaped:  # a check may read the file: never one outside the spec's directory
            problems.extend(f"{path}.{p}" for p in probe_cls().check(cfg))
    return cfg


def _parse_model(data: Any, path: str, problems: list[str]) -> ModelSpec | None:
    spec = build_dataclass(ModelSpec, data, path, problems)
    if spec is not None and spec.kind not in BACKEND_KINDS:
        problems.append(
            f"{path}.kind: {spec.kind!r} is not one of {', '.join(BACKEND_KINDS)}"
            f"{did_you_mean(spec.kind, BACKEND_KINDS)}"
        )
    if spec is not None:
        problems.extend(f"{path}.{p}" for p in _placement_problems(spec))
    return spec


def _placement_problems(spec: ModelSpec) -> list[str]:
    problems = []
    if spec.device_map is not None and spec.device_map not in DEVICE_MAPS:
        problems.append(
            f"device_map: {spec.device_map!r} is not one of {', '.join(DEVICE_MAPS)}"
            f"{did_you_mean(spec.device_map, DEVICE_MAPS)}"
        )
    if spec.max_memory is not None:
        problems.extend(f"max_memory: {p}" for p in max_memory_problems(spec.max_memory))
    if (spec.device_map or spec.max_memory) and spec.device != "auto":
        problems.append("device: must be auto with device_map/max_memory (they place the model)")
    if problem := placement_problem(spec.kind, spec.device_map, spec.max_memory):
        problems.append(f"device_map: {problem}")
    return problems


def parse_spec(data: Any, source: str = "<suite>", base_dir: Path | None = None) -> SuiteSpec:
    """Validate a decoded spec document; raise :class:`SpecError` listing every problem."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise SpecError(source, ["the document must be a mapping with version, models, suite"])
    unknown_keys(data, ("version", "models", "defaults", "suite", "dlm_source"), "", problems)
    if data.get("version", SUPPORTED_VERSION) != SUPPORTED_VERSION:
        problems.append(
            f"version: {data.get('version')!r} is not supported (this build reads 1); set version: 1"
        )

    model = None
    models = data.get("models")
    if not isinstance(models, dict):
        problems.append("models: required mapping with 'ft' (base + adapter)")
    else:
        unknown_keys(models, ("base", "ft"), "models", problems)
        ft = _parse_model(models.get("ft"), "models.ft", problems) if "ft" in models else None
        base = _parse_model(models["base"], "models.base", problems) if "base" in models else None
        if "ft" not in models:
            problems.append("models.ft: required (the base model and the adapter to test)")
        elif ft is not None and not ft.adapter:
            problems.append("models.ft.adapter: required (path to the adapter to test)")
        if base is not None and ft is not None and base.base != ft.base:
            problems.append(
                f"models.base.base: {base.base!r} differs from models.ft.base {ft.base!r}; "
                "the views share one base model"
            )
        model = ft
        if model is not None and base_dir is not None:
            model = _resolve_paths(model, base_dir)

    defaults = (
        build_dataclass(Defaults, data.get("defaults", {}), "defaults", problems) or Defaults()
    )
    if not defaults.differential:
        problems.append(
            "defaults.differential: false is not supported; views always share one model"
        )
    if not 0.0 <= defaults.coverage_threshold <= 1.0:
        problems.append("defaults.coverage_threshold: must lie in [0, 1]")
    if defaults.top_k < 1:
        problems.append("defaults.top_k: must be >= 1")

    suite = data.get("suite")
    probes: list[ProbeConfig] = []
    if not isinstance(suite, list) or not suite:
        problems.append("suite: required non-empty list of probe entries")
    else:
        for i, entry in enumerate(suite):
            cfg = _parse_probe(entry, i, problems, base_dir)
            if cfg is not None:
                probes.append(cfg)
        seen: set[str] = set()
        for cfg in probes:
            if cfg.name in seen:
                problems.append(
                    f"suite: probe name {cfg.name!r} is used twice; names must be unique"
                )
            seen.add(cfg.name)

    if problems:
        raise SpecError(source, problems)
    return SuiteSpec(probes=probes, defaults=defaults, model=model, source=source)


def _resolve_paths(model: ModelSpec, base_dir: Path) -> ModelSpec:
    """Relative local paths are relative to the spec file, like any config file."""

    def fix(value: str | None) -> str | None:
        if value is None or Path(value).expanduser().is_absolute():
            return value
        candidate = base_dir / value
        return str(candidate) if candidate.exists() else value

    return dataclasses.replace(
        model, base=fix(model.base) or model.base, adapter=fix(model.adapter)
    )


def _confine_probe_paths(cfg: ProbeConfig, base_dir: Path) -> list[str]:
    """Resolve a probe's file fields against the spec's directory; refuse any that leave it.

    A spec is often someone else's (a pull request, a shared repo): its ``doc``,
    ``corpus`` or ``pack`` must not read ``~/.ssh`` or ``/etc`` into a report. Absolute
    paths, ``..`` and symlinks out of the spec's directory are refused alike.
    """
    root = base_dir.resolve()
    problems = []
    for name in PATH_FIELDS:
        value = getattr(cfg, name, None)
        if not isinstance(value, str) or not value or value in SPECIAL_PATH_VALUES:
            continue
        target = (root / Path(value).expanduser()).resolve()
        if not target.is_relative_to(root):
            problems.append(
                f"{name}: {value!r} lies outside the spec's directory {root}; files a spec "
                "names are read only from there: copy the file into it"
            )
            continue
        setattr(cfg, name, str(target))
    return problems


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except IsADirectoryError:
        raise SpecError(str(path), ["is a directory; give the spec file (sway.yaml)"]) from None
    except UnicodeDecodeError as e:
        raise SpecError(str(path), [f"not UTF-8 text (byte {e.start}); save it as UTF-8"]) from None
    except OSError as e:
        raise SpecError(
            str(path), [f"cannot read the file: {e.strerror or e}; check the path"]
        ) from None
    if not text.strip():
        raise SpecError(
            str(path), ["the file is empty; write a sway.yaml v1 spec (version, models, suite)"]
        )
    return text


def _syntax_problem(e: Exception, fmt: str) -> str:
    """A parser error as one line: where, what, and what to do."""
    import yaml

    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    if isinstance(e, json.JSONDecodeError):
        where, what = f" at line {e.lineno}, column {e.colno}", e.msg
    else:
        what = getattr(e, "problem", None) or " ".join(str(e).split())
    if isinstance(e, yaml.constructor.ConstructorError):
        # safe_load refuses tags that would build Python objects (or run code).
        return f"not valid {fmt}{where}: {what}; only plain YAML is read: remove the tag"
    return f"not valid {fmt}{where}: {what}; fix the syntax there"


def load_spec(path: str | Path) -> SuiteSpec:
    """Read and validate a YAML or JSON spec file (YAML through the safe loader only)."""
    path = Path(path)
    text = _read_text(path)
    fmt = "JSON" if path.suffix == ".json" else "YAML"
    try:
        if fmt == "JSON":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # any parser error is a problem of the file, reported as one
        raise SpecError(str(path), [_syntax_problem(e, fmt)]) from None
    return parse_spec(data, source=str(path), base_dir=path.parent.resolve())


def quick_suite(
    prompts: list[str], *, runs: int = 8, model: ModelSpec | None = None, seed: int = 0
) -> SuiteSpec:
    """The default suite for a spec-less ``eval``: null calibration, delta_kl, ablation,
    small general-knowledge and held-out-prose regression checks, and the weight spectrum
    (a report)."""
    return SuiteSpec(
        probes=[
            NullAdapterConfig(
                name="null_baseline", kind="null_adapter", runs=runs, prompts=list(prompts)
            ),
            DeltaKLConfig(name="delta_kl", kind="delta_kl", prompts=list(prompts)),
            AdapterAblationConfig(name="ablation", kind="adapter_ablation", prompts=list(prompts)),
            CalibrationDriftConfig(
                name="general_knowledge", kind="calibration_drift", items_limit=QUICK_DRIFT_ITEMS
            ),
            ExternalPerplexityConfig(
                name="held_out_prose",
                kind="external_perplexity",
                max_chunks=QUICK_PROSE_CHUNKS,
                chunk_chars=QUICK_CHUNK_CHARS,
            ),
            # A report (no forward pass, never gating, no score): after the rest, so it
            # changes none of their numbers.
            WeightSpectrumConfig(name="weight_spectrum", kind="weight_spectrum"),
        ],
        defaults=Defaults(seed=seed),
        model=model,
        source="quick suite",
    )
