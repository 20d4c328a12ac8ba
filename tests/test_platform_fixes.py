"""The platform fixes and fast paths: each gives the upstream path's numbers, and
``SWAY_MLX_NO_FAST_PATHS=1`` turns each one off.

- MLX (``sway_mlx.platform_fixes``): OpenBLAS in MLX's process only, the CPU SwiGLU;
- HF (``sway_hf.platform_fixes``): the lean PEFT LoRA forward;
- CLI (``sway_common.app.process``): the re-exec without an OpenBLAS ``LD_PRELOAD``,
  torch hidden from an MLX run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sway_common.app import process
from sway_common.blas import find_openblas, preloaded_openblas, without_openblas_preload
from sway_common.fast_paths import ENV_VAR, fast_paths_enabled

REPO = Path(__file__).resolve().parents[1]
HAS_MLX = importlib.util.find_spec("mlx_lm") is not None
HAS_HF = all(importlib.util.find_spec(m) for m in ("torch", "peft", "transformers"))

# `make install` installs OpenBLAS on Linux, so there its absence fails the tests below.
needs_openblas = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="Linux only: macOS uses Accelerate"
)
EXACT = {"dtype": "float32", "device": "cpu"}


def _runtime(backend):
    """What holds the model and its LoRA slots: the backend's runtime, or the backend."""
    return getattr(backend, "runtime", backend)


def test_one_switch_turns_the_fast_paths_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ENV_VAR == "SWAY_MLX_NO_FAST_PATHS"
    for value, enabled in (("", True), ("0", True), ("1", False), ("yes", False)):
        assert fast_paths_enabled({ENV_VAR: value}) is enabled
    assert fast_paths_enabled({})
    monkeypatch.setenv(ENV_VAR, "1")
    assert not fast_paths_enabled()
    monkeypatch.delenv(ENV_VAR)
    assert fast_paths_enabled()


# ---------------------------------------------------------------- OpenBLAS
def _run(code: str, **env: str) -> str:
    clean = {k: v for k, v in without_openblas_preload(dict(os.environ)).items() if k != ENV_VAR}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


MAPPED = "import pathlib; print('libopenblas' in pathlib.Path('/proc/self/maps').read_text())"
MLX_MATMUL = "import sway_mlx, mlx.core as mx; a = mx.ones((64, 64)); mx.eval(a @ a); "


def test_preload_is_dropped_but_other_preloads_are_kept() -> None:
    env = {
        "LD_PRELOAD": "/x/libfoo.so /usr/lib/openblas-pthread/libopenblas.so.0:/y/libbar.so",
        "A": "1",
    }
    assert preloaded_openblas(env)
    kept = without_openblas_preload(env)
    assert kept == {"LD_PRELOAD": "/x/libfoo.so /y/libbar.so", "A": "1"}
    assert without_openblas_preload({"LD_PRELOAD": "libopenblas.so.0"}) == {}


@needs_openblas
@pytest.mark.parametrize("switch", ["", "1"], ids=["fast", "off"])
def test_mlx_side_loads_openblas_before_mlx(switch: str) -> None:
    got = _run(f"{MLX_MATMUL}print(sway_mlx.BLAS); {MAPPED}", **{ENV_VAR: switch})
    assert got.splitlines() == (["openblas", "True"] if not switch else ["off", "False"])


@needs_openblas
def test_the_mlx_trainer_gets_openblas_preloaded_unless_the_switch_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sway_mlx.platform_fixes import with_openblas_preload

    openblas = find_openblas()
    assert openblas is not None, "make install puts OpenBLAS on Linux"
    env = {"LD_PRELOAD": "/x/libfoo.so", "A": "1"}
    assert with_openblas_preload(env) == {"LD_PRELOAD": f"{openblas} /x/libfoo.so", "A": "1"}
    assert with_openblas_preload({"LD_PRELOAD": openblas}) == {"LD_PRELOAD": openblas}
    monkeypatch.setenv(ENV_VAR, "1")
    assert with_openblas_preload(env) == env


