"""weight_spectrum: the math against dense numpy SVDs, the nulls, both real backends on the
tiny Llama, and SmolLM2's trained adapter against random ones of its norm."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sway_common.adapters import read_adapter, write_peft_adapter
from sway_common.adapters.controls import random_like
from sway_common.adapters.weights import LoraModule
from sway_common.backend.dummy import DummyDifferentialBackend
from sway_common.backend.nulls import NullSpec, null_factors
from sway_common.null_cache import NullCache
from sway_common.probes import REGISTRY, NullCalibration, RunContext
from sway_common.probes.weight_spectrum import WeightSpectrumConfig
from sway_common.spectrum.figures import FigureOptions, against_nulls, null_figures
from sway_common.spectrum.svd import (
    FIGURES,
    lowrank_svd,
    module_figures,
    randomized_svd,
)
from sway_common.suite.spec import parse_spec, quick_suite
from sway_common.types import SuiteResult, Verdict
from sway_common.weight_reader import ModelWeights

SHAPE_FIGURES = ("stable_rank", "eff_rank", "rank90")


# ------------------------------------------------------------------ the math, dense
def _weight(rng: np.random.Generator, out: int, inn: int, decay: float = 6.0) -> np.ndarray:
    """A weight with a decaying spectrum (no two singular values tied)."""
    u, _ = np.linalg.qr(rng.standard_normal((out, out)))
    v, _ = np.linalg.qr(rng.standard_normal((inn, inn)))
    m = min(out, inn)
    return (u[:, :m] * (3.0 * np.exp(-np.arange(m) / decay))) @ v[:, :m].T


def _dense_figures(w: np.ndarray, delta: np.ndarray, k: int, top_n: int, cos: float) -> dict:
    """Every figure from dense SVDs: of ΔW, of W (its top k) and of W_k + ΔW."""
    s = np.linalg.svd(delta, compute_uv=False)
    s = s[: np.linalg.matrix_rank(delta)]
    uw, sw, vwt = np.linalg.svd(w)
    uk, vk = uw[:, :k], vwt[:k].T
    wk = (uk * sw[:k]) @ vk.T
    top = np.linalg.svd(wk + delta)[0][:, :top_n]
    p = s / s.sum()
    return {
        "rel_fro": np.linalg.norm(delta) / np.linalg.norm(w),
        "rel_spec": s[0] / sw[0],
        "stable_rank": (s**2).sum() / s[0] ** 2,
        "eff_rank": math.exp(-(p * np.log(p)).sum()),
        "rank90": float(np.argmax(np.cumsum(s**2) / (s**2).sum() >= 0.9 - 1e-12) + 1),
        "align_out": np.linalg.norm(uk.T @ delta) ** 2 / np.linalg.norm(delta) ** 2,
        "align_in": np.linalg.norm(delta @ vk) ** 2 / np.linalg.norm(delta) ** 2,
        "intruders": float((np.abs(uk.T @ top).max(axis=0) < cos).sum()),
    }


@pytest.mark.parametrize(("out", "inn", "r", "scale"), [(48, 40, 4, 0.7), (40, 56, 3, -2.0)])
def test_lowrank_svd_is_the_dense_svd(out: int, inn: int, r: int, scale: float) -> None:
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((r, inn)), rng.standard_normal((out, r))
    d = lowrank_svd(a, b, scale)
    dense = scale * b @ a
    np.testing.assert_allclose(d.s, np.linalg.svd(dense, compute_uv=False)[:r], rtol=1e-10)
    np.testing.assert_allclose((d.u * d.s) @ d.v.T, dense, atol=1e-10)
    np.testing.assert_allclose(d.u.T @ d.u, np.eye(r), atol=1e-12)


def test_lowrank_svd_of_rank_deficient_factors_is_still_the_dense_svd() -> None:
    """B with a repeated column and A with a zero row: the fast QR's Cholesky fails there
    and Householder QR takes over; the spectrum is ΔW's all the same."""
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((4, 30)), rng.standard_normal((40, 4))
    b[:, 3] = b[:, 0]
    a[2] = 0.0
    d = lowrank_svd(a, b, 1.5)
    dense = 1.5 * b @ a
    np.testing.assert_allclose(d.s[:2], np.linalg.svd(dense, compute_uv=False)[:2], rtol=1e-10)
    np.testing.assert_allclose((d.u * d.s) @ d.v.T, dense, atol=1e-10)


