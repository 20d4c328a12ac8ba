"""Nothing lost, nothing different: Ctrl-C, concurrent caches, a probe that raises, seeds.

- A real SIGINT to a running `sway-mlx eval` leaves complete reports whose headline says
  the run was interrupted (no verdict), and exit 130.
- Two processes writing one null cache at once leave every entry readable.
- A probe that raises inside a null view leaves the real adapter in place, bit for bit,
  for the next probe (on both real backends).
- Two runs with one seed, in separate processes with different hash seeds, write the same
  numbers on CPU (both backends).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from sway_common.null_cache import NullCache
from sway_common.probes import REGISTRY, Probe, ProbeConfig, RunContext
from sway_common.report import load_json
from sway_common.suite.runner import run_suite
from sway_common.suite.spec import SuiteSpec
from sway_common.types import ProbeResult, Verdict

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [f"Note {i}: the keeper of the lighthouse wrote in the ledger that" for i in range(48)]


def _pythonpath() -> str:
    """The checkout first, then whatever the caller had (packages installed outside the venv)."""
    return os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))


def _cli(*args: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen[str]:
    """`sway-mlx ...` in a fresh process, from this checkout."""
    full_env = {**os.environ, "PYTHONPATH": _pythonpath(), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "sway_common.app.cli", *args],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


# ----------------------------------------------------------------------------- Ctrl-C
def test_sigint_leaves_complete_reports_that_say_interrupted(
    tiny_model_dir: Path, tiny_peft_adapter: Path, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:16]) + "\n", encoding="utf-8")
    nulls, out = tmp_path / "nulls", tmp_path / "out"
    proc = _cli(
        "eval",
        "--model",
        str(tiny_model_dir),
        "--adapter-path",
        str(tiny_peft_adapter),
        "--prompts",
        str(prompts),
        "--runs",
        "64",
        "--backend",
        "hf",
        "--json",
        str(out / "r.json"),
        "--markdown",
        str(out / "r.md"),
        "--junit",
        str(out / "r.xml"),
        env={"SWAY_MLX_NULL_CACHE": str(nulls)},
        # A shell starts a background job with SIGINT ignored, and Python then installs
        # no Ctrl-C handler: run as from a terminal even when the tests run in the background.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # The first null measurement on disk means the suite is running: interrupt it there.
    deadline = time.monotonic() + 180
    while not any(nulls.rglob("*.json")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never reached its null adapters"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr
    assert "interrupted" in stderr

    result = load_json(out / "r.json")
    raw = json.loads((out / "r.json").read_text(encoding="utf-8"))
    assert result.meta.get("interrupted") is True
    assert raw["headline"].startswith("interrupted after")
    assert "no verdict on the adapter" in raw["headline"]
    assert result.verdict is Verdict.ERROR
    assert any(p.message == "not run: interrupted" for p in result.probes)
    assert "no verdict on the adapter" in (out / "r.md").read_text(encoding="utf-8")
    junit = ET.parse(out / "r.xml").getroot()
    assert any("no verdict" in (e.get("message") or "") for e in junit.iter("error"))
    # Written whole or not at all: no temp file beside the reports.
    assert sorted(p.name for p in out.iterdir()) == ["r.json", "r.md", "r.xml"]
    assert "no verdict" in stdout  # the terminal headline too, never "indistinguishable"


# ------------------------------------------------------------------------ null cache
_WRITER = """
import sys
from sway_common.null_cache import NullCache
cache, me = NullCache(sys.argv[1]), int(sys.argv[2])
for round in range(40):
    for k in range(25):
        key = f"{k:02d}" + "ab" * 31
        cache.put(key, {"values": [me, round, k] * 50})
        got = cache.get(key)
        assert got is None or got["values"][2] == k, got