@needs_openblas
def test_torch_side_never_loads_openblas() -> None:
    code = f"import torch, sway_hf.backend; torch.ones(64, 64) @ torch.ones(64, 64); {MAPPED}"
    assert _run(code) == "False"


@needs_openblas
def test_mlx_imported_first_is_reported_not_hidden() -> None:
    assert _run("import mlx.core, sway_mlx; print(sway_mlx.BLAS)") == "reference"


@needs_openblas
def test_cli_drops_an_inherited_openblas_preload() -> None:
    clean = without_openblas_preload(dict(os.environ))
    proc = subprocess.run(
        [sys.executable, "-m", "sway_common.app.cli", "doctor", "--json"],
        cwd=REPO,
        env={**clean, "LD_PRELOAD": find_openblas() or ""},
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(proc.stdout)
    assert report["blas"]["ld_preload_openblas"] is False
    assert report["blas"]["openblas"] == find_openblas()


def test_the_re_exec_drops_only_openblas_and_is_off_with_the_switch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, list[str], dict[str, str]]] = []
    monkeypatch.setattr(process.os, "execve", lambda *a: calls.append(a))
    monkeypatch.setenv("LD_PRELOAD", "/x/libfoo.so /usr/lib/libopenblas.so.0")
    monkeypatch.setenv(ENV_VAR, "1")
    process.drop_openblas_preload(["doctor"])
    assert calls == []
    monkeypatch.delenv(ENV_VAR)
    process.drop_openblas_preload(["doctor", "--json"])
    [(exe, argv, env)] = calls
    assert exe == sys.executable
    assert argv == [sys.executable, "-m", "sway_common.app.cli", "doctor", "--json"]
    assert env["LD_PRELOAD"] == "/x/libfoo.so"
    monkeypatch.setenv("LD_PRELOAD", "/x/libfoo.so")
    process.drop_openblas_preload(["doctor"])
    assert len(calls) == 1


def test_torch_is_hidden_unless_the_switch_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    # A copy of sys.modules stands in for the process's, so nothing leaks out of the test.
    modules = {k: v for k, v in sys.modules.items() if k not in ("torch", "transformers")}
    monkeypatch.setattr(sys, "modules", modules)
    monkeypatch.setenv(ENV_VAR, "1")
    assert process.keep_torch_out() is False
    assert "torch" not in modules
    monkeypatch.delenv(ENV_VAR)
    assert process.keep_torch_out() is True
    assert "torch" in modules and modules["torch"] is None
    modules["transformers"] = object()
    del modules["torch"]
    assert process.keep_torch_out() is False  # too late: transformers has looked already


# ------------------------------------------------------------------ CPU SwiGLU
@pytest.fixture(scope="module")
def mlx_backend(tiny_model_dir: Path, tiny_peft_adapter: Path):
    if not HAS_MLX:
        pytest.skip("needs mlx-lm")
    from sway_mlx.backend import MLXDifferentialBackend

    b = MLXDifferentialBackend(tiny_model_dir, tiny_peft_adapter, batch_size=4, dtype="float32")
    yield b
    b.close()


@pytest.mark.mlx
def test_cpu_swiglu_is_mlx_lms_to_float32_rounding() -> None:
    mx = pytest.importorskip("mlx.core")
    from mlx_lm.models import activations

    from sway_mlx.platform_fixes import cpu_swiglu

    swiglu = cpu_swiglu()
    assert cpu_swiglu() is swiglu  # one function per process: use_cpu_swiglu finds it again
    edges = [-100.0, -88.0, -87.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 87.0, 88.0, 100.0]
    gate = mx.concatenate([mx.random.normal((50_000,), key=mx.random.key(0)) * 8, mx.array(edges)])
    x = mx.random.normal(gate.shape, key=mx.random.key(1))
    want, got = activations.swiglu(gate, x), swiglu(gate, x)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)
    specials = mx.array([float("nan"), float("inf"), 5.0])
    assert np.isnan(np.array(swiglu(specials, mx.ones(3)))[0])
    assert np.array(swiglu(specials, mx.ones(3)))[1] == np.inf
    # Its derivative is silu's, so mlx-lm's trainer could run through it too.
    grads = [
        mx.grad(lambda g, v, f=f: f(g, v).sum(), argnums=(0, 1))(gate, x)
        for f in (swiglu, activations.swiglu)
    ]
    for got_grad, want_grad in zip(*grads, strict=True):
        np.testing.assert_allclose(np.array(got_grad), np.array(want_grad), rtol=1e-4, atol=1e-5)


