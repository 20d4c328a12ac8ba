"""A backend without an adapter (the export's side of export-check) and the no-op preflight.

Both real backends must behave the same: ``adapter_path=None`` gives the base view only,
and an adapter that changes nothing is one preflight FAIL before any probe.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from adapter_variants import edited_peft
from click.testing import CliRunner

from sway_common.app.cli import app
from sway_common.backend.dummy import DummyDifferentialBackend, DummyRuntime
from sway_common.backend.model_views import ModelViews
from sway_common.suite.runner import run_suite
from sway_common.suite.spec import quick_suite
from sway_common.types import Verdict

PROMPTS = ["The keeper said", "In the storm", "A ledger entry:"]


def _backend(kind: str, model: Path, adapter: Path | None):
    if kind == "mlx":
        from sway_mlx.backend import MLXDifferentialBackend

        return MLXDifferentialBackend(model, adapter, dtype="float32")
    from sway_hf.backend import HFDifferentialBackend

    return HFDifferentialBackend(model, adapter, dtype="float32", device="cpu")


def _zero_b(src: Path, dst: Path) -> Path:
    def edit(t: dict[str, np.ndarray]) -> None:
        for k in t:
            if "lora_B" in k:
                t[k] = np.zeros_like(t[k])

    return edited_peft(src, dst, edit)


@pytest.mark.parametrize("kind", ["mlx", "hf"])
def test_without_an_adapter_only_the_base_view_exists(
    kind: str, tiny_model_dir: Path, tiny_peft_adapter: Path
) -> None:
    plain = _backend(kind, tiny_model_dir, None)
    full = _backend(kind, tiny_model_dir, tiny_peft_adapter)
    try:
        assert plain.adapter_weights is None and plain.info["modules"] == 0
        with plain.as_base() as view:
            dist = view.next_token_dist(PROMPTS[0], top_k=16)
            assert isinstance(view.generate(PROMPTS[0], max_new_tokens=3), str)
        with full.as_base() as view:
            same = view.next_token_dist(PROMPTS[0], top_k=16)
        np.testing.assert_array_equal(dist.token_ids, same.token_ids)
        np.testing.assert_allclose(dist.logprobs, same.logprobs, atol=1e-5)
        for opener in (
            plain.as_finetuned,
            lambda: plain.as_scaled_adapter(0.5),
            lambda: plain.as_null_adapter(0),
        ):
            with pytest.raises(ValueError, match="no adapter is loaded"), opener():
                pass
        assert plain.preflight_finite_check()[0]
        assert plain.preflight_noop_check() == (True, "no adapter is loaded")
        peak = plain.peak_memory_bytes()
        assert peak is None or peak > 0
        plain.set_adapter(tiny_peft_adapter)  # an adapter can still come later
        with plain.as_finetuned() as view:
            view.next_token_dist(PROMPTS[0], top_k=16)
    finally:
        plain.close()
        full.close()


@pytest.mark.parametrize("kind", ["mlx", "hf"])
def test_a_zero_b_adapter_is_one_preflight_fail(
    kind: str, tiny_model_dir: Path, tiny_peft_adapter: Path, tmp_path: Path
) -> None:
    backend = _backend(kind, tiny_model_dir, _zero_b(tiny_peft_adapter, tmp_path / "zero"))
    try:
        result = run_suite(quick_suite(PROMPTS, runs=2), backend=backend)
    finally:
        backend.close()
    assert [(p.kind, p.verdict) for p in result.probes] == [("preflight", Verdict.FAIL)]
    assert "no-op" in result.probes[0].message and "4 modules" in result.probes[0].message
    assert result.verdict is Verdict.FAIL


def test_eval_of_a_zero_b_adapter_exits_one_naming_the_no_op(
    tiny_model_dir: Path, tiny_peft_adapter: Path, tmp_path: Path
) -> None:
    zero = _zero_b(tiny_peft_adapter, tmp_path / "zero")
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--adapter-path",
            str(zero),
            "--backend",
            "hf",
            "--runs",
            "2",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "the adapter is a no-op" in " ".join(result.output.split()[-40:])


class _Unreachable(DummyRuntime):
    """ΔW ≠ 0, but the base switch changes nothing: an adapter attached where it never acts."""

    def install_base(self):
        return lambda: None


def test_an_adapter_that_never_reaches_the_logits_is_a_no_op() -> None:
    ok, reason = ModelViews(_Unreachable()).preflight_noop_check()
    assert not ok and "bit for bit" in reason
    assert DummyDifferentialBackend().preflight_noop_check()[0]
