"""export-check: the retention geometry, the library on the dummy, the command on the tiny model.

On the tiny Llama, exports are built by merging the trained PEFT adapter into the model's
own weights with numpy (W + s·ΔW, saved as a model dir): s = 1 is a faithful merge, s = 0.5
a merge at the wrong scale, and the base itself passed off as an export is s = 0.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import fixtures_build
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

import sway_common.app.data
from sway_common.adapters import read_adapter
from sway_common.app.cli import app
from sway_common.backend.dummy import DummyDifferentialBackend
from sway_common.report import load_json
from sway_common.suite.export import check_export
from sway_common.suite.export_math import (
    ExportCriteria,
    logprob_retention,
    next_token_retention,
    what_happened,
)
from sway_common.suite.export_models import config_mismatch
from sway_common.types import ProbeResult, Verdict

PROMPTS_FILE = Path(sway_common.app.data.__file__).parent / "demo_prompts.txt"
DUMMY_PROMPTS = [
    "The keeper said",
    "Tell me about the light",
    "In the storm",
    "A ledger entry:",
    "Once upon a time",
    "The answer is",
]


# ------------------------------------------------------------------ geometry
def test_projection_is_one_at_the_fine_tune_zero_at_the_base_and_splits_the_residual() -> None:
    bf = [0.04, 0.1, 0.02]
    assert next_token_retention(bf, bf, [0, 0, 0]).retention == pytest.approx(1.0)
    assert next_token_retention(bf, [0, 0, 0], bf).retention == pytest.approx(0.0)
    # Points on a line in the Hilbert embedding: E at t along B→F, plus h² off the line.
    t, h2 = 0.5, 0.01
    be = [t * t * x + h2 for x in bf]
    ef = [(1 - t) ** 2 * x + h2 for x in bf]
    r = next_token_retention(bf, be, ef)
    assert r.retention == pytest.approx(t)
    assert r.lost + r.noise == pytest.approx(r.residual)
    assert r.noise == pytest.approx(3 * h2 / sum(bf))
    assert r.interval[0] <= r.retention <= r.interval[1]


def test_logprob_retention_is_the_share_of_the_gain_kept() -> None:
    r = logprob_retention([-10, -8], [-6, -4], [-8, -6])
    assert r.retention == pytest.approx(0.5) and r.residual == pytest.approx(0.5)
    with pytest.raises(ValueError, match="nothing to retain"):
        logprob_retention([-3.0], [-3.0], [-2.0])


def test_gains_that_cancel_out_have_no_retention_to_measure() -> None:
    """The adapter moves two completions by +2 and −1.8 nats (net +0.2); an export that
    keeps 90% of one and 105% of the other read −0.5 retention (a ratio of sums over a
    near-zero denominator). Now: no retention to measure, and the measure is skipped."""
    with pytest.raises(ValueError, match="cancel out"):
        logprob_retention([-10.0, -10.0], [-8.0, -11.8], [-8.2, -11.9])
    with pytest.raises(ValueError, match="cancel out"):  # a net loss: no gain to keep
        logprob_retention([-10.0, -10.0], [-11.0, -10.5], [-11.0, -10.5])


def test_the_retention_interval_never_divides_by_a_vanishing_effect() -> None:
    """Five completions gain 1 nat, one loses 2.5: resamples that draw the loser often have
    a net effect ≤ 0, and the old interval was (−4.5e12, 0.9). Such resamples have no
    retention to measure: when they are too many, the interval is unbounded (None in
    JSON), never a huge finite number."""
    base = [0.0] * 6
    ft = [1.0, 1.0, 1.0, 1.0, 1.0, -2.5]
    export = [0.9, 0.9, 0.9, 0.9, 0.9, -2.4]
    r = logprob_retention(base, ft, export)
    assert r.retention == pytest.approx(0.84)
    lo, hi = r.interval
    assert all(math.isinf(x) or -10 < x < 10 for x in (lo, hi)), r.interval
    assert lo <= r.retention <= hi
    steady = logprob_retention([0.0] * 5, [1.0, 1.2, 0.8, 1.1, 0.9], [0.9, 1.1, 0.7, 1.0, 0.8])
    assert all(math.isfinite(x) for x in steady.interval)
    assert steady.interval[0] <= steady.retention <= steady.interval[1]


@pytest.mark.parametrize(
    ("retention", "residual", "ok", "words"),
    [
        (
            0.12,
            0.8,
            False,
            "closer to the base than to the fine-tune: 12% of the adapter's effect survived",
        ),
        (0.6, 0.2, False, "lost part of the fine-tune: 60%"),
        (0.7, 0.6, False, "adds changes of its own 0.51× that effect: quantization noise?"),
        (1.9, 0.9, False, "overshoots the fine-tune: 190%"),
        (0.97, 1.4, False, "differs from the fine-tune by 1.40× that effect"),
        (0.98, 0.01, True, "keeps the fine-tune: 98%"),
    ],
)
def test_one_line_says_what_happened(retention, residual, ok, words) -> None:
    bf = [0.1]
    be = [retention * retention * 0.1]
    # Build the residual from lost effect plus noise so the numbers stay consistent.
    lost = (1 - retention) ** 2 * 0.1
    noise = max(residual * 0.1 - lost, 0.0)
    r = next_token_retention(bf, [be[0] + noise], [lost + noise])
    verdict, line = what_happened(r, ExportCriteria())
    assert (verdict is Verdict.PASS) is ok and words in line, line


def test_config_mismatch_names_the_field() -> None:
    base = {"model_type": "llama", "vocab_size": 384, "hidden_size": 64}
    assert config_mismatch(base, dict(base)) is None
    assert "vocab_size is 385" in config_mismatch(base, {**base, "vocab_size": 385})
    nested = {"model_type": "x", "text_config": {"hidden_size": 32}}
    assert "hidden_size" in config_mismatch(base, nested) or "model_type" in config_mismatch(
        base, nested
    )


# ------------------------------------------------------------------ library, dummy
class _Export:
    """A dummy whose adapter is the trained one scaled: a merge at ``strength``."""

    def __init__(self, strength: float) -> None:
        self.backend = DummyDifferentialBackend(adapter_strength=strength)
        self.strength = strength

    def as_base(self):
        return self.backend.as_finetuned() if self.strength else self.backend.as_base()


@pytest.mark.parametrize(
    ("strength", "verdict"),
    [(1.0, Verdict.PASS), (0.0, Verdict.FAIL), (0.5, Verdict.FAIL), (2.0, Verdict.FAIL)],
)
def test_dummy_exports(strength: float, verdict: Verdict) -> None:
    result = check_export(
        DummyDifferentialBackend(), _Export(strength), DUMMY_PROMPTS, runs=4, max_new_tokens=6
    )
    assert result.verdict is verdict, result.meta["headline"]
    names = [p.name for p in result.probes]
    assert names == ["adapter_effect", "export_next_token", "export_completion", "export_kl"]
    nt = result.probes[1]
    if strength == 0.5:
        assert 0.2 < nt.raw < 0.8
    elif strength == 1.0:
        assert nt.raw == pytest.approx(1.0) and result.meta["memory"]["peak_rss_bytes"] > 0


def test_a_failed_weight_check_is_said_and_warns_but_does_not_gate() -> None:
    weights = ProbeResult(
        name="weight_delta",
        kind="weight_delta",
        verdict=Verdict.FAIL,
        category="export",
        message="1 of 4 adapted modules lost their delta",
        gating=False,
    )
    result = check_export(
        DummyDifferentialBackend(),
        _Export(1.0),
        DUMMY_PROMPTS,
        runs=4,
        max_new_tokens=6,
        extra=[weights],
    )
    assert [p.name for p in result.probes][:2] == ["weight_delta", "adapter_effect"]
    assert result.verdict is Verdict.WARN
    assert result.meta["headline"].endswith("; but 1 of 4 adapted modules lost their delta")


def test_a_no_op_adapter_is_reported_before_anything_is_measured() -> None:
    result = check_export(
        DummyDifferentialBackend(adapter_strength=0.0), _Export(1.0), DUMMY_PROMPTS
    )
    assert [(p.kind, p.verdict) for p in result.probes] == [("preflight", Verdict.FAIL)]
    assert result.meta["headline"].startswith("the adapter is a no-op")


# ------------------------------------------------------------------ tiny model, CLI
def merged_copy(model_dir: Path, adapter_dir: Path, dst: Path, scale: float) -> Path:
    """``model_dir`` with ``scale`` × the adapter's ΔW added to each adapted weight."""
    shutil.copytree(model_dir, dst)
    weights = read_adapter(adapter_dir)
    for path in dst.glob("*.safetensors"):
        tensors = load_file(str(path))
        for name, module in weights.modules.items():
            key = f"{name}.weight"
            if key in tensors:
                w = tensors[key].astype(np.float32) + np.float32(scale) * module.delta()
                tensors[key] = w.astype(tensors[key].dtype)
        save_file(tensors, str(path), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def exports(tiny_model_dir: Path, tiny_peft_adapter: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {
        "faithful": merged_copy(tiny_model_dir, tiny_peft_adapter, root / "faithful", 1.0),
        "half": merged_copy(tiny_model_dir, tiny_peft_adapter, root / "half", 0.5),
        "base": tiny_model_dir,
    }


def _invoke(model: Path, adapter: Path, export: Path | str, *extra: str):
    args = [
        "export-check",
        "--model",
        str(model),
        "--adapter-path",
        str(adapter),
        "--export",
        str(export),
        "--prompts",
        str(PROMPTS_FILE),
        "--runs",
        "4",
        *extra,
    ]
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("backend", ["mlx", "hf"])
@pytest.mark.parametrize(("which", "code"), [("faithful", 0), ("base", 1), ("half", 1)])
def test_tiny_exports(
    which: str,
    code: int,
    backend: str,
    exports,
    tiny_model_dir: Path,
    tiny_peft_adapter: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "r.json"
    result = _invoke(
        tiny_model_dir, tiny_peft_adapter, exports[which], "--backend", backend, "--json", str(out)
    )
    assert result.exit_code == code, result.output
    report = load_json(out)
    probes = {p.name: p for p in report.probes}
    # The tiny random model's adapter barely beats its nulls (WARN, said, not gating).
    effect = probes["adapter_effect"]
    assert effect.verdict in (Verdict.PASS, Verdict.WARN), effect.message
    # The weight check runs first (printed before the forward pass), informative only.
    weights = probes["weight_delta"]
    assert report.probes[0].name == "weight_delta" and not weights.gating
    assert weights.raw == pytest.approx(
        {"faithful": 1.0, "base": 0.0, "half": 0.5}[which], abs=1e-4
    )
    assert result.output.index("weights: ") < result.output.index("adapter_effect")
    nt, comp = probes["export_next_token"], probes["export_completion"]
    assert "peak memory" in result.output and report.meta["memory"]["peak_rss_bytes"] > 0
    if which == "faithful":
        assert nt.raw == pytest.approx(1.0, abs=0.01) and nt.evidence["residual"] < 1e-3
        assert comp.verdict is Verdict.PASS and comp.raw == pytest.approx(1.0, abs=0.02)
    elif which == "base":
        assert abs(nt.raw) < 0.02 and nt.verdict is Verdict.FAIL
        tail = " ".join(result.output.split())
        assert (
            "the export is closer to the base than to the fine-tune: 0% of the adapter's effect survived"
            in tail
        )
    else:
        # Partial on both measures; bf16 on a GPU reads the completions' retention higher
        # (0.88 measured on an H100, 0.2-0.8 in float32 on a CPU).
        assert 0.3 < nt.raw < 0.7 and 0.2 < comp.raw < 0.95, (nt.raw, comp.raw)
        assert nt.verdict is Verdict.FAIL


def test_quiet_prints_one_line_and_reports_and_plots_are_written(
    exports, tiny_model_dir: Path, tiny_peft_adapter: Path, tmp_path: Path
) -> None:
    md, xml, plots = tmp_path / "r.md", tmp_path / "r.xml", tmp_path / "plots"
    result = _invoke(
        tiny_model_dir,
        tiny_peft_adapter,
        exports["faithful"],
        "--backend",
        "hf",
        "-q",
        "--markdown",
        str(md),
        "--junit",
        str(xml),
        "--plot",
        str(plots),
    )
    assert result.exit_code == 0, result.output
    # PASS, or WARN where the tiny model's adapter does not beat its nulls (said on the line).
    assert result.output.count("\n") == 1, result.output
    assert result.output.startswith(("PASS: the export keeps", "WARN: the export keeps"))
    assert "export_next_token" in md.read_text() and "export_completion" in xml.read_text()
    assert (plots / "sway-export.png").stat().st_size > 1000


def _bad_copy(src: Path, dst: Path, **config: object) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_bad_input_is_one_line_and_exit_two_before_any_model_loads(
    tiny_model_dir: Path, tiny_peft_adapter: Path, tmp_path: Path, monkeypatch
) -> None:
    import sway_common.app.run as run

    def forbidden(*a, **k):
        raise AssertionError("a model was loaded for bad input")

    monkeypatch.setattr(run, "build_backend", forbidden)
    empty = tmp_path / "empty"
    empty.mkdir()
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"x")
    cases = {
        tmp_path / "missing": "does not exist",
        empty: "not a model directory (no config.json)",
        not_gguf: "not a .gguf",
        _bad_copy(tiny_model_dir, tmp_path / "wide", hidden_size=128): "hidden_size is 128",
        _bad_copy(tiny_model_dir, tmp_path / "vocab", vocab_size=999): "vocab_size is 999",
    }
    for export, words in cases.items():
        result = _invoke(tiny_model_dir, tiny_peft_adapter, export, "--backend", "hf")
        assert result.exit_code == 2, (export, result.output)
        assert words in " ".join(result.output.split()), result.output
    quantized = _bad_copy(
        tiny_model_dir, tmp_path / "q4", quantization={"group_size": 64, "bits": 4}
    )
    result = _invoke(tiny_model_dir, tiny_peft_adapter, quantized, "--backend", "hf")
    assert result.exit_code == 2 and "--backend mlx" in result.output
    result = _invoke(tiny_model_dir, tiny_peft_adapter, tiny_model_dir, "--backend", "dummy")
    assert result.exit_code == 2 and "real models" in result.output
    pickled = _bad_copy(tiny_model_dir, tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")  # the name is checked
    result = _invoke(tiny_model_dir, tiny_peft_adapter, pickled, "--backend", "hf")
    assert result.exit_code == 2 and "--allow-pickle" in result.output, result.output
    nan = fixtures_build.nan_copy(tiny_peft_adapter, tmp_path / "nan")
    result = _invoke(tiny_model_dir, nan, tiny_model_dir, "--backend", "hf")
    assert result.exit_code == 2 and "NaN/Inf" in result.output, result.output
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "r.json"
    result = _invoke(tiny_model_dir, tiny_peft_adapter, tiny_model_dir, "--json", str(out))
    assert result.exit_code == 2 and "--json" in result.output, result.output


def test_safety_flags_reach_both_model_loads(
    tiny_model_dir: Path, tiny_peft_adapter: Path, monkeypatch
) -> None:
    import sway_common.app.run as run

    seen: list[dict] = []

    def capture(model: object, backend: str, **kw: object) -> None:
        seen.append({k: kw.get(k) for k in ("allow_pickle", "trust_remote_code")})
        raise OSError("stop here")

    monkeypatch.setattr(run, "build_backend", capture)
    flags = ("--backend", "hf", "--allow-pickle", "--trust-remote-code")
    result = _invoke(tiny_model_dir, tiny_peft_adapter, tiny_model_dir, *flags)
    assert result.exit_code == 2 and "stop here" in result.output
    assert seen == [{"allow_pickle": True, "trust_remote_code": True}]
