"""Reports: strict JSON round trip, Markdown, JUnit, terminal, atomic writes."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from sway_common.report import (
    atomic_write,
    atomic_write_text,
    files,
    load_json,
    render_junit,
    render_markdown,
    render_terminal,
    write_json,
    write_junit,
    write_markdown,
)
from sway_common.suite.runner import overall_verdict
from sway_common.types import SCHEMA_VERSION, NullStats, ProbeResult, SuiteResult, Verdict


def _strict_loads(text: str):
    def reject(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=reject)


def finite_suite() -> SuiteResult:
    """Every verdict kind, Python values only, so a round trip must compare equal."""
    probes = [
        ProbeResult(
            name="delta_kl_next_token",
            kind="delta_kl",
            verdict=Verdict.PASS,
            score=0.97,
            raw=0.0123,
            z=6.14,
            p_value=0.011,
            effect_ratio=38.2,
            null=NullStats(mean=3.2e-4, std=5e-5, n=8, values=[3e-4, 3.5e-4]),
            message="38× a random adapter",
            evidence={"per_prompt": [0.01, 0.02], "top_k": 64, "nested": {"ok": True}},
            duration_s=1.25,
        ),
        ProbeResult(
            name="style_shift",
            kind="style_fingerprint",
            verdict=Verdict.WARN,
            category="attribution",
            raw=2.5e-6,
            z=None,
            message="degenerate null: no z",
            null=NullStats(mean=0.0, std=0.0, n=1, degenerate=True),
        ),
        ProbeResult(
            name="calibration | drift",
            kind="calibration_drift",
            verdict=Verdict.FAIL,
            category="calibration",
            score=0.1,
            raw=0.4,
            z=-2.0,
            effect_ratio=0.5,
            message="perplexity rose 40%\non held-out text",
            duration_s=0.5,
        ),
        ProbeResult(name="skipped_one", kind="leakage", verdict=Verdict.SKIP, message="no data"),
        ProbeResult(name="broken", kind="adapter_ablation", verdict=Verdict.ERROR, message="boom"),
    ]
    return SuiteResult(
        probes=probes,
        verdict=Verdict.FAIL,
        score=0.55,
        category_scores={"adherence": 0.97, "attribution": 0.5, "calibration": 0.1},
        threshold=0.6,
        meta={
            "backend": "dummy",
            "model": "SmolLM2-135M",
            "adapter": "/tmp/adapter",
            "seed": 0,
            "duration_s": 12.5,
        },
    )


def messy_suite() -> SuiteResult:
    """Non-finite floats and numpy values everywhere a probe might put them."""
    probe = ProbeResult(
        name="nan_probe",
        kind="delta_kl",
        verdict=Verdict.ERROR,
        raw=float("nan"),
        z=float("inf"),
        effect_ratio=float("-inf"),
        null=NullStats(mean=float("nan"), std=0.0, n=2, values=[1.0, float("nan")]),
        evidence={
            "arr": np.array([1.0, np.nan, np.inf]),
            "f32": np.float32(0.5),
            "f32_inf": np.float32(-np.inf),
            "i64": np.int64(7),
            "bool": np.bool_(True),
            "ints": np.arange(3, dtype=np.int32),
            "tuple": (1.5, float("nan")),
            "deep": {"list": [{"x": float("inf")}], np.int64(3): "numpy key"},
            "matrix": np.ones((2, 2), dtype=np.float16),
            "verdict": Verdict.PASS,
        },
    )
    return SuiteResult(
        probes=[probe],
        verdict=Verdict.ERROR,
        score=float("nan"),
        category_scores={"adherence": float("nan")},
        meta={"seed": np.int64(3), "duration_s": np.float64(1.5)},
    )


def empty_suite() -> SuiteResult:
    return SuiteResult(probes=[], verdict=Verdict.PASS, score=None)


# --------------------------------------------------------------------------- JSON


def test_json_round_trip_is_equal(tmp_path: Path):
    result = finite_suite()
    path = tmp_path / "out" / "result.json"  # parent created on demand
    write_json(result, path)
    loaded = load_json(path)
    assert loaded == result
    assert loaded.probes[0].null == result.probes[0].null
    assert loaded.schema_version == SCHEMA_VERSION


def test_json_is_strict_and_converts_numpy(tmp_path: Path):
    path = tmp_path / "result.json"
    write_json(messy_suite(), path)
    text = path.read_text(encoding="utf-8")
    data = _strict_loads(text)

    probe = data["probes"][0]
    assert probe["raw"] is None and probe["z"] is None and probe["effect_ratio"] is None
    assert probe["null"]["mean"] is None and probe["null"]["values"] == [1.0, None]
    ev = probe["evidence"]
    assert ev["arr"] == [1.0, None, None]
    assert ev["f32"] == 0.5 and ev["f32_inf"] is None
    assert ev["i64"] == 7 and isinstance(ev["i64"], int)
    assert ev["bool"] is True
    assert ev["ints"] == [0, 1, 2]
    assert ev["tuple"] == [1.5, None]
    assert ev["deep"] == {"list": [{"x": None}], "3": "numpy key"}
    assert ev["matrix"] == [[1.0, 1.0], [1.0, 1.0]]
    assert ev["verdict"] == "PASS"
    assert data["score"] is None and data["category_scores"] == {"adherence": None}
    assert data["meta"] == {"seed": 3, "duration_s": 1.5}

    loaded = load_json(path)
    assert loaded.verdict is Verdict.ERROR
    assert loaded.probes[0].raw is None
    assert loaded.probes[0].null is not None and loaded.probes[0].null.n == 2


def test_to_jsonable_leaves_input_untouched():
    evidence = {"arr": np.array([np.nan])}
    files.to_jsonable(evidence)
    assert isinstance(evidence["arr"], np.ndarray) and math.isnan(evidence["arr"][0])


def test_load_json_rejects_other_schema(tmp_path: Path):
    path = tmp_path / "r.json"
    data = finite_suite().to_dict()
    data["schema_version"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match="schema_version"):
        load_json(path)


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_text_replaces(tmp_path: Path):
    path = tmp_path / "a" / "b" / "x.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text(encoding="utf-8") == "two"
    assert [p.name for p in path.parent.iterdir()] == ["x.txt"]


def test_serialiser_failing_midway_keeps_previous_file(tmp_path: Path, monkeypatch):
    path = tmp_path / "result.json"
    write_json(finite_suite(), path)
    before = path.read_bytes()

    # A NaN deep in the payload makes the strict encoder raise after it has already
    # streamed part of the document into the temp file.
    real = files.to_jsonable
    streamed: list[int] = []

    def poisoned(obj):
        out = real(obj)
        if isinstance(out, dict) and "probes" in out:
            out["probes"][-1]["raw"] = float("nan")
        return out

    real_atomic = files.atomic_write

    def spying_atomic(p, write):
        def spy(f):
            try:
                write(f)
            finally:
                streamed.append(f.tell())

        real_atomic(p, spy)

    monkeypatch.setattr(files, "to_jsonable", poisoned)
    monkeypatch.setattr(files, "atomic_write", spying_atomic)
    with pytest.raises(ValueError):
        write_json(finite_suite(), path)

    assert streamed and streamed[0] > 0  # the failure really was mid-way
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_atomic_write_failure_without_previous_file_leaves_nothing(tmp_path: Path):
    path = tmp_path / "new.md"

    def half_then_raise(f):
        f.write("partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write(path, half_then_raise)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- Markdown


def test_markdown_contents(tmp_path: Path):
    result = finite_suite()
    text = render_markdown(result)
    assert text.startswith("# sway-mlx: FAIL")
    assert "composite 0.550 < threshold 0.600" in text
    for p in result.probes:
        row = next(line for line in text.splitlines() if p.kind in line and line.startswith("|"))
        assert f"**{p.verdict.value}**" in row
    assert "calibration \\| drift" in text  # pipes escaped, not splitting the row
    assert "40% on held-out text" in text  # newline folded into the row
    assert "38× null" in text and "+6.1σ" in text
    # Every probe row keeps the header's column count (escaped pipes are not separators).
    rows = [line for line in text.splitlines() if line.startswith("| ") and "**" in line]
    assert len(rows) == len(result.probes)
    assert {row.replace("\\|", "").count("|") for row in rows} == {8}
    assert "| attribution | 0.500 |" in text
    for fragment in ("Backend: `dummy`", "Model: `SmolLM2-135M`", "Seed: `0`", "12.50 s"):
        assert fragment in text

    path = tmp_path / "report.md"
    write_markdown(result, path)
    assert path.read_text(encoding="utf-8") == text


def test_markdown_handles_empty_and_missing_fields():
    text = render_markdown(empty_suite())
    assert "0 probes" in text and "composite — vs threshold" in text
    assert "## Run" not in text and "| Probe |" not in text
    messy = render_markdown(messy_suite())
    assert "nan_probe" in messy and "**ERROR**" in messy


# --------------------------------------------------------------------------- JUnit


def _parse_junit(xml: str) -> ET.Element:
    root = ET.fromstring(xml.encode("utf-8"))
    assert root.tag == "testsuite" and root.get("name") == "sway-mlx"
    return root


def test_junit_counts_and_elements(tmp_path: Path):
    result = finite_suite()
    path = tmp_path / "junit.xml"
    write_junit(result, path)
    root = ET.parse(path).getroot()
    assert root.tag == "testsuite"
    assert (root.get("tests"), root.get("failures"), root.get("errors"), root.get("skipped")) == (
        "5",
        "1",
        "1",
        "1",
    )
    assert root.get("time") == "12.500"  # run wall time, not just the probe sum

    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert set(cases) == {p.name for p in result.probes}
    assert cases["delta_kl_next_token"].get("classname") == "sway.adherence"
    assert cases["delta_kl_next_token"].get("time") == "1.250"
    assert cases["delta_kl_next_token"].find("failure") is None

    fail = cases["calibration | drift"].find("failure")
    assert fail is not None and fail.get("message", "").startswith("perplexity rose 40%")
    assert "z: -2.0σ" in (fail.text or "")
    err = cases["broken"].find("error")
    assert err is not None and err.get("message") == "boom"
    skip = cases["skipped_one"].find("skipped")
    assert skip is not None and skip.get("message") == "no data"
    warn = cases["style_shift"]
    assert warn.find("failure") is None and warn.find("error") is None
    out = warn.find("system-out")
    assert out is not None and "degenerate null" in (out.text or "")


def test_junit_suite_fail_without_failing_probe_is_not_green():
    result = SuiteResult(
        probes=[ProbeResult(name="weak", kind="delta_kl", verdict=Verdict.PASS, duration_s=0.2)],
        verdict=Verdict.FAIL,
        score=0.3,
        threshold=0.6,
    )
    root = _parse_junit(render_junit(result))
    assert root.get("tests") == "2" and root.get("failures") == "1"
    assert root.get("time") == "0.200"
    composite = next(c for c in root.iter("testcase") if c.get("name") == "composite")
    assert "0.300 < threshold 0.600" in composite.find("failure").get("message")


def test_junit_valid_with_hostile_text_and_non_finite_values():
    suite = messy_suite()
    suite.probes[0].message = 'ansi \x1b[31mred\x1b[0m <tag> & "quotes" \x00'
    suite.probes[0].evidence["big"] = list(range(5000))
    root = _parse_junit(render_junit(suite))
    assert root.get("errors") == "1"
    err = root.find("testcase/error")
    assert err is not None and "<tag> &" in err.get("message", "")
    assert "(truncated)" in (err.text or "")
    empty = _parse_junit(render_junit(empty_suite()))
    assert empty.get("tests") == "0" and list(empty) == []


# --------------------------------------------------------------------------- terminal


def _render(result: SuiteResult) -> str:
    console = Console(record=True, width=100, force_terminal=True, color_system="truecolor")
    render_terminal(result, console)
    return console.export_text(styles=False)


def test_terminal_shows_every_verdict():
    result = finite_suite()
    text = _render(result)
    for p in result.probes:
        assert p.verdict.value in text
    assert "delta_kl_next_token" in text
    assert "+6.1σ" in text and "38×" in text and "2.5e-06" in text
    assert "Overall: FAIL" in text and "composite 0.550 < threshold 0.600" in text
    assert "attribution 0.500" in text
    assert max(len(line) for line in text.splitlines()) <= 100


def test_the_overall_line_names_what_decided_it():
    def suite(*verdicts: Verdict, score: float = 0.75) -> SuiteResult:
        probes = [
            ProbeResult(name=f"p{i}", kind="delta_kl", verdict=v, gating=i < 2)
            for i, v in enumerate(verdicts)
        ]
        verdict = overall_verdict(probes, score, 0.5)
        return SuiteResult(probes=probes, verdict=verdict, score=score, threshold=0.5)

    # A gating FAIL decides although the composite clears its threshold.
    text = _render(suite(Verdict.PASS, Verdict.FAIL, Verdict.PASS))
    assert "Overall: FAIL  gating p1 failed · composite 0.750 ≥ threshold 0.500" in text
    text = _render(suite(Verdict.PASS, Verdict.PASS, Verdict.WARN))
    assert "Overall: WARN  every gating probe passed; p2 did not" in text
    text = _render(suite(Verdict.PASS, Verdict.PASS, score=0.25))
    assert "the composite did not · composite 0.250 < threshold 0.500" in text
    assert "every probe passed · composite" in _render(suite(Verdict.PASS, Verdict.PASS))


def test_terminal_colours_verdicts():
    console = Console(record=True, width=100, force_terminal=True, color_system="truecolor")
    render_terminal(finite_suite(), console)
    html = console.export_html(inline_styles=True)
    assert "color: #008000" in html  # PASS green
    assert "color: #800000" in html  # FAIL red


def test_terminal_none_fields_empty_suite_and_markup_in_names():
    text = _render(empty_suite())
    assert "No probes ran" in text and "Overall: PASS" in text and "composite —" in text

    odd = SuiteResult(
        probes=[
            ProbeResult(
                name="[bold]literal[/bold]", kind="k", verdict=Verdict.SKIP, message="[red]"
            )
        ],
        verdict=Verdict.PASS,
        score=None,
    )
    text = _render(odd)
    assert "[bold]literal[/bold]" in text and "[red]" in text and "—" in text
    assert "nan_probe" in _render(messy_suite())