def test_randomized_svd_is_exact_when_the_sketch_covers_w_and_close_on_the_top_k() -> None:
    rng = np.random.default_rng(2)
    w = _weight(rng, 60, 50)
    exact = np.linalg.svd(w, compute_uv=False)
    full = randomized_svd(w, 50)
    np.testing.assert_allclose(full.s, exact, rtol=1e-4)
    assert full.fro == pytest.approx(np.linalg.norm(w), rel=1e-6)
    top = randomized_svd(w, 10, oversample=8, power_iters=2)
    np.testing.assert_allclose(top.s, exact[:10], rtol=1e-4)
    dense_u = np.linalg.svd(w)[0][:, :10]
    np.testing.assert_allclose(np.abs(np.sum(top.u * dense_u, axis=0)), 1.0, atol=1e-3)


@pytest.mark.parametrize("size", [0.02, 0.6, 3.0])
@pytest.mark.parametrize(("out", "inn", "k"), [(64, 48, 48), (48, 64, 20)])
def test_figures_match_dense_svds(size: float, out: int, inn: int, k: int) -> None:
    """Every figure, from factors and W's top-k SVD, equals its dense computation; the
    intruders are those of ``W_k + ΔW`` against ``W_k`` (k = 48 is all of W)."""
    rng = np.random.default_rng(3)
    w = _weight(rng, out, inn)
    a, b = rng.standard_normal((6, inn)), rng.standard_normal((out, 6)) * np.arange(1, 7)
    scale = size * np.linalg.norm(w) / np.linalg.norm(b @ a)
    delta = lowrank_svd(a, b, scale)
    base = randomized_svd(w, k, oversample=64)  # the sketch covers W: W's exact top k
    mine = module_figures(delta, base, top_n=10, cos=0.5)
    dense = _dense_figures(w, scale * b @ a, k, 10, 0.5)
    assert mine is not None and set(mine) == set(FIGURES)
    for fig in FIGURES:
        assert mine[fig] == pytest.approx(dense[fig], rel=1e-4, abs=1e-6), fig
    if size >= 3.0:  # not vacuous: an update this large makes intruders
        assert mine["intruders"] >= 1
    if size <= 0.02:
        assert mine["intruders"] == 0


def test_a_zero_update_has_no_figures() -> None:
    base = randomized_svd(_weight(np.random.default_rng(4), 20, 20), 8)
    zero = lowrank_svd(np.ones((2, 20)), np.zeros((20, 2)), 1.0)
    assert module_figures(zero, base) is None


# ------------------------------------------------------------------ the nulls
def test_null_figures_are_the_suites_null_draws_in_both_modes() -> None:
    """One draw, both modes: what null_factors draws in fixed and norm_matched mode."""
    rng = np.random.default_rng(5)
    modules = {
        f"model.layers.{i}.self_attn.q_proj": LoraModule(
            a=rng.standard_normal((4, 32)).astype(np.float32),
            b=rng.standard_normal((24, 4)).astype(np.float32),
            scale=2.0,
        )
        for i in range(3)
    }
    bases = {n: randomized_svd(_weight(rng, 24, 32), 16) for n in modules}
    opts = FigureOptions(top_n=5, cos=0.5)
    got = null_figures(modules, bases, NullSpec(seed=7), opts)
    for mode in ("fixed", "norm_matched"):
        drawn = null_factors(modules, NullSpec(seed=7, mode=mode))
        for name, (a, b) in drawn.items():
            want = module_figures(lowrank_svd(a, b, 2.0), bases[name], top_n=5, cos=0.5)
            assert want is not None
            for fig in FIGURES:
                assert got[mode][name][fig] == pytest.approx(want[fig], rel=1e-5), (mode, fig)
    first = next(iter(modules))
    draws = [null_figures(modules, bases, NullSpec(seed), opts) for seed in range(4)]
    compared = against_nulls(
        got["norm_matched"][first], {m: [d[m][first] for d in draws] for m in draws[0]}
    )
    assert compared["norm_matched"]["rel_fro"]["z"] is None  # fixed by the matching
    assert compared["fixed"]["rel_fro"]["z"] is not None
    assert compared["norm_matched"]["stable_rank"]["z"] is not None