@pytest.mark.mlx
def test_the_backend_runs_the_cpu_swiglu_on_the_cpu_only(mlx_backend) -> None:
    import mlx.core as mx

    from sway_mlx.platform_fixes import cpu_swiglu

    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    assert (
        sys.modules[type(_runtime(mlx_backend).model).__module__].swiglu is cpu_swiglu()
    ) == on_cpu


@pytest.mark.mlx
def test_the_switch_gives_the_model_mlx_lms_swiglu_back(
    mlx_backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlx.core as mx
    from mlx_lm.models import activations

    from sway_mlx.platform_fixes import cpu_swiglu, use_cpu_swiglu

    model = _runtime(mlx_backend).model
    module = sys.modules[type(model).__module__]
    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    ids = mx.array([[1, 5, 9, 2, 7, 3]])
    try:
        assert use_cpu_swiglu(model) == on_cpu
        fast = model(ids)
        monkeypatch.setenv(ENV_VAR, "1")
        assert use_cpu_swiglu(model) is False
        assert module.swiglu is activations.swiglu
        upstream = model(ids)
        # The whole model through either SwiGLU: the same logits to float32 rounding.
        np.testing.assert_allclose(np.array(fast), np.array(upstream), rtol=1e-4, atol=1e-4)
    finally:
        monkeypatch.delenv(ENV_VAR, raising=False)
        use_cpu_swiglu(model)  # as the backend left it, for the module's other tests
    assert (module.swiglu is cpu_swiglu()) == on_cpu


# -------------------------------------------------------- lean PEFT forward
@pytest.fixture(scope="module")
def hf_backend(tiny_model_dir: Path, tiny_peft_adapter: Path):
    if not HAS_HF:
        pytest.skip("needs torch and peft")
    from sway_hf.backend import HFDifferentialBackend

    b = HFDifferentialBackend(tiny_model_dir, tiny_peft_adapter, batch_size=3, **EXACT)
    yield b
    b.close()


@pytest.fixture()
def peft_model(tiny_model_dir: Path, tiny_peft_adapter: Path):
    """The tiny Llama with the tiny PEFT adapter, as PEFT itself loads it (no backend)."""
    if not HAS_HF:
        pytest.skip("needs torch and peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype="float32")
    return PeftModel.from_pretrained(base, tiny_peft_adapter).eval()


def _lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    adapter = model.active_adapter
    return [m for m in model.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]


@pytest.mark.hf
def test_lean_forward_is_pefts_in_base_ft_scaled_and_null_states(peft_model) -> None:
    """Per layer, and through the whole model, the lean forward gives PEFT's numbers
    whatever state PEFT's switch, ``scaling`` and factors are in."""
    import torch

    from sway_hf import platform_fixes

    adapter, layers = peft_model.active_adapter, _lora_layers(peft_model)
    assert len(layers) == 4  # q_proj and v_proj of both layers
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([[1, 5, 9, 2, 7, 3], [4, 4, 8, 1, 0, 2]])

    def base() -> None:
        for layer in layers:
            layer.enable_adapters(False)

    def scaled() -> None:
        for layer in layers:
            layer.enable_adapters(True)
            layer.scaling[adapter] *= 0.5

    def null() -> None:  # the factors' data pointed at other tensors, as a null view does
        for layer in layers:
            for p in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight):
                p.data = torch.randn(p.shape, generator=gen) * 0.1

    with torch.no_grad():
        for name, change in (("ft", lambda: None), ("base", base), ("λ", scaled), ("null", null)):
            change()
            for layer in layers:
                lean = platform_fixes.lean_forward(layer, adapter)
                assert lean is not None
                x = torch.randn(2, 5, layer.in_features, generator=gen)
                want = type(layer).forward(layer, x)
                torch.testing.assert_close(lean(x), want, rtol=1e-5, atol=1e-6, msg=name)
                moved = float((want - layer.get_base_layer()(x)).abs().max())
                assert (moved == 0.0) == (name == "base"), (name, moved)
            want = peft_model(ids).logits
            leans = [platform_fixes.install(layer, adapter) for layer in layers]
            assert all(
                layer.__dict__["forward"] is f for layer, f in zip(layers, leans, strict=True)
            )
            torch.testing.assert_close(peft_model(ids).logits, want, rtol=1e-5, atol=1e-5)
            for layer, lean in zip(layers, leans, strict=True):
                platform_fixes.uninstall(layer, lean)
                assert "forward" not in layer.__dict__


@pytest.mark.hf
def test_lean_forward_is_not_installed_with_the_switch(
    peft_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sway_hf import platform_fixes

    adapter, layers = peft_model.active_adapter, _lora_layers(peft_model)
    monkeypatch.setenv(ENV_VAR, "1")
    assert all(platform_fixes.install(layer, adapter) is None for layer in layers)
    assert all("forward" not in layer.__dict__ for layer in layers)


@pytest.mark.hf
def test_lean_lora_forward_is_pefts_in_every_view(hf_backend) -> None:
    """Each plain LoRA layer runs the lean forward, which reads PEFT's live switch,
    scaling and factors: in the base, ft, λ and null views it gives PEFT's numbers."""
    import torch

    backend, slots = hf_backend, _runtime(hf_backend).slots
    assert slots and all(s.layer.__dict__.get("forward") is s.lean for s in slots)
    gen = torch.Generator().manual_seed(0)
    views = {
        "base": backend.as_base,
        "ft": backend.as_finetuned,
        "λ=0.5": lambda: backend.as_scaled_adapter(0.5),
        "null": lambda: backend.as_null_adapter(3, mode="norm_matched"),
    }
    moved = {}
    for name, open_view in views.items():
        with open_view(), torch.no_grad():
            for slot in slots:
                x = torch.randn(2, 5, slot.a.shape[1], generator=gen)
                got = slot.layer(x)
                want = type(slot.layer).forward(slot.layer, x)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
                plain = slot.layer.get_base_layer()(x)
                moved[name] = max(moved.get(name, 0.0), float((got - plain).abs().max()))
    assert moved["base"] == 0.0
    assert min(moved["ft"], moved["λ=0.5"], moved["null"]) > 1e-4, moved


@pytest.mark.hf
def test_lean_forward_follows_the_adapter_and_skips_dora(
    tiny_model_dir: Path,
    tiny_peft_adapter: Path,
    tiny_mlx_adapter: Path,
    tiny_dora_adapter: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not HAS_HF:
        pytest.skip("needs torch and peft")
    from sway_hf.backend import HFDifferentialBackend

    with HFDifferentialBackend(tiny_model_dir, tiny_peft_adapter, **EXACT) as b:
        old = list(_runtime(b).slots)
        b.set_adapter(tiny_mlx_adapter)
        new = _runtime(b).slots
        assert all(s.layer.__dict__.get("forward") is s.lean for s in new)
        assert all(s.lean is not n.lean for s, n in zip(new, old, strict=True))
    with HFDifferentialBackend(tiny_model_dir, tiny_dora_adapter, **EXACT) as b:
        slots = _runtime(b).slots
        assert all(s.lean is None and "forward" not in s.layer.__dict__ for s in slots)
    monkeypatch.setenv(ENV_VAR, "1")
    with HFDifferentialBackend(tiny_model_dir, tiny_peft_adapter, **EXACT) as b:
        slots = _runtime(b).slots
        assert slots and all(s.lean is None and "forward" not in s.layer.__dict__ for s in slots)
