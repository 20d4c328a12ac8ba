"""`sway-mlx sweep`: many adapters of one base, in one process or on a Ray cluster.

The Ray tests start one local cluster for the module (``ray.init(num_cpus=2)``) and
sweep six small adapters of the tiny Llama: the numbers must be those of the one-process
sweep, a worker killed mid-sweep must cost nothing but a retry, and the table must hold
every adapter. Ray is the ``ray`` extra, which `make install` installs: without it they fail.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from adapter_variants import b_scaled, random_at_norm
from click.testing import CliRunner

from sway_common.app.cli import app
from sway_common.app.sweep_worker import SweepJob, SweepWorker, adapter_names, run_local
from sway_common.report.sweep import sorted_rows
from sway_common.suite.spec import load_spec

PROMPTS = ["The keeper said", "In the storm the lamp", "A ledger entry", "The gallery at night"]
SPEC = """
version: 1
models:
  ft: {{kind: hf, base: {model}, adapter: {adapter}}}
defaults: {{seed: 0}}
suite:
  - {{name: null_baseline, kind: null_adapter, runs: 3}}
  - {{name: doc, kind: delta_kl, prompts: {prompts}}}
  - {{name: shape, kind: adapter_ablation, prompts: {prompts}}}
"""


@pytest.fixture(scope="module")
def six_adapters(tiny_peft_adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The trained adapter and five of its shape: random at its norm, and B scaled down."""
    root = tmp_path_factory.mktemp("sweep_adapters")
    made = [random_at_norm(tiny_peft_adapter, root / f"random{i}", seed=i) for i in range(3)]
    made += [b_scaled(tiny_peft_adapter, root / f"b_{f:g}", factor=f) for f in (1e-4, 0.5)]
    return [tiny_peft_adapter, *made]


