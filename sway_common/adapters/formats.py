"""The PEFT and mlx-lm specifics behind :mod:`sway_common.adapters.io`.

Readers map a source config + tensors to canonical :class:`LoraModule` s; payload
builders go the other way. Transposes are the only change to the factors, so a
round trip through either format is bit-exact.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import numpy as np

from sway_common.adapters.files import AdapterFormatError
from sway_common.adapters.weights import (
    PEFT_PREFIX,
    SWAY_FIELD,
    AdapterWeights,
    LoraModule,
    split_layer_name,
)

# PEFT LoraConfig fields whose non-empty value changes what the adapter computes in a
# way a plain ΔW = scale·B·A cannot express.
_PEFT_UNSUPPORTED = {
    "modules_to_save": "modules_to_save (fully trained copies of whole modules)",
    "lora_bias": "lora_bias (a trained bias on lora_B)",
    "use_qalora": "QALoRA (pooled inputs)",
    "layer_replication": "layer_replication (duplicated blocks)",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows)",
    "target_parameters": "target_parameters (LoRA on raw nn.Parameters, e.g. MoE experts)",
    "alora_invocation_tokens": "aLoRA (activated only after invocation tokens)",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
    "use_bdlora": "block-diagonal LoRA",
    "megatron_config": "Megatron parallel layers",
}
# Initialisations that also rewrite the base weights: the saved factors are relative to
# that rewritten base, not to the model the user has.
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga", "mica")
_EMBEDDING_LEAVES = {"embed_tokens", "wte", "wpe", "embed_in", "word_embeddings", "tok_embeddings"}


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _refuse_unknown(kind: str, names: list[str]) -> None:
    shown = ", ".join(sorted(names)[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
    raise AdapterFormatError(f"{kind} adapter holds tensors that are not LoRA factors: {shown}")


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule: the first pattern key matching a dotted suffix of ``name`` wins."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return patterns[key]
    return default


def _number(value: Any, field: str, *, positive: bool = False) -> float:
    """A config number, checked: a string or NaN here would otherwise surface as a
    Python error far from the file that holds it."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        want = "a positive number" if positive else "a finite number"
        raise AdapterFormatError(f"adapter_config.json: {field} must be {want}, got {value!r}")
    return float(value)


def _rank(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdapterFormatError(
            f"adapter_config.json: {field} must be an integer >= 1, got {value!r}"
        )
    return value


def _mapping(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AdapterFormatError(f"adapter_config.json: {field} must be a mapping, got {value!r}")
    for key in value:
        try:
            re.compile(key)
        except (re.error, TypeError):
            raise AdapterFormatError(
                f"adapter_config.json: {field} key {key!r} is not a valid pattern"
            ) from None
    return value


# ---------------------------------------------------------------------- PEFT
def _check_peft_config(cfg: dict[str, Any]) -> None:
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterFormatError(
            f"PEFT tuner type {cfg.get('peft_type')!r} is not supported; only LORA (incl. DoRA)"
        )
    bias = cfg.get("bias", "none")
    if bias not in (None, "none"):
        raise AdapterFormatError(
            f"PEFT bias={bias!r} trains base biases; only bias='none' is supported"
        )
    for key, what in _PEFT_UNSUPPORTED.items():
        if cfg.get(key):
            raise AdapterFormatError(f"PEFT adapter uses {what} ({key}); it cannot be represented")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise AdapterFormatError(
            f"PEFT init_lora_weights={init!r} rewrites the base weights, so its factors are not "
            "a delta on the original model; save it with path_initial_model_for_weight_conversion"
        )


def read_peft(
    cfg: dict[str, Any], tensors: dict[str, np.ndarray]
) -> tuple[dict[str, LoraModule], bool]:
    _check_peft_config(cfg)
    parts: dict[str, dict[str, np.ndarray]] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        if "lora_embedding_" in name:
            raise AdapterFormatError(f"PEFT adapter has LoRA on an embedding layer ({key})")
        for suffix, part in (
            (".lora_A.weight", "A"),
            (".lora_B.weight", "B"),
            (".lora_magnitude_vector.weight", "M"),
            (".lora_magnitude_vector", "M"),
        ):
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[part] = t
                break
        else:
            if name.endswith(".lora_B.bias"):
                raise AdapterFormatError(f"PEFT adapter has a lora_B bias ({key}); not supported")
            unknown.append(key)
    if unknown:
        _refuse_unknown("PEFT", unknown)
    dora = bool(cfg.get("use_dora", False))
    r_default = _rank(cfg.get("r", 8), "r")
    alpha_default = _number(cfg.get("lora_alpha", 8), "lora_alpha")
    rank_pattern = _mapping(cfg.get("rank_pattern"), "rank_pattern")
    alpha_pattern = _mapping(cfg.get("alpha_pattern"), "alpha_pattern")
    modules: dict[str, LoraModule] = {}
    for name, p in sorted(parts.items()):
        if "A" not in p or "B" not in p:
            raise AdapterFormatError(f"PEFT module {name} lacks lora_A or lora_B")
        if p["A"].ndim != 2 or p["B"].ndim != 2:
            raise AdapterFormatError(
                f"PEFT module {name} has {p['A'].ndim}-D factors: LoRA on a non-Linear layer "
                "(e.g. conv) is not supported"
            )
        if ("M" in p) != dora:
            raise AdapterFormatError(
                f"PEFT module {name}: use_dora={dora} but a magnitude vector is "
                f"{'present' if 'M' in p else 'missing'}"
            )
        r = _rank(_pattern_value(rank_pattern, name, r_default), f"rank_pattern[{name}]")
        if r != p["A"].shape[0]:
            raise AdapterFormatError(
                f"PEFT module {name}: config rank {r} but lora_A has rank {p['A'].shape[0]}"
            )
        alpha = _number(
            _pattern_value(alpha_pattern, name, alpha_default), f"alpha_pattern[{name}]"
        )
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        mag = _f32(p["M"]).reshape(-1) if "M" in p else None
        modules[name] = LoraModule(_f32(p["A"]), _f32(p["B"]), scale, mag)
    return modules, dora


def _alpha_for(scale: float, r: int) -> float | int:
    """An alpha with ``alpha / r == scale`` exactly (PEFT recomputes the scale that way)."""
    alpha = scale * r
    for _ in range(4):
        if alpha / r == scale:
            break
        alpha = math.nextafter(alpha, math.inf if alpha / r < scale else -math.inf)
    else:
        alpha = scale * r
    return int(alpha) if float(alpha).is_integer() and abs(alpha) < 2**53 else alpha


def _most_common(values: list[Any]) -> Any:
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], v))