"""


def test_two_processes_writing_one_null_cache_leave_it_valid(tmp_path: Path) -> None:
    root = tmp_path / "nulls"
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(root), str(me)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for me in (1, 2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    entries = sorted(root.rglob("*"))
    files = [p for p in entries if p.is_file()]
    assert len(files) == 25 and all(p.suffix == ".json" for p in files), entries
    cache = NullCache(root)
    for k in range(25):
        value = cache.get(f"{k:02d}" + "ab" * 31)
        assert value is not None and value["values"][0] in (1, 2) and value["values"][2] == k


# ------------------------------------------------------------ a probe that raises
class _RaisesInsideANull(Probe):
    kind = "test_raises_inside_a_null"

    def run(self, cfg: Any, ctx: RunContext) -> ProbeResult:
        with ctx.backend.as_null_adapter(3, init_scale=0.5):
            raise RuntimeError("boom inside a null view")


class _RecordsTheFineTune(Probe):
    kind = "test_records_the_fine_tune"
    seen: list[np.ndarray] = []

    def run(self, cfg: Any, ctx: RunContext) -> ProbeResult:
        backend = ctx.backend
        with backend.as_finetuned():
            # The hook itself, not the result cache: what the weights compute right now.
            self.seen.append(
                backend.runtime.last_logprobs([backend.runtime.encode(PROMPTS[0])[0]])[0]
            )
        return self.result(cfg, Verdict.PASS)


@pytest.mark.parametrize("kind", ["hf", "mlx"])
def test_a_probe_that_raises_leaves_the_real_adapter_for_the_next(
    kind: str, tiny_model_dir: Path, tiny_peft_adapter: Path, monkeypatch
) -> None:
    from sway_common.app.platform import build_backend
    from sway_common.suite.spec import ModelSpec

    monkeypatch.setitem(REGISTRY, _RaisesInsideANull.kind, _RaisesInsideANull)
    monkeypatch.setitem(REGISTRY, _RecordsTheFineTune.kind, _RecordsTheFineTune)
    monkeypatch.setattr(_RecordsTheFineTune, "seen", [])
    model = ModelSpec(
        base=str(tiny_model_dir), adapter=str(tiny_peft_adapter), dtype="float32", device="cpu"
    )
    with build_backend(model, kind) as backend:
        spec = SuiteSpec(
            probes=[
                ProbeConfig(name="before", kind=_RecordsTheFineTune.kind),
                ProbeConfig(name="boom", kind=_RaisesInsideANull.kind),
                ProbeConfig(name="after", kind=_RecordsTheFineTune.kind),
            ]
        )
        result = run_suite(spec, backend=backend)
        assert backend.active_view is None
    verdicts = [(p.name, p.verdict) for p in result.probes if p.kind.startswith("test_")]
    assert verdicts == [("before", Verdict.PASS), ("boom", Verdict.ERROR), ("after", Verdict.PASS)]
    assert "boom inside a null view" in next(p for p in result.probes if p.name == "boom").message
    before, after = _RecordsTheFineTune.seen
    np.testing.assert_array_equal(before, after)


# ---------------------------------------------------------------------- determinism
# Fields that are about when and how long, not what was measured.
_CLOCK_FIELDS = {"duration_s", "started_at"}


def _numbers(report: Path) -> Any:
    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in _CLOCK_FIELDS}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip(json.loads(report.read_text(encoding="utf-8")))


@pytest.mark.parametrize("kind", ["hf", "mlx"])
def test_two_runs_with_one_seed_write_the_same_numbers(
    kind: str, tiny_model_dir: Path, tiny_peft_adapter: Path, tmp_path: Path
) -> None:
    prompts = PROMPTS[:4]
    spec = tmp_path / "sway.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "models": {
                    "ft": {
                        "base": str(tiny_model_dir),
                        "adapter": str(tiny_peft_adapter),
                        "dtype": "float32",
                        "device": "cpu",
                    }
                },
                "suite": [
                    {"name": "nulls", "kind": "null_adapter", "runs": 3},
                    {"name": "kl", "kind": "delta_kl", "prompts": prompts},
                    {"name": "abl", "kind": "adapter_ablation", "prompts": prompts},
                    {"name": "gk", "kind": "calibration_drift", "items_limit": 4},
                    {
                        "name": "prose",
                        "kind": "external_perplexity",
                        "max_chunks": 2,
                        "chunk_chars": 256,
                    },
                ],
            }
        )
    )
    # Different hash seeds: a seed derived from hash() would differ between the two.
    runs = [
        _cli(
            "eval",
            str(spec),
            "--backend",
            kind,
            "--seed",
            "7",
            "--no-cache",
            "--json",
            str(tmp_path / f"r{i}.json"),
            env={"PYTHONHASHSEED": str(i)},
        )
        for i in (1, 2)
    ]
    for proc in runs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode in (0, 1), out + err
    first, second = _numbers(tmp_path / "r1.json"), _numbers(tmp_path / "r2.json")
    assert first["meta"]["seed"] == 7
    assert [p["raw"] for p in first["probes"]] == [p["raw"] for p in second["probes"]]
    assert first == second