@pytest.fixture(scope="module")
def spec_file(tiny_model_dir: Path, tiny_peft_adapter: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sweep_spec") / "sway.yaml"
    text = SPEC.format(model=tiny_model_dir, adapter=tiny_peft_adapter, prompts=json.dumps(PROMPTS))
    path.write_text(text)
    return path


def _sweep(args: list[str], cache: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("SWAY_MLX_NULL_CACHE", str(cache))
    return CliRunner().invoke(app, ["sweep", *args])


@pytest.fixture(scope="module")
def one_process(six_adapters, spec_file, tmp_path_factory) -> dict:
    """The sweep without Ray: one process, the base loaded once."""
    out = tmp_path_factory.mktemp("sweep_local")
    with pytest.MonkeyPatch.context() as mp:
        args = ["--spec", str(spec_file), *map(str, six_adapters), "--json", str(out / "s.json")]
        args += ["--markdown", str(out / "s.md"), "--reports", str(out / "reports")]
        result = _sweep(args, out / "nulls", mp)
    assert result.exit_code in (0, 1), result.output
    payload = json.loads((out / "s.json").read_text())
    payload["_dir"] = str(out)
    return payload


def _numbers(report: dict) -> dict[str, np.ndarray]:
    out = {}
    for p in report["probes"]:
        values = [p[k] for k in ("raw", "z", "effect_ratio", "score") if p.get(k) is not None]
        values += (p.get("null") or {}).get("values", [])
        out[p["name"]] = np.array(values, dtype=np.float64)
    return out


def _same_numbers(a: dict, b: dict) -> None:
    """Same verdicts; the same numbers to float32 rounding. (A worker's cached base-view
    rows were computed in batches with the adapters it evaluated before, which differ
    between one process and two workers: the last bits of a row may differ.)"""
    assert a["verdict"] == b["verdict"]
    assert [p["verdict"] for p in a["probes"]] == [p["verdict"] for p in b["probes"]]
    x, y = _numbers(a), _numbers(b)
    assert x.keys() == y.keys()
    for name in x:
        np.testing.assert_allclose(x[name], y[name], rtol=1e-5, atol=1e-9, err_msg=name)


def _reports(payload: dict) -> dict[str, dict]:
    return {e["name"]: e["report"] for e in payload["adapters"]}


# ------------------------------------------------------------------ one process
def test_the_one_process_sweep_writes_one_table_and_every_report(one_process, six_adapters):
    s = one_process["sweep"]
    assert s["engine"] == "local" and s["evaluated"] == 6 and s["base_loads"] == 1
    names = adapter_names([str(a) for a in six_adapters])
    assert sorted(_reports(one_process)) == sorted(names)
    # The table is sorted by verdict, then effect (largest first).
    rows = one_process["table"]["rows"]
    assert [r["name"] for r in rows] == [r.name for r in sorted_rows(one_process["adapters"])]
    order = {"PASS": 0, "WARN": 1, "FAIL": 2, "SKIP": 3, "ERROR": 4}
    keys = [(order[r["verdict"]], -(r["effect"] or 0.0)) for r in rows]
    assert keys == sorted(keys)
    assert one_process["table"]["probes"] == ["null_baseline", "doc", "shape"]
    # Each adapter's report is the one `eval --json` writes, also as its own files.
    out = Path(one_process["_dir"])
    for name, report in _reports(one_process).items():
        assert {"headline", "probes", "verdict", "score", "meta"} <= report.keys()
        assert json.loads((out / "reports" / f"{name}.json").read_text()) == report
        assert (out / "reports" / f"{name}.md").read_text().startswith("# sway-mlx:")
    markdown = (out / "s.md").read_text()
    assert all(f"[{n}](reports/{n}.md)" in markdown for n in names)


def test_the_sweep_gives_what_eval_gives(
    one_process, spec_file, six_adapters, tmp_path, monkeypatch
):
    """An adapter's entry is the report `eval` writes for it alone (null cache off)."""
    adapter = six_adapters[3]
    spec = tmp_path / "one.yaml"
    spec.write_text(spec_file.read_text().replace(str(six_adapters[0]), str(adapter)))
    result = CliRunner().invoke(
        app, ["eval", str(spec), "--no-cache", "--json", str(tmp_path / "e.json")]
    )
    assert result.exit_code in (0, 1), result.output
    alone = json.loads((tmp_path / "e.json").read_text())
    _same_numbers(alone, _reports(one_process)[adapter_names([str(a) for a in six_adapters])[3]])


# ------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    from ray import cloudpickle

    # The workers cannot import this test module: DyingWorker travels by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


VICTIM = "b_0.5"  # the last adapter: by then both workers hold a loaded base


class DyingWorker(SweepWorker):
    """Kills its own process the first time it loads ``VICTIM``, in the middle of that
    adapter's evaluation (a marker file beside the adapter says it happened): a worker
    lost mid-sweep, as to a crash or the OOM killer."""

    def _load(self, adapter: str) -> None:
        super()._load(adapter)
        marker = Path(adapter).parent / f".{VICTIM}.died"
        if Path(adapter).name == VICTIM and not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)


@pytest.fixture(scope="module")
def ray_sweep(ray_cluster, six_adapters, spec_file, tmp_path_factory) -> dict:
    """The same sweep on a local Ray cluster (two CPU workers, its own null cache), one of
    whose workers dies while evaluating an adapter."""
    out = tmp_path_factory.mktemp("sweep_ray")
    args = ["--spec", str(spec_file), *map(str, six_adapters), "--ray", "auto"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sway_common.app.sweep_ray.SweepWorker", DyingWorker)
        result = _sweep([*args, "--json", str(out / "s.json")], out / "nulls", mp)
    assert result.exit_code in (0, 1), result.output
    return json.loads((out / "s.json").read_text())


def test_a_ray_sweep_gives_the_one_process_numbers(ray_sweep, one_process) -> None:
    s = ray_sweep["sweep"]
    # Two workers (num_cpus=2), each loading the base once, pulling adapters from a queue.
    assert s["engine"] == "ray" and s["workers"] == 2 and s["base_loads"] >= 2
    assert len({e["worker"] for e in ray_sweep["adapters"]}) == 2
    ours, theirs = _reports(ray_sweep), _reports(one_process)
    assert ours.keys() == theirs.keys()
    for name in ours:
        _same_numbers(ours[name], theirs[name])
    assert [r["name"] for r in ray_sweep["table"]["rows"]] == [
        r["name"] for r in one_process["table"]["rows"]
    ]


def test_a_worker_killed_mid_sweep_costs_only_a_retry(ray_sweep, six_adapters) -> None:
    died = Path(six_adapters[-1]).parent / f".{VICTIM}.died"
    assert died.exists()  # a worker did die, while evaluating VICTIM
    entries = {e["name"]: e for e in ray_sweep["adapters"]}
    assert all(e["report"] is not None for e in entries.values())
    assert ray_sweep["sweep"]["retried"] == [VICTIM]
    assert {n: e["attempts"] for n, e in entries.items() if e["attempts"] != 1} == {VICTIM: 2}
    assert entries[VICTIM]["worker"].split(":")[1] != died.read_text()  # on another worker


def test_ray_missing_is_one_line_and_exit_2(six_adapters, spec_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    args = ["--spec", str(spec_file), *map(str, six_adapters[:2]), "--ray", "auto"]
    result = _sweep([*args, "--json", str(tmp_path / "s.json")], tmp_path / "n", monkeypatch)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pip install 'sway-mlx[ray]'" in lines[0], result.output
    assert not (tmp_path / "s.json").exists()


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give --model"),
        (["--model", "m", "--spec", "s.yaml", "--prompts", "p.txt"], "--prompts is for"),
        (["--model", "/no/such/model"], "does not exist"),
    ],
)
def test_bad_sweep_input_is_one_line(extra, message, six_adapters, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text("version: 1\n")
    (tmp_path / "p.txt").write_text("a prompt\n")
    result = CliRunner().invoke(app, ["sweep", str(six_adapters[0]), *extra])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and message in result.output


def test_adapter_names_are_short_and_unique() -> None:
    assert adapter_names(["runs/a/adapters", "runs/b/adapters"]) == ["a/adapters", "b/adapters"]
    assert adapter_names(["x/lr1", "y/lr2"]) == ["lr1", "lr2"]


def test_run_local_reports_an_adapter_that_fails_and_goes_on(
    tiny_model_dir, six_adapters, spec_file, tmp_path
) -> None:
    """A bad adapter is its entry's error; the next adapter still runs on the loaded base."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    spec = load_spec(spec_file)
    job = SweepJob(spec=spec, null_cache=None)
    entries: list[dict] = []
    paths = [str(six_adapters[0]), str(broken), str(six_adapters[1])]
    loads = run_local(job, paths, adapter_names(paths), lambda n: None, entries.append)
    assert loads == 1
    assert [e["report"] is not None for e in entries] == [True, False, True]
    assert entries[1]["error"] and entries[1]["name"] == "broken"


@pytest.mark.parametrize("mode", ["fixed", "norm_matched"])
def test_fixed_nulls_are_computed_once_per_adapter_shape(
    mode, tiny_model_dir, six_adapters, tmp_path, monkeypatch
) -> None:
    """A fixed-mode null depends on the adapter's shape only: the second adapter of one
    shape reads every null measurement from the cache (the same values); norm-matched
    nulls are scaled to each adapter's own norms, so each adapter computes its own."""
    from sway_common.null_cache import NullCache

    spec_path = tmp_path / "s.yaml"
    spec_path.write_text(
        SPEC.split("suite:")[0].format(model=tiny_model_dir, adapter=six_adapters[0], prompts="[]")
        + "suite:\n"
        + f"  - {{name: nulls, kind: null_adapter, runs: 2, mode: {mode}}}\n"
        + f"  - {{name: doc, kind: delta_kl, prompts: {json.dumps(PROMPTS[:3])}}}\n"
    )
    puts: list[str] = []
    real_put = NullCache.put
    monkeypatch.setattr(NullCache, "put", lambda self, k, v: (puts.append(k), real_put(self, k, v)))
    job = SweepJob(spec=load_spec(spec_path), null_cache=str(tmp_path / "nulls"))
    entries: list[dict] = []
    counts = []

    def done(entry: dict) -> None:
        entries.append(entry)
        counts.append(len(puts) - sum(counts))

    paths = [str(six_adapters[0]), str(six_adapters[1])]  # trained, and random at its norm
    run_local(job, paths, adapter_names(paths), lambda n: None, done)
    first, second = (e["report"]["probes"][1]["null"]["values"] for e in entries)
    assert counts[0] > 0
    if mode == "fixed":
        assert counts[1] == 0 and first == second
    else:
        assert counts[1] == counts[0] and first != second


def test_a_ray_address_nobody_answers_is_one_line(six_adapters, spec_file, tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--spec", str(spec_file), str(six_adapters[0]), "--ray", f"127.0.0.1:{port}"]
    result = _sweep(args, tmp_path / "n", monkeypatch)
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "nothing answers" in result.output
