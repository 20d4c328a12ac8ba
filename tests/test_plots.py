"""PNG plots: a real suite result from the dummy backend, and synthetic trajectories."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from sway_common.backend.dummy import DummyDifferentialBackend  # noqa: E402
from sway_common.report.plots import (  # noqa: E402
    plot_ablation,
    plot_trajectory,
    plot_z,
    write_plots,
)
from sway_common.suite.runner import run_suite  # noqa: E402
from sway_common.suite.spec import SuiteSpec, quick_suite  # noqa: E402
from sway_common.suite.trajectory import CheckpointRow  # noqa: E402
from sway_common.types import NullStats, ProbeResult, SuiteResult, Verdict  # noqa: E402

PROMPTS = ["The keeper said", "Tell me about the light", "In the storm", "A ledger entry:"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_bytes: int = 15_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > min_bytes, f"{path} is only {len(data)} bytes"
    assert not list(path.parent.glob(".*.tmp")), "a temp file was left behind"


@pytest.fixture(scope="module")
def suite_result() -> SuiteResult:
    return run_suite(quick_suite(PROMPTS, runs=4), backend=DummyDifferentialBackend())


def test_write_plots_for_a_real_suite_result(suite_result: SuiteResult, tmp_path: Path) -> None:
    written = write_plots(suite_result, tmp_path / "plots")
    assert [p.name for p in written] == ["sway-z.png", "sway-ablation.png"]
    for p in written:
        assert_png(p)


def test_plot_ablation_and_z_write_where_asked(suite_result: SuiteResult, tmp_path: Path) -> None:
    assert plot_ablation(suite_result, tmp_path / "a.png") == tmp_path / "a.png"
    assert plot_z(suite_result, tmp_path / "z.png", z_threshold=5.0) == tmp_path / "z.png"
    assert_png(tmp_path / "a.png")
    assert_png(tmp_path / "z.png")


def test_without_an_ablation_probe_only_the_z_plot(tmp_path: Path) -> None:
    spec = quick_suite(PROMPTS, runs=4)
    spec = SuiteSpec(
        probes=[c for c in spec.probes if c.kind != "adapter_ablation"], defaults=spec.defaults
    )
    result = run_suite(spec, backend=DummyDifferentialBackend())
    assert [p.name for p in write_plots(result, tmp_path)] == ["sway-z.png"]
    with pytest.raises(ValueError, match="adapter_ablation"):
        plot_ablation(result, tmp_path / "a.png")


def test_z_plot_with_huge_negative_and_missing_z(tmp_path: Path) -> None:
    result = SuiteResult(
        probes=[
            ProbeResult(
                "null_baseline", "null_adapter", Verdict.PASS, null=NullStats(0.01, 0.002, 8)
            ),
            ProbeResult("doc", "delta_kl", Verdict.PASS, raw=0.3, z=412.0),
            ProbeResult("neg", "delta_kl", Verdict.FAIL, raw=0.001, z=-2.7),
            ProbeResult("broken", "adapter_ablation", Verdict.ERROR, message="RuntimeError: boom"),
        ],
        verdict=Verdict.ERROR,
        score=None,
    )
    assert_png(plot_z(result, tmp_path / "z.png"))
    with pytest.raises(ValueError):
        plot_z(SuiteResult(probes=[], verdict=Verdict.WARN, score=None), tmp_path / "none.png")


def _rows() -> list[CheckpointRow]:
    spec = [
        (100, 0.004, 0.4, Verdict.FAIL),
        (200, 0.03, 8.5, Verdict.PASS),
        (300, 0.09, 260.0, Verdict.PASS),
        (400, None, None, Verdict.ERROR),
        (500, 0.05, 90.0, Verdict.PASS),
        (600, 0.08, 240.0, Verdict.PASS),
    ]
    return [
        CheckpointRow(
            step,
            f"step {step}",
            div,
            z,
            None if div is None else 0.006,
            None if div is None else 0.002,
            v,
            "msg",
        )
        for step, div, z, v in spec
    ]


def test_trajectory_plot(tmp_path: Path) -> None:
    assert_png(plot_trajectory(_rows(), tmp_path / "t.png"), min_bytes=30_000)


@pytest.mark.parametrize("which", ["one", "all-errors", "no-null"])
def test_trajectory_plot_edge_cases(tmp_path: Path, which: str) -> None:
    rows = _rows()
    if which == "one":
        rows = rows[:1]
    elif which == "all-errors":
        rows = [
            CheckpointRow(s, f"step {s}", None, None, None, None, Verdict.ERROR, "bad")
            for s in (1, 2)
        ]
    else:
        for r in rows:
            r.null_mean = r.null_std = None
    assert_png(plot_trajectory(rows, tmp_path / f"{which}.png"))


def test_trajectory_needs_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        plot_trajectory([], tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()