def peft_payload(
    w: AdapterWeights, base_model_name_or_path: str | None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float | int] = {}
    for name, m in sorted(w.modules.items()):
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = _f32(m.a)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = _f32(m.b)
        if m.magnitude is not None:
            tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = _f32(m.magnitude)
        ranks[name] = m.rank
        alphas[name] = _alpha_for(m.scale, m.rank)
    r_def = _most_common(list(ranks.values()))
    a_def = _most_common(list(alphas.values()))
    split = {n: split_layer_name(n) for n in w.modules}
    prefixes = {s[0] for s in split.values()}
    layer_ids = sorted({s[1] for s in split.values() if s[1] is not None})
    suffixes = sorted({s[2] for s in split.values()})
    product = {f"{p}.{i}.{s}" for p in prefixes for i in layer_ids for s in suffixes}
    target: list[str] | str
    layers: list[int] | None
    if len(prefixes) == 1 and "" not in prefixes and product == set(w.modules):
        target, layers = suffixes, layer_ids
    else:
        # Exact names, as a regex PEFT fullmatches against each module path.
        target = "(" + "|".join(re.escape(n) for n in sorted(w.modules)) + ")"
        layers = None
    src = w.config
    dropout = src.get("lora_dropout", (src.get("lora_parameters") or {}).get("dropout", 0.0))
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": src.get("task_type", "CAUSAL_LM") if w.fmt == "peft" else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r_def,
        "lora_alpha": a_def,
        "rank_pattern": {re.escape(n): r for n, r in ranks.items() if r != r_def},
        "alpha_pattern": {re.escape(n): a for n, a in alphas.items() if a != a_def},
        "target_modules": target,
        "layers_to_transform": layers,
        "layers_pattern": None,
        "lora_dropout": float(dropout or 0.0),
        "fan_in_fan_out": bool(src.get("fan_in_fan_out", False)) if w.fmt == "peft" else False,
        "bias": "none",
        "use_rslora": False,
        "use_dora": w.dora,
        "modules_to_save": None,
        "init_lora_weights": True,
    }
    return tensors, cfg