# ------------------------------------------------------------------ real backends, tiny
def _run(backend, cache: Path | None = None, **cfg):
    config = WeightSpectrumConfig(name="weight_spectrum", kind="weight_spectrum", **cfg)
    ctx = RunContext(
        backend=backend,
        null=NullCalibration(runs=6),
        null_cache=NullCache(cache) if cache is not None else None,
    )
    return REGISTRY["weight_spectrum"]().run(config, ctx)


@pytest.fixture(scope="module")
def mlx_and_hf():
    from sway_hf.backend import HFDifferentialBackend
    from sway_mlx.backend import MLXDifferentialBackend

    return MLXDifferentialBackend, HFDifferentialBackend


def test_both_backends_give_the_same_figures_of_real_weights(
    mlx_and_hf, tiny_model_dir: Path, tiny_peft_adapter: Path
) -> None:
    results = []
    for cls in mlx_and_hf:
        with cls(tiny_model_dir, tiny_peft_adapter) as backend:
            results.append(_run(backend))
    for r in results:
        assert r.verdict is Verdict.PASS, r.message
        assert not r.gating and r.score is None and r.z is None
    mlx, hf = ([m["figures"] for m in r.evidence["modules"]] for r in results)
    assert mlx == hf and len(mlx) == 4
    # Tied to the files: ‖ΔW‖_F/‖W‖_F as dense numpy computes it from them.
    weights, base = read_adapter(tiny_peft_adapter), ModelWeights(tiny_model_dir)
    for row in results[0].evidence["modules"]:
        m = weights.modules[row["module"]]
        w, _ = base.module_weight(row["module"], m.shape)
        dense = np.linalg.norm(m.delta().astype(np.float64)) / np.linalg.norm(w)
        assert row["figures"]["rel_fro"] == pytest.approx(dense, rel=1e-5)


def test_base_spectra_and_nulls_are_cached_per_base(
    mlx_and_hf, tiny_model_dir: Path, tiny_mlx_adapter: Path, tmp_path: Path
) -> None:
    with mlx_and_hf[0](tiny_model_dir, tiny_mlx_adapter) as backend:
        cold = _run(backend, tmp_path)
        warm = _run(backend, tmp_path)
        files = sorted((tmp_path / "spectra").glob("*/*.npz"))
        assert cold.evidence["base_svds_computed"] == 4 and len(files) == 4
        assert warm.evidence["base_svds_computed"] == 0
        assert warm.evidence["modules"] == cold.evidence["modules"]
        files[0].write_bytes(b"not an npz")  # unreadable: drawn again and rewritten
        again = _run(backend, tmp_path)
        assert again.evidence["base_svds_computed"] == 1
        assert again.evidence["modules"] == cold.evidence["modules"]


def test_no_model_dir_is_a_skip_and_the_quick_suite_reports_it_without_gating() -> None:
    result = _run(DummyDifferentialBackend())
    assert result.verdict is Verdict.SKIP and "model dir" in result.message
    entry = [p for p in quick_suite(["a"]).probes if p.kind == "weight_spectrum"]
    assert len(entry) == 1 and REGISTRY["weight_spectrum"].gating is False


