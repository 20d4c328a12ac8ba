"""Adapter reading, writing and conversion against real PEFT and mlx-lm adapters.

The ground truth is always the library itself: PEFT's merge_and_unload, mlx-lm's
fuse, and logits of each library's own model with the adapter loaded.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import fixtures_build  # noqa: E402  (tests/ is on sys.path through conftest)
import numpy as np
import pytest

from sway_common.adapters import (
    AdapterFormatError,
    AdapterWeights,
    convert_adapter,
    detect_format,
    read_adapter,
    write_mlx_adapter,
    write_peft_adapter,
)
from sway_common.adapters.files import load_safetensors
from sway_common.models import normalize_config

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TEXT = "The Harrowgate lighthouse was first lit by keeper Odile Fenwick."


def _base_model(model_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def _peft_adapter(model_dir: Path, dst: Path, seed: int = 0, merge: bool = True, **lora_kwargs):
    """Save a PEFT adapter with random non-zero B (and perturbed DoRA magnitudes).

    Returns (dir, base weights, PEFT's own merged weights), weights keyed by module name.
    """
    model = _base_model(model_dir)
    base = {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
    kwargs.update(lora_kwargs)
    pm = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
    fixtures_build.randomize_lora(pm, seed)
    pm.save_pretrained(str(dst))
    if not merge:
        return dst, base, {}
    merged = copy.deepcopy(pm).merge_and_unload()
    merged_sd = {k: v.detach().numpy() for k, v in merged.state_dict().items()}
    return dst, base, merged_sd


def _assert_matches_peft_merge(w: AdapterWeights, base: dict, merged: dict) -> None:
    for key in base:
        name = key.removesuffix(".weight")
        if name in w.modules:
            m = w.modules[name]
            if w.dora:
                np.testing.assert_allclose(m.merged(base[key]), merged[key], atol=1e-6)
            else:
                np.testing.assert_allclose(m.delta(), merged[key] - base[key], atol=1e-6)
                assert np.abs(m.delta()).max() > 1e-3
        else:
            np.testing.assert_array_equal(base[key], merged[key])


def _assert_same_weights(x: AdapterWeights, y: AdapterWeights) -> None:
    assert x.modules.keys() == y.modules.keys()
    assert x.dora == y.dora
    for name, m in x.modules.items():
        n = y.modules[name]
        assert np.array_equal(m.a, n.a) and np.array_equal(m.b, n.b), name
        assert m.scale == n.scale, name
        if m.magnitude is None:
            assert n.magnitude is None
        else:
            assert np.array_equal(m.magnitude, n.magnitude)
    assert x.content_hash == y.content_hash


def _hf_logits(model_dir: Path, adapter: Path | None) -> np.ndarray:
    model = _base_model(model_dir)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter))
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    with torch.no_grad():
        return model(torch.tensor([tok(TEXT)["input_ids"]])).logits[0].numpy()


def _mlx_logits(model_dir: Path, adapter: Path | None) -> np.ndarray:
    mlx_lm = pytest.importorskip("mlx_lm")
    import mlx.core as mx

    kw = {"adapter_path": str(adapter)} if adapter is not None else {}
    model, tok = mlx_lm.load(str(normalize_config(model_dir)), **kw)
    return np.array(model(mx.array([tok.encode(TEXT)]))[0].astype(mx.float32))


# ------------------------------------------------------------------ reading
def test_fixture_peft_adapter(tiny_peft_adapter: Path) -> None:
    w = read_adapter(tiny_peft_adapter)
    assert w.fmt == "peft" and not w.dora and w.rank == 4
    assert sorted(w.modules) == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in ("q", "v")
    ]
    assert w.target_keys == ["self_attn.q_proj", "self_attn.v_proj"]
    assert w.layers == [0, 1]
    assert all(m.scale == 2.0 for m in w.modules.values())
    assert all(np.abs(m.b).max() > 1e-3 for m in w.modules.values())
    assert w.modules["model.layers.0.self_attn.v_proj"].delta().shape == (32, 64)
    for name, norm in w.frobenius_norms().items():
        assert norm == pytest.approx(float(np.linalg.norm(w.modules[name].delta())), rel=1e-5)


def test_fixture_peft_adapter_changes_distribution(
    tiny_model_dir: Path, tiny_peft_adapter: Path
) -> None:
    base, ft = _hf_logits(tiny_model_dir, None), _hf_logits(tiny_model_dir, tiny_peft_adapter)
    p = torch.softmax(torch.tensor(base), -1).numpy()
    q = torch.softmax(torch.tensor(ft), -1).numpy()
    tv = 0.5 * np.abs(p - q).sum(-1)
    assert tv.mean() > 0.1


@pytest.mark.parametrize(
    ("kwargs", "mlx_exact"),
    [
        ({}, True),
        ({"use_rslora": True, "r": 8, "lora_alpha": 16}, True),
        ({"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"layers.1.self_attn.q_proj": 3}}, False),
        (
            {
                "layers_to_transform": [1],
                "target_modules": ["q_proj", "k_proj", "o_proj", "down_proj"],
            },
            True,
        ),
        ({"target_modules": r".*\.0\.self_attn\.q_proj|.*\.1\.mlp\.up_proj"}, True),
        ({"use_dora": True}, True),
        ({"use_dora": True, "rank_pattern": {"q_proj": 8}}, True),
    ],
    ids=["plain", "rslora", "patterns", "layers", "regex", "dora", "dora-patterns"],
)
def test_peft_delta_matches_peft_merge(
    tiny_model_dir: Path, tmp_path: Path, kwargs: dict, mlx_exact: bool
) -> None:
    path, base, merged = _peft_adapter(tiny_model_dir, tmp_path / "a", **kwargs)
    w = read_adapter(path)
    assert w.dora == bool(kwargs.get("use_dora"))
    _assert_matches_peft_merge(w, base, merged)
    # And back through both formats, bit-exact.
    peft_back = read_adapter(write_peft_adapter(w, tmp_path / "peft0"))
    _assert_same_weights(w, peft_back)
    if not mlx_exact:
        with pytest.raises(AdapterFormatError, match="allow_rescale"):
            write_mlx_adapter(w, tmp_path / "mlx")
        return
    mlx_dir = write_mlx_adapter(w, tmp_path / "mlx")
    _assert_same_weights(w, read_adapter(mlx_dir))
    _assert_same_weights(w, read_adapter(convert_adapter(mlx_dir, tmp_path / "peft", to="peft")))


def test_peft_scales_follow_patterns_and_rslora(tiny_model_dir: Path, tmp_path: Path) -> None:
    w = read_adapter(
        _peft_adapter(
            tiny_model_dir,
            tmp_path / "p",
            rank_pattern={"v_proj": 2},
            alpha_pattern={"layers.1.self_attn.q_proj": 3},
        )[0]
    )
    assert w.modules["model.layers.0.self_attn.q_proj"].scale == 2.0
    assert w.modules["model.layers.1.self_attn.q_proj"].scale == 0.75
    assert w.modules["model.layers.0.self_attn.v_proj"].rank == 2
    assert w.modules["model.layers.0.self_attn.v_proj"].scale == 4.0
    assert w.rank == 4
    r = read_adapter(
        _peft_adapter(tiny_model_dir, tmp_path / "r", use_rslora=True, r=8, lora_alpha=16)[0]
    )
    assert all(m.scale == pytest.approx(16 / np.sqrt(8)) for m in r.modules.values())


def test_fixture_mlx_adapter_matches_mlx_fuse(tiny_model_dir: Path, tiny_mlx_adapter: Path) -> None:
    mlx_lm = pytest.importorskip("mlx_lm")

    w = read_adapter(tiny_mlx_adapter)
    assert w.fmt == "mlx" and w.rank == 4 and w.layers == [0, 1]
    assert w.target_keys == ["self_attn.q_proj", "self_attn.v_proj"]
    assert all(m.scale == 2.0 for m in w.modules.values())
    model, _ = mlx_lm.load(
        str(normalize_config(tiny_model_dir)), adapter_path=str(tiny_mlx_adapter)
    )
    lora_layers = {
        name: mod for name, mod in model.named_modules() if type(mod).__name__ == "LoRALinear"
    }
    assert set(lora_layers) == set(w.modules)
    for name, mod in lora_layers.items():
        fused = mod.fuse()
        delta = np.array(fused.weight - mod.linear.weight)
        np.testing.assert_allclose(w.modules[name].delta(), delta, atol=1e-6)


def test_mlx_checkpoints_are_readable(tiny_mlx_adapter: Path) -> None:
    final = read_adapter(tiny_mlx_adapter)
    ck10 = read_adapter(tiny_mlx_adapter / "0000010_adapters.safetensors")
    ck20 = read_adapter(tiny_mlx_adapter / "0000020_adapters.safetensors")
    assert detect_format(tiny_mlx_adapter / "0000010_adapters.safetensors") == "mlx"
    assert ck20.content_hash == final.content_hash
    assert ck10.content_hash != final.content_hash
    assert ck10.modules.keys() == final.modules.keys()


# ------------------------------------------------------------------ round trips
def test_mlx_to_peft_to_mlx_bit_exact(tiny_mlx_adapter: Path, tmp_path: Path) -> None:
    w = read_adapter(tiny_mlx_adapter)
    peft_dir = convert_adapter(tiny_mlx_adapter, tmp_path / "peft", to="peft")
    assert detect_format(peft_dir) == "peft"
    mlx_dir = convert_adapter(peft_dir, tmp_path / "mlx", to="mlx")
    _assert_same_weights(w, read_adapter(peft_dir))
    _assert_same_weights(w, read_adapter(mlx_dir))
    raw_src = load_safetensors(tiny_mlx_adapter / "adapters.safetensors")
    raw_out = load_safetensors(mlx_dir / "adapters.safetensors")
    assert raw_src.keys() == raw_out.keys()
    assert all(np.array_equal(raw_src[k], raw_out[k]) for k in raw_src)
    cfg = json.loads((mlx_dir / "adapter_config.json").read_text())
    # PEFT keeps no block count, so the way back covers every block (-1); see write_mlx_adapter.
    assert cfg["num_layers"] == -1 and cfg["lora_parameters"]["scale"] == 2.0
    assert cfg["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]


def test_peft_to_mlx_to_peft_bit_exact(tiny_peft_adapter: Path, tmp_path: Path) -> None:
    w = read_adapter(tiny_peft_adapter)
    mlx_dir = convert_adapter(tiny_peft_adapter, tmp_path / "mlx", to="mlx")
    peft_dir = convert_adapter(mlx_dir, tmp_path / "peft", to="peft")
    _assert_same_weights(w, read_adapter(mlx_dir))
    _assert_same_weights(w, read_adapter(peft_dir))
    raw_src = load_safetensors(tiny_peft_adapter / "adapter_model.safetensors")
    raw_out = load_safetensors(peft_dir / "adapter_model.safetensors")
    assert raw_src.keys() == raw_out.keys()
    assert all(np.array_equal(raw_src[k], raw_out[k]) for k in raw_src)


def test_converted_mlx_adapter_runs_in_mlx_like_peft(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Untargeted blocks, mixed ranks, power-of-two scale ratios and DoRA all survive mlx-lm."""
    for i, kwargs in enumerate(
        [
            {"layers_to_transform": [1], "rank_pattern": {"v_proj": 2}},
            {"use_dora": True, "target_modules": ["q_proj", "o_proj"], "layers_to_transform": [0]},
        ]
    ):
        path, _, _ = _peft_adapter(tiny_model_dir, tmp_path / f"p{i}", seed=i, **kwargs)
        mlx_dir = convert_adapter(path, tmp_path / f"m{i}", to="mlx")
        ref = _hf_logits(tiny_model_dir, path)
        got = _mlx_logits(tiny_model_dir, mlx_dir)
        assert np.max(np.abs(ref - _hf_logits(tiny_model_dir, None))) > 1e-2
        np.testing.assert_allclose(got, ref, atol=1e-4)


def test_converted_peft_adapter_runs_in_peft_like_mlx(
    tiny_model_dir: Path, tiny_mlx_adapter: Path, tmp_path: Path
) -> None:
    peft_dir = convert_adapter(tiny_mlx_adapter, tmp_path / "peft", to="peft")
    np.testing.assert_allclose(
        _hf_logits(tiny_model_dir, peft_dir),
        _mlx_logits(tiny_model_dir, tiny_mlx_adapter),
        atol=1e-4,
    )


def test_peft_writer_targets_exactly(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A non-rectangular module set is written as an exact regex PEFT loads as-is,
    and per-module ranks / alphas as escaped full-name patterns PEFT honours."""
    path, _, _ = _peft_adapter(
        tiny_model_dir,
        tmp_path / "p",
        target_modules=r".*\.0\.self_attn\.q_proj|.*\.1\.mlp\.up_proj|.*\.1\.self_attn\.v_proj",
        rank_pattern={"up_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    w = read_adapter(path)
    out = write_peft_adapter(w, tmp_path / "out", base_model_name_or_path=str(tiny_model_dir))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert isinstance(cfg["target_modules"], str)
    assert cfg["rank_pattern"] and cfg["alpha_pattern"]
    assert read_adapter(out).scales == w.scales
    pm = peft.PeftModel.from_pretrained(_base_model(tiny_model_dir), str(out))
    wrapped = {n for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(w.modules)
    np.testing.assert_allclose(
        _hf_logits(tiny_model_dir, out), _hf_logits(tiny_model_dir, path), atol=1e-5
    )


def test_non_power_of_two_scale_ratio_needs_opt_in(tiny_model_dir: Path, tmp_path: Path) -> None:
    path, _, _ = _peft_adapter(tiny_model_dir, tmp_path / "p", alpha_pattern={"v_proj": 3})
    w = read_adapter(path)
    with pytest.raises(AdapterFormatError, match="allow_rescale"):
        write_mlx_adapter(w, tmp_path / "m")
    back = read_adapter(write_mlx_adapter(w, tmp_path / "m", allow_rescale=True))
    for name, m in w.modules.items():
        assert back.modules[name].scale == m.scale
        np.testing.assert_allclose(back.modules[name].delta(), m.delta(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        _mlx_logits(tiny_model_dir, tmp_path / "m"), _hf_logits(tiny_model_dir, path), atol=1e-4
    )


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "lora_only"}, "bias"),
        ({"bias": "all"}, "bias"),
        ({"lora_bias": True}, "lora_bias"),
        ({"target_modules": ["embed_tokens", "q_proj"]}, "embedding"),
    ],
)
def test_refuses_what_it_cannot_represent(
    tiny_model_dir: Path, tmp_path: Path, kwargs: dict, match: str
) -> None:
    # Some of these cannot even be merged by PEFT (lora_bias on a bias-less Linear).
    path, _, _ = _peft_adapter(tiny_model_dir, tmp_path / "p", merge=False, **kwargs)
    with pytest.raises(AdapterFormatError, match=match):
        read_adapter(path)


def test_refuses_other_peft_tuners(tiny_model_dir: Path, tmp_path: Path) -> None:
    pm = peft.get_peft_model(
        _base_model(tiny_model_dir),
        peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    pm.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(AdapterFormatError, match="IA3"):
        read_adapter(tmp_path / "ia3")


def test_refuses_bin_only_and_non_adapters(tiny_peft_adapter: Path, tmp_path: Path) -> None:
    d = tmp_path / "binonly"
    d.mkdir()
    shutil.copy(tiny_peft_adapter / "adapter_config.json", d)
    (d / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(AdapterFormatError, match="safe_serialization"):
        read_adapter(d)
    with pytest.raises(AdapterFormatError, match="safetensors"):
        read_adapter(d / "adapter_model.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterFormatError, match="not a LoRA adapter"):
        detect_format(tmp_path / "empty")


def test_refuses_unknown_tensors_and_full_finetunes(tiny_mlx_adapter: Path, tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    d = tmp_path / "extra"
    shutil.copytree(tiny_mlx_adapter, d)
    raw = load_safetensors(d / "adapters.safetensors")
    raw["model.norm.weight"] = np.ones(64, np.float32)
    save_file(raw, str(d / "adapters.safetensors"))
    with pytest.raises(AdapterFormatError, match="model.norm.weight"):
        read_adapter(d)
    cfg = json.loads((tiny_mlx_adapter / "adapter_config.json").read_text())
    cfg["fine_tune_type"] = "full"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFormatError, match="full"):
        read_adapter(d)


# ------------------------------------------------------------------ hashing, dtypes
def test_content_hash_tracks_weights_not_paths(tiny_peft_adapter: Path, tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    original = read_adapter(tiny_peft_adapter)
    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny_peft_adapter, moved)
    assert read_adapter(moved).content_hash == original.content_hash
    raw = load_safetensors(moved / "adapter_model.safetensors")
    key = sorted(raw)[0]
    raw[key] = raw[key].copy()
    raw[key].flat[0] = np.nextafter(raw[key].flat[0], np.float32(np.inf))
    save_file(raw, str(moved / "adapter_model.safetensors"))
    assert read_adapter(moved).content_hash != original.content_hash
    # The hash is canonical: the same adapter in mlx-lm form hashes the same.
    mlx_dir = write_mlx_adapter(original, tmp_path / "mlx")
    assert read_adapter(mlx_dir).content_hash == original.content_hash


def test_reads_bfloat16_adapters(tiny_peft_adapter: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    d = tmp_path / "bf16"
    shutil.copytree(tiny_peft_adapter, d)
    sd = load_file(str(d / "adapter_model.safetensors"))
    bf = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    save_file(bf, str(d / "adapter_model.safetensors"))
    w = read_adapter(d)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    want = bf[key].to(torch.float32).numpy()
    assert np.array_equal(w.modules["model.layers.0.self_attn.q_proj"].a, want)
    assert w.modules["model.layers.0.self_attn.q_proj"].a.dtype == np.float32
