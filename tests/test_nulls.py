"""The null recipe (sway_common.backend.nulls): seeds, orientation, variance, norm matching."""

from __future__ import annotations

import numpy as np
import pytest

from sway_common.adapters import LoraModule
from sway_common.backend import switch
from sway_common.backend.dummy import DummyDifferentialBackend
from sway_common.backend.nulls import NullSpec, module_seed, null_factors

RNG = np.random.default_rng(0)
MODULES = {
    "model.layers.0.self_attn.q_proj": LoraModule(
        a=RNG.normal(size=(4, 64)).astype(np.float32),
        b=RNG.normal(size=(64, 4)).astype(np.float32),
        scale=2.0,
    ),
    "model.layers.0.self_attn.v_proj": LoraModule(
        a=RNG.normal(size=(8, 64)).astype(np.float32),
        b=RNG.normal(size=(32, 8)).astype(np.float32),
        scale=0.5,
    ),
    "model.layers.1.mlp.down_proj": LoraModule(
        a=RNG.normal(size=(2, 128)).astype(np.float32),
        b=np.zeros((64, 2), np.float32),  # untrained: ΔW = 0
        scale=1.0,
    ),
}


def delta(module: LoraModule, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return module.scale * (b.astype(np.float64) @ a.astype(np.float64))


def test_module_seed_is_a_stable_content_hash() -> None:
    # Seeds come from a content hash of (seed, module path), not from salted hash():
    # pinned, so a seed means the same null in every process and every release.
    assert module_seed(11, "a") == module_seed(11, "a") != module_seed(11, "b")
    assert module_seed(11, "a") != module_seed(12, "a")
    assert module_seed(0, "model.layers.0.self_attn.q_proj") == 0x724FA8F010EA0BA4
    assert 0 <= module_seed(-1, "x") < 2**63


def test_draw_is_pinned() -> None:
    """numpy's PCG64 normals: if an upgrade changed them, old reports' nulls would change."""
    a, b = null_factors(MODULES, NullSpec(0))["model.layers.0.self_attn.q_proj"]
    assert float(a[0, 0]) == pytest.approx(-0.001417228253558278, rel=1e-6)
    assert float(b[0, 0]) == pytest.approx(0.015318094752728939, rel=1e-6)


def test_factors_have_the_real_shapes_in_peft_orientation() -> None:
    factors = null_factors(MODULES, NullSpec(3))
    assert list(factors) == sorted(MODULES)
    for path, (a, b) in factors.items():
        assert a.shape == MODULES[path].a.shape and b.shape == MODULES[path].b.shape
        assert a.dtype == np.float32 and b.dtype == np.float32


def test_a_module_draw_depends_on_its_path_only() -> None:
    """Adding or removing other modules leaves a module's draw unchanged."""
    path = "model.layers.0.self_attn.v_proj"
    alone = null_factors({path: MODULES[path]}, NullSpec(9))[path]
    together = null_factors(MODULES, NullSpec(9))[path]
    for x, y in zip(alone, together, strict=True):
        np.testing.assert_array_equal(x, y)
    other = null_factors(MODULES, NullSpec(10))[path]
    assert not np.allclose(alone[0], other[0])


def test_variance_is_linear_in_rank_scale() -> None:
    path = "model.layers.0.self_attn.q_proj"
    module = MODULES[path]
    var = {}
    for k in (1.0, 2.0, 4.0):
        a, b = null_factors(MODULES, NullSpec(5, rank_scale=k))[path]
        var[k] = float(delta(module, a, b).var())
        # Only B carries sqrt(rank_scale): A is the same draw at every rank_scale.
        np.testing.assert_array_equal(a, null_factors(MODULES, NullSpec(5))[path][0])
    assert var[2.0] / var[1.0] == pytest.approx(2.0, rel=1e-5)
    assert var[4.0] / var[1.0] == pytest.approx(4.0, rel=1e-5)
    # Var(ΔW) = scale² · r · σ_A² · σ_B².
    assert var[1.0] == pytest.approx(module.scale**2 * module.rank * 0.02**4, rel=0.2)


def test_norm_matched_has_each_real_norm_and_the_fixed_direction() -> None:
    fixed = null_factors(MODULES, NullSpec(7, mode="fixed"))
    matched = null_factors(MODULES, NullSpec(7, mode="norm_matched"))
    for path, module in MODULES.items():
        a, b = matched[path]
        np.testing.assert_array_equal(a, fixed[path][0])
        got = np.linalg.norm(delta(module, a, b))
        assert got == pytest.approx(module.frobenius_norm(), rel=1e-5, abs=1e-12)
    # An untrained module gets no noise.
    assert not np.any(matched["model.layers.1.mlp.down_proj"][1])


@pytest.mark.parametrize(
    ("kw", "word"),
    [
        ({"rank_scale": 0.0}, "rank_scale"),
        ({"rank_scale": -1.0}, "rank_scale"),
        ({"init_scale": 0.0}, "init_scale"),
        ({"mode": "bogus"}, "mode"),
    ],
)
def test_meaningless_nulls_are_refused(kw: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        NullSpec(0, **kw)
    with pytest.raises(ValueError, match=word), DummyDifferentialBackend().as_null_adapter(0, **kw):
        pass


def test_a_null_is_drawn_once_per_backend_and_the_draws_kept_are_bounded(monkeypatch) -> None:
    backend = DummyDifferentialBackend()
    draws: list[int] = []
    real = switch.null_factors

    def counting(modules, spec):
        draws.append(spec.seed)
        return real(modules, spec)

    monkeypatch.setattr(switch, "null_factors", counting)
    for _ in range(3):
        for seed in (1, 2):
            with backend.as_null_adapter(seed, mode="norm_matched"):
                pass
    assert draws == [1, 2]
    one = switch._nbytes(backend.switch._null_draws[next(iter(backend.switch._null_draws))])
    monkeypatch.setattr(switch, "NULL_DRAWS_KEPT_BYTES", one)
    with backend.as_null_adapter(3, mode="norm_matched"):
        pass
    assert len(backend.switch._null_draws) == 1 and draws == [1, 2, 3]