def test_spec_fields_are_checked() -> None:
    doc = {
        "version": 1,
        "models": {"ft": {"kind": "dummy", "base": "dummy", "adapter": "trained"}},
        "suite": [{"name": "ws", "kind": "weight_spectrum", "top_k": 8, "top_n": 16}],
    }
    with pytest.raises(ValueError, match="top_n: must be <= top_k"):
        parse_spec(doc)
    doc["suite"][0].update(top_n=4, runs=5)
    assert parse_spec(doc).probes[0].runs == 5


# ------------------------------------------------------------------ SmolLM2
@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """An MLX backend on SmolLM2 with the mlx-lm adapter every e2e test shares, the
    adapter, and a null cache of this module's own."""
    from test_mlx_e2e import smollm2_trained_adapter

    from sway_mlx.backend import MLXDifferentialBackend

    adapter = smollm2_trained_adapter(smollm2_dir, tmp_path_factory)
    backend = MLXDifferentialBackend(smollm2_dir, adapter)
    yield backend, adapter, tmp_path_factory.mktemp("spectrum_cache")
    backend.close()


@pytest.mark.slow
@pytest.mark.mlx
def test_a_trained_adapter_stands_apart_from_random_ones_of_its_norm(
    smollm2, tmp_path: Path
) -> None:
    backend, adapter, cache = smollm2
    trained = _run(backend, cache)
    warm = _run(backend, cache)
    random_dir = write_peft_adapter(random_like(read_adapter(adapter), seed=0), tmp_path / "rnd")
    backend.set_adapter(random_dir)
    try:
        control = _run(backend, cache)
    finally:
        backend.set_adapter(adapter)
    mine = trained.evidence["adapter"]["nulls"]["norm_matched"]
    theirs = control.evidence["adapter"]["nulls"]["norm_matched"]
    # Trained: lower-rank than any random update of its norm, far beyond the nulls' spread.
    assert mine["eff_rank"]["z"] <= -3 and mine["stable_rank"]["z"] <= -3
    assert "effective rank" in trained.message
    # A random adapter at the trained per-module norms is one more null draw.
    assert all(abs(theirs[f]["z"]) < 3 for f in SHAPE_FIGURES), theirs
    assert theirs["rel_fro"]["z"] is None  # norm matching fixes it
    assert warm.evidence["base_svds_computed"] == 0 and warm.duration_s < 2.0
    assert warm.evidence["seconds"] < 2.0


@pytest.mark.slow
@pytest.mark.mlx
def test_a_module_grown_tenfold_stands_out_and_the_heat_map_shows_it(
    smollm2, tmp_path: Path
) -> None:
    from sway_common.report.spectrum_plot import write_spectrum_plots

    backend, adapter, cache = smollm2
    planted = tmp_path / "planted"
    shutil.copytree(adapter, planted)
    tensors = load_file(str(planted / "adapters.safetensors"))
    key = next(k for k in sorted(tensors) if "layers.27.self_attn.v_proj.lora_b" in k)
    tensors[key] = tensors[key] * np.float32(10.0)
    save_file(tensors, str(planted / "adapters.safetensors"))
    backend.set_adapter(planted)
    try:
        result = _run(backend, cache)
    finally:
        backend.set_adapter(adapter)
    out = {o["module"]: o["reasons"] for o in result.evidence["standouts"]}
    grown = "model.layers.27.self_attn.v_proj"
    assert any(r.startswith("large update") for r in out.get(grown, [])), out
    assert not any(r.startswith("large update") for n, rs in out.items() if n != grown for r in rs)
    suite = SuiteResult(probes=[result], verdict=Verdict.PASS, score=None)
    (png,) = write_spectrum_plots(suite, tmp_path / "plots")
    assert png.name == "sway-spectrum.png" and png.read_bytes()[:4] == b"\x89PNG"
    json.dumps(result.evidence)  # the evidence is plain JSON
