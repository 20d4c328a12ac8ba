"""The pytest plugin, as a user meets it: a test project in a temp dir, run by pytest.

The plugin is found through its ``pytest11`` entry point (nothing here loads it by name),
so these tests also check the packaging.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dummy_specs import PROMPTS, dummy_spec

import sway_common.app.platform as platform

pytest_plugins = ["pytester"]

PROBES = ("null_baseline", "doc", "shape")

# The trained dummy adapter moves the model some 20-30 times as much as its nulls do.
STRICT = ", min_effect_ratio: 1000"
REPORT_ONLY = "  - {name: doc_report_only, kind: delta_kl, gate: false, prompts: %s%s}\n"
SPECS = {
    "trained": dummy_spec("trained", shape_prompts=PROMPTS),
    "untrained": dummy_spec("untrained", shape_prompts=PROMPTS),
    "strict": dummy_spec("trained", shape_prompts=PROMPTS, doc_options=STRICT)
    + REPORT_ONLY % (json.dumps(list(PROMPTS)), STRICT),
}

TESTS = """
import pytest

@pytest.mark.sway_mlx(spec="specs/trained.yaml", threshold=0.6)
def test_trained(sway_result):
    assert sway_result.verdict.value == "PASS"

@pytest.mark.sway_mlx(spec="specs/strict.yaml")
def test_strict():
    pass

@pytest.mark.sway_mlx(spec="specs/untrained.yaml")
def test_untrained():
    pass

@pytest.mark.sway_mlx(spec="specs/trained.yaml", threshold=0.6)
def test_trained_again(sway_result):
    assert [p.name for p in sway_result.probes] == ["null_baseline", "doc", "shape"]

@pytest.mark.sway_mlx("specs/trained.yaml", threshold=1.0)
def test_trained_above_its_reach():
    pass
"""


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every backend the plugin builds, counted."""
    made: list[Any] = []
    real = platform.build_backend

    def counting(model: Any, *a: Any, **kw: Any) -> Any:
        made.append(model)
        return real(model, *a, **kw)

    monkeypatch.setattr(platform, "build_backend", counting)
    return made


def test_items_pass_and_fail_as_the_specs_do(pytester: pytest.Pytester, builds: list[Any]) -> None:
    specs = pytester.mkdir("specs")
    for name, text in SPECS.items():
        (specs / f"{name}.yaml").write_text(text)
    pytester.makepyfile(test_adapter=TESTS)
    result = pytester.runpytest("-v", "-rxs", "--strict-markers", "-p", "no:cacheprovider")
    outcomes = {
        line.split(" ")[0].split("::")[1]: line.split(" ")[1]
        for line in result.outlines
        if line.startswith("test_adapter.py::") and " " in line
    }

    def items(test: str, gate: str, **probes: str) -> dict[str, str]:
        out = {f"{test}[{name}]": probes.get(name, "PASSED") for name in PROBES}
        return {**out, f"{test}[sway-gate]": gate, test: "PASSED"}

    assert outcomes == {
        **items("test_trained", "PASSED"),
        **items("test_strict", "FAILED", doc="FAILED"),
        "test_strict[doc_report_only]": "XFAIL",
        **items("test_untrained", "FAILED", **dict.fromkeys(PROBES, "SKIPPED")),
        **items("test_trained_again", "PASSED"),
        **items("test_trained_above_its_reach", "FAILED"),
    }, result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    text = result.stdout.str()
    # A failure is the probe's own message, not a traceback into the plugin.
    assert "doc (delta_kl) FAIL: " in text and "theirs (needs 1000×)" in text
    assert "suite FAIL: gating doc failed" in text
    assert "suite FAIL: every gating probe passed, the composite did not" in text
    assert "suite FAIL: gating preflight failed" in text and "no-op" in text
    assert "XFAIL test_adapter.py::test_strict[doc_report_only] - non-gating" in text
    assert "SKIPPED [3] " in text and ": not run: the adapter is a no-op" in text
    assert "raise SwayFailure" not in text and "Traceback" not in text
    # One model per adapter preset, whatever the number of tests, specs and thresholds.
    assert sorted(m.adapter for m in builds) == ["trained", "untrained"]


def test_a_marker_without_its_spec_is_one_collection_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.sway_mlx(spec="missing.yaml")
        def test_adapter():
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*@pytest.mark.sway_mlx: no spec file at *missing.yaml*"])


def test_a_real_model_runs_once_for_two_tests(
    pytester: pytest.Pytester,
    builds: list[Any],
    tiny_model_dir: Path,
    tiny_mlx_adapter: Path,
    real_backend: str,
) -> None:
    """A spec on the tiny Llama and its trained adapter: items agree with the result."""
    spec = f"""
version: 1
models:
  ft: {{kind: {real_backend}, base: "{tiny_model_dir}", adapter: "{tiny_mlx_adapter}"}}
defaults: {{seed: 0}}
suite:
  - {{name: null_baseline, kind: null_adapter, runs: 3}}
  - {{name: doc, kind: delta_kl, prompts: ["The keeper said", "In the storm", "A ledger entry", "Tell me about the light"]}}
"""
    pytester.makefile(".yaml", sway=spec)
    out = pytester.path / "result.json"
    pytester.makepyfile(
        f"""
        import json
        import pytest

        @pytest.mark.sway_mlx(spec="sway.yaml")
        def test_adapter(sway_result):
            with open({str(out)!r}, "w") as f:
                json.dump(sway_result.to_dict(), f, default=str)

        @pytest.mark.sway_mlx(spec="sway.yaml")
        def test_same_suite(sway_result):
            assert json.load(open({str(out)!r}))["score"] == sway_result.score
        """
    )
    result = pytester.runpytest("-v", "-p", "no:cacheprovider")
    suite = json.loads(out.read_text())
    assert len(builds) == 1 and [p["name"] for p in suite["probes"]] == ["null_baseline", "doc"]
    for probe in suite["probes"]:
        gating_fail = probe["gating"] and probe["verdict"] in ("FAIL", "ERROR")
        want = "FAILED" if gating_fail else "PASSED"
        result.stdout.fnmatch_lines([f"*::test_adapter[[]{probe['name']}[]] {want}*"])
    gate = "FAILED" if suite["verdict"] in ("FAIL", "ERROR") else "PASSED"
    result.stdout.fnmatch_lines(
        [f"*::test_adapter[[]sway-gate[]] {gate}*", "*::test_same_suite PASSED*"]
    )


def test_the_plugin_loads_light() -> None:
    """It loads in every pytest session where sway-mlx is installed: nothing heavy until
    a sway item runs."""
    heavy = ("numpy", "click", "rich", "sway_common.suite", "sway_mlx", "torch")
    code = (
        "import sys, sway_common.app.pytest_plugin\n"
        f"print(' '.join(n for n in {heavy!r} if n in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == []
