"""`sway-mlx history`: the probes × runs matrix, the gate on the last run, bad input.

The runs are real `eval --json` reports of the analytic dummy backend (seconds, no
model); regressions are planted by editing a copy, as a later run would report them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from dummy_specs import write_dummy_spec

from sway_common.app.cli import app
from sway_common.suite.history import unique_labels


def _eval(tmp: Path, adapter: str) -> dict[str, Any]:
    spec = write_dummy_spec(tmp, adapter, shape_prompts=None)
    out = tmp / f"{adapter}.json"
    result = CliRunner().invoke(app, ["eval", str(spec), "--json", str(out)])
    assert result.exit_code in (0, 1), result.output
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("history_runs")
    return {name: _eval(tmp, name) for name in ("trained", "untrained")}


def _write(tmp: Path, name: str, report: dict[str, Any]) -> str:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(report))
    return str(path)


def _probe(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in report["probes"] if p["name"] == name)


def _history(*args: str):
    return CliRunner().invoke(app, ["history", *args])


def test_two_equal_runs_pass_and_show_the_matrix(tmp_path: Path, reports) -> None:
    good = reports["trained"]
    assert good["verdict"] == "PASS"
    md = tmp_path / "h.md"
    result = _history(
        _write(tmp_path, "r1", good), _write(tmp_path, "r2", good), "--markdown", str(md)
    )
    assert result.exit_code == 0, result.output
    assert "no regression (r2 vs r1)" in result.output
    assert "doc (gating)" in result.output and "null_baseline" in result.output
    text = md.read_text()
    assert text.startswith("# sway-mlx history: no regression")
    assert "| Probe | r1 | r2 | Δ last |" in text
    score = _probe(good, "doc")["score"]
    assert f"| doc (gating) | PASS {score:.3f} | PASS {score:.3f} | = |" in text


def test_a_planted_gating_failure_regresses(tmp_path: Path, reports) -> None:
    bad = copy.deepcopy(reports["trained"])
    _probe(bad, "doc")["verdict"] = "FAIL"
    md = tmp_path / "h.md"
    args = [_write(tmp_path, "r1", reports["trained"]), _write(tmp_path, "r2", bad)]
    result = _history(*args, "--markdown", str(md))
    assert result.exit_code == 1, result.output
    assert "REGRESSED (r2 vs r1): gating doc FAIL in r2 (PASS in r1)" in result.output
    assert "PASS→FAIL" in md.read_text()


def test_a_real_untrained_run_after_a_trained_one_regresses(tmp_path: Path, reports) -> None:
    args = [
        _write(tmp_path, "r1", reports["trained"]),
        _write(tmp_path, "r2", reports["untrained"]),
    ]
    result = _history(*args)
    assert result.exit_code == 1, result.output
    assert "gating preflight FAIL in r2 (not in r1)" in result.output


def test_a_score_drop_regresses_beyond_max_drop_only(tmp_path: Path, reports) -> None:
    lower = copy.deepcopy(reports["trained"])
    lower["score"] = reports["trained"]["score"] - 0.2
    args = [_write(tmp_path, "r1", reports["trained"]), _write(tmp_path, "r2", lower)]
    result = _history(*args)
    assert result.exit_code == 1, result.output
    assert "more than --max-drop 0.1" in result.output and "-0.200" in result.output
    result = _history(*args, "--max-drop", "0.25")
    assert result.exit_code == 0, result.output
    assert "within --max-drop 0.25" in result.output


def test_only_a_new_gating_failure_gates(tmp_path: Path, reports) -> None:
    """A non-gating FAIL is named, not gated; a FAIL already there the run before is not new."""
    noted = copy.deepcopy(reports["trained"])
    _probe(noted, "null_baseline")["verdict"] = "FAIL"
    result = _history(_write(tmp_path, "r1", reports["trained"]), _write(tmp_path, "r2", noted))
    assert result.exit_code == 0, result.output
    assert "null_baseline newly FAIL (not gating)" in result.output
    failing = copy.deepcopy(reports["trained"])
    _probe(failing, "doc")["verdict"] = "FAIL"
    runs = [
        _write(tmp_path, "r1", reports["trained"]),
        _write(tmp_path, "r2", failing),
        _write(tmp_path, "r3", failing),
    ]
    result = _history(*runs)
    assert result.exit_code == 0, result.output
    assert "doc still FAIL (as in r2)" in result.output


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def test_bad_inputs_exit_two_with_one_line_and_write_nothing(tmp_path: Path, reports) -> None:
    good = _write(tmp_path, "good", reports["trained"])
    md = tmp_path / "h.md"
    (tmp_path / "notjson.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"modules": []}))
    old = copy.deepcopy(reports["trained"])
    old["schema_version"] = 99
    renamed = copy.deepcopy(reports["trained"])
    for p in renamed["probes"]:
        p["name"] += "_x"
    moved = copy.deepcopy(reports["trained"])
    moved["meta"]["model"] = "/models/another-model"
    base = copy.deepcopy(reports["trained"])
    base["meta"]["model"] = "/models/smollm2"
    stopped = copy.deepcopy(reports["trained"])
    stopped["meta"]["interrupted"] = True
    cases = {
        "at least two runs": [good],
        "does not exist": [good, str(tmp_path / "missing.json")],
        "is not valid JSON": [good, str(tmp_path / "notjson.json")],
        "is not an eval --json report": [good, str(tmp_path / "other.json")],
        "schema_version": [good, _write(tmp_path, "old", old)],
        "share no probe": [good, _write(tmp_path, "renamed", renamed)],
        "one base model": [_write(tmp_path, "base", base), _write(tmp_path, "moved", moved)],
        "interrupted": [good, _write(tmp_path, "stopped", stopped)],
        "is a directory": [good, str(tmp_path)],
    }
    for words, args in cases.items():
        line = _one_error_line(_history(*args, "--markdown", str(md)))
        assert words in line, (words, line)
        assert not md.exists()
    line = _one_error_line(_history(good, good, "--markdown", str(tmp_path)))
    assert "--markdown" in line and "is a directory" in line
    line = _one_error_line(_history(good, good, "--max-drop", "-1"))
    assert "--max-drop" in line


def test_labels_are_the_file_stems_numbered_where_two_match() -> None:
    paths = [Path("a/r.json"), Path("b/r.json"), Path("c/s.json")]
    assert unique_labels(paths) == ["1:r", "2:r", "s"]
