"""The CLI through click's runner: reports, exit codes, errors before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner
from dummy_specs import dummy_spec, write_dummy_spec

import sway_common.backend.stacker as backend_stacker
from sway_common.app.cli import app
from sway_common.backend.stacker import Stacker
from sway_common.report import load_json


def _spec(tmp_path: Path, adapter: str = "trained") -> Path:
    return write_dummy_spec(tmp_path, adapter, runs=5)


def test_eval_writes_all_four_reports(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [
        "eval",
        str(_spec(tmp_path)),
        "--json",
        str(out / "r.json"),
        "--markdown",
        str(out / "r.md"),
        "--junit",
        str(out / "r.xml"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "delta_kl" in result.output
    suite = load_json(out / "r.json")
    assert [p.name for p in suite.probes] == ["null_baseline", "doc", "shape"]
    assert "| doc |" in (out / "r.md").read_text() or "doc" in (out / "r.md").read_text()
    root = ET.parse(out / "r.xml").getroot()
    assert root.get("failures") == "0" and len(root.findall(".//testcase")) == 3


def test_gate_exits_one_for_an_untrained_adapter(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["gate", str(_spec(tmp_path, "untrained"))])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("FAIL")


def test_nan_adapter_exits_two(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["eval", str(_spec(tmp_path, "nan")), "--json", str(out)])
    assert result.exit_code == 2
    assert [p.verdict.value for p in load_json(out).probes] == ["ERROR"]


def test_gate_threshold_overrides_the_spec(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["gate", str(_spec(tmp_path)), "--threshold", "1.0"])
    assert result.exit_code == 1


def test_spec_with_two_typos_exits_two_naming_both_without_loading(
    tmp_path: Path, monkeypatch
) -> None:
    import sway_common.app.platform as platform

    def forbidden(*a, **k):
        raise AssertionError("a backend was built for an invalid spec")

    monkeypatch.setattr(platform, "build_backend", forbidden)
    body = dummy_spec("trained", runs=5).replace("runs: 5", "rnus: 5")
    spec = tmp_path / "typos.yaml"
    spec.write_text(body.replace('prompts: ["The keeper', 'prompt: ["The keeper', 1))
    result = CliRunner().invoke(app, ["eval", str(spec)])
    assert result.exit_code == 2
    assert "rnus" in result.output and "did you mean 'runs'" in result.output
    assert "prompt:" not in result.output or "did you mean 'prompts'" in result.output


def test_missing_spec_and_bad_adapter_are_one_line_errors(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "cannot read" in result.output
    result = CliRunner().invoke(app, ["eval", str(_spec(tmp_path, "bogus"))])
    assert result.exit_code == 2 and "dummy adapter must be one of" in result.output


def test_list_probes_and_doctor() -> None:
    result = CliRunner().invoke(app, ["list-probes"])
    assert result.exit_code == 0
    for kind in ("delta_kl", "null_adapter", "adapter_ablation"):
        assert kind in result.output
    result = CliRunner().invoke(app, ["doctor", "--json"])
    report = json.loads(result.output)
    assert report["auto_picks"] in ("mlx", "hf") and "backends" in report


def test_help_teaches() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert "null" in result.output and "eval" in result.output and "gate" in result.output


@pytest.mark.parametrize(
    "module",
    ["sway_common", "sway_common.app.cli", "sway_common.suite.runner", "sway_common.suite.spec"],
)
def test_importing_sway_common_loads_neither_mlx_nor_torch(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "bad = [m for m in ('mlx', 'torch', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_eval_of_several_adapters_loads_the_base_once(
    tiny_model_dir: Path,
    tiny_peft_adapter: Path,
    tiny_dora_adapter: Path,
    tmp_path: Path,
    monkeypatch,
) -> None:
    import sway_common.app.run as run

    builds = []
    real_build = run.build_backend

    def counting(*a, **k):
        builds.append(a)
        return real_build(*a, **k)

    monkeypatch.setattr(run, "build_backend", counting)
    out = tmp_path / "r.json"
    args = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--adapter-path",
        str(tiny_peft_adapter),
        "--adapter-path",
        str(tiny_dora_adapter),
        "--runs",
        "3",
        "--backend",
        "hf",
        "--json",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code in (0, 1), result.output
    assert len(builds) == 1
    assert "base model loaded once" in result.output
    for adapter in (tiny_peft_adapter, tiny_dora_adapter):
        report = load_json(tmp_path / f"r-{adapter.name}.json")
        assert report.meta["adapter"].endswith(adapter.name) or adapter.name in json.dumps(
            report.meta
        )
    assert not out.exists()


def test_a_second_run_reads_the_nulls_from_the_cache(
    tiny_model_dir: Path, tiny_peft_adapter: Path, tmp_path: Path, monkeypatch
) -> None:
    from sway_common.null_cache import NullCache

    monkeypatch.setenv("SWAY_MLX_NULL_CACHE", str(tmp_path / "nulls"))
    computed = []  # a measurement is stored exactly when it was computed
    real_put = NullCache.put

    def counting(self, key, value):
        computed.append(key)
        return real_put(self, key, value)

    monkeypatch.setattr(NullCache, "put", counting)
    checks = []  # the shared-block check of the model is kept with the nulls
    real_check = Stacker.check_shared_block

    def counting_check(self, block):
        checks.append(block)
        return real_check(self, block)

    monkeypatch.setattr(Stacker, "check_shared_block", counting_check)
    # The tiny adapter starts at block 0, which is never shared: pretend it starts at 1
    # (the check then finds it wrong, and keeps that outcome).
    monkeypatch.setattr(backend_stacker, "first_adapted_block", lambda paths: "model.layers.1")
    args = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--adapter-path",
        str(tiny_peft_adapter),
        "--runs",
        "3",
        "--backend",
        "hf",
    ]
    outs, runs_checks = [], []
    for extra in ([], [], ["--no-cache"]):
        computed.clear()
        checks.clear()
        result = CliRunner().invoke(
            app, [*args, *extra, "--json", str(tmp_path / f"r{len(outs)}.json")]
        )
        assert result.exit_code in (0, 1), result.output
        outs.append((len(computed), load_json(tmp_path / f"r{len(outs)}.json")))
        runs_checks.append(len(checks))
    (first, a), (second, b), (bypassed, c) = outs
    assert runs_checks == [1, 0, 1]
    # Every null measurement of the second run comes from disk; --no-cache keeps no cache at all.
    assert first > 0 and second == 0 and bypassed == 0
    for p, q, r in zip(a.probes, b.probes, c.probes, strict=True):
        assert p.raw == q.raw == r.raw and p.z == q.z == r.z and p.verdict is q.verdict is r.verdict
    assert len(list((tmp_path / "nulls").rglob("*.json"))) == first


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path: Path) -> None:
    from sway_common.app.options import read_prompts

    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffA glimmer lasts\nThe keeper said\n".encode())
    assert read_prompts(str(path)) == ["A glimmer lasts", "The keeper said"]