# ---------------------------------------------------------------------- mlx-lm
def read_mlx(
    cfg: dict[str, Any], tensors: dict[str, np.ndarray]
) -> tuple[dict[str, LoraModule], bool]:
    kind = cfg.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise AdapterFormatError(
            f"mlx-lm fine_tune_type={kind!r} holds full weights, not a LoRA adapter"
        )
    params = cfg.get("lora_parameters") or {}
    if not isinstance(params, dict) or "scale" not in params:
        raise AdapterFormatError("mlx-lm adapter_config.json lacks lora_parameters.scale")
    shared = _number(params["scale"], "lora_parameters.scale")
    sway = cfg.get(SWAY_FIELD) or {}
    extra = sway.get("modules", {}) if isinstance(sway, dict) else None
    if not isinstance(extra, dict):
        raise AdapterFormatError(f"adapter_config.json: {SWAY_FIELD} is malformed; remove it")
    if extra and float(sway.get("shared_scale", shared)) != shared:
        raise AdapterFormatError(
            f"lora_parameters.scale ({shared:g}) no longer matches the {SWAY_FIELD} field "
            f"({sway.get('shared_scale')}); the config was edited: remove the {SWAY_FIELD} field"
        )
    parts: dict[str, dict[str, np.ndarray]] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        name, _, leaf = key.rpartition(".")
        if leaf in ("lora_a", "lora_b", "m") and name:
            parts.setdefault(name, {})[leaf] = t
        else:
            unknown.append(key)
    if unknown:
        _refuse_unknown("mlx-lm", unknown)
    dora = kind == "dora"
    modules: dict[str, LoraModule] = {}
    for name, p in sorted(parts.items()):
        if name.rpartition(".")[2] in _EMBEDDING_LEAVES:
            raise AdapterFormatError(f"mlx-lm adapter has LoRA on an embedding layer ({name})")
        if "lora_a" not in p or "lora_b" not in p:
            raise AdapterFormatError(f"mlx-lm module {name} lacks lora_a or lora_b")
        if p["lora_a"].ndim != 2 or p["lora_b"].ndim != 2:
            raise AdapterFormatError(
                f"mlx-lm module {name} has {p['lora_a'].ndim}-D factors (switch / MoE LoRA); "
                "only Linear layers are supported"
            )
        if ("m" in p) != dora:
            raise AdapterFormatError(
                f"mlx-lm module {name}: fine_tune_type={kind} but 'm' is "
                f"{'present' if 'm' in p else 'missing'}"
            )
        a, b = _f32(p["lora_a"].T), _f32(p["lora_b"].T)
        scale = shared
        info = extra.get(name)
        if info is not None:
            r, scale = int(info["rank"]), float(info["scale"])
            if np.any(a[r:]) or np.any(b[:, r:]):
                raise AdapterFormatError(
                    f"mlx-lm module {name}: rank padding beyond {r} is not zero"
                )
            a, b = _f32(a[:r]), _f32(b[:, :r])
            if scale != shared:
                # Undo the fold done on writing (exact when the ratio is a power of two).
                b = _f32(b / np.float32(scale / shared))
        mag = _f32(p["m"]).reshape(-1) if "m" in p else None
        modules[name] = LoraModule(a, b, scale, mag)
    return modules, dora


def _pow2(x: float) -> bool:
    return x > 0 and math.frexp(x)[0] == 0.5


def mlx_payload(
    w: AdapterWeights, *, allow_rescale: bool
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    for name in w.modules:
        if name.rpartition(".")[2] in _EMBEDDING_LEAVES:
            raise AdapterFormatError(f"cannot write LoRA on an embedding layer ({name}) for mlx-lm")
    shared = float(_most_common([m.scale for m in w.modules.values()]))
    r_max = w.rank
    folded: dict[str, np.ndarray] = {}
    inexact: list[str] = []
    for name, m in sorted(w.modules.items()):
        if m.scale == shared:
            folded[name] = m.b
            continue
        ratio = np.float32(m.scale / shared)
        folded[name] = _f32(m.b * ratio)
        # Exact only for a power-of-two ratio, and only without overflow or underflow.
        if not (_pow2(m.scale / shared) and np.array_equal(folded[name] / ratio, m.b)):
            inexact.append(f"{name} (scale {m.scale:g})")
    if inexact and not allow_rescale:
        shown = ", ".join(inexact[:3]) + (
            f" (+{len(inexact) - 3} more)" if len(inexact) > 3 else ""
        )
        raise AdapterFormatError(
            f"mlx-lm has one LoRA scale ({shared:g}); folding the other scales into lora_b would "
            f"round for {shown}. Pass allow_rescale=True to accept ~1-ulp changes, or use the "
            "PEFT backend"
        )
    tensors: dict[str, np.ndarray] = {}
    for name, m in sorted(w.modules.items()):
        b = folded[name]
        a_pad = np.zeros((r_max, m.a.shape[1]), np.float32)
        b_pad = np.zeros((m.b.shape[0], r_max), np.float32)
        a_pad[: m.rank], b_pad[:, : m.rank] = m.a, b
        tensors[f"{name}.lora_a"] = _f32(a_pad.T)
        tensors[f"{name}.lora_b"] = _f32(b_pad.T)
        if m.magnitude is not None:
            tensors[f"{name}.m"] = _f32(m.magnitude)
    src = w.config
    cfg: dict[str, Any] = dict(src) if w.fmt == "mlx" else {}
    src_params = src.get("lora_parameters") or {}
    dropout = src_params.get("dropout", src.get("lora_dropout", 0.0))
    cfg["fine_tune_type"] = "dora" if w.dora else "lora"
    # -1 = every block; untargeted (block, key) pairs get lora_b = 0, i.e. ΔW = 0.
    cfg["num_layers"] = int(src.get("num_layers", -1)) if w.fmt == "mlx" else -1
    cfg["lora_parameters"] = {
        "rank": r_max,
        "scale": shared,
        "dropout": float(dropout or 0.0),
        "keys": w.target_keys,
    }
    if w.fmt == "peft" and src.get("base_model_name_or_path"):
        cfg.setdefault("model", src["base_model_name_or_path"])
    cfg[SWAY_FIELD] = {
        "version": 1,
        "shared_scale": shared,
        "modules": {n: {"rank": m.rank, "scale": m.scale} for n, m in sorted(w.modules.items())},
    }
    return tensors, cfg
