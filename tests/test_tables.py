"""benchmarks/tables.py: result files from several machines merge into one report."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

TABLES = Path(__file__).resolve().parents[1] / "benchmarks" / "tables.py"


@pytest.fixture(scope="module")
def tables() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_tables", TABLES)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def rec(backend: str, device: str, op: str, view: str, tokens_per_s: float, **kw: Any) -> dict:
    return {
        "backend": backend,
        "device": device,
        "dtype": "bfloat16",
        "op": op,
        "view": view,
        "batch": 8,
        "seq": 512,
        "tokens": 4096,
        "seconds": 4096 / tokens_per_s,
        "tokens_per_s": tokens_per_s,
        **kw,
    }


def write(path: Path, payload: dict) -> Path:
    path.write_text(json.dumps(payload))
    return path


@pytest.fixture
def results(tmp_path: Path) -> list[Path]:
    lp, nt = "logprob_of_batch", "next_token_dist_batch"
    gpu = {
        "label": "H100",
        "machine": "Linux x86_64",
        "shape": "llama-1b",
        "records": [
            rec("mlx", "Device(gpu, 0)", lp, "bare", 250_000.0, device_name="NVIDIA H100"),
            rec("mlx", "Device(gpu, 0)", lp, "base", 225_000.0, ratio_to_bare=0.9),
            rec("mlx", "Device(gpu, 0)", lp, "null", 200_000.0, ratio_to_bare=0.8),
            rec("hf", "cuda:0", nt, "base", 1500.0, peak_memory_bytes=3 * 2**30),
            rec("hf", "cuda:0", "next_token_dist_views", "stacked", 9000.0, ratio_to_bare=1.25),
        ],
    }
    # A file from before shapes, bare forwards and labels: SmolLM2 on a Mac.
    old = {
        "machine": "Darwin arm64",
        "argv": ["--batches", "8"],
        "records": [rec("mlx", "Device(gpu, 0)", lp, "ft", 950.0)],
    }
    anchor = {
        "machine": "Linux x86_64",
        "hf": {
            "median": {
                "anchor_cold": {"wall_s": 20.0, "probe_s": 4.0},
                "ours_cold": {"wall_s": 16.0, "probe_s": 1.0},
                "anchor_warm": {"wall_s": 18.0, "probe_s": 3.0},
                "ours_warm": {"wall_s": 15.0, "probe_s": 0.5},
            },
            "delta_kl_verdicts_agree": False,
        },
    }
    null_fpr = {"backend": "hf", "records": [{"name": "healthy", "verdicts": {}}]}
    return [
        write(tmp_path / "gpu.json", gpu),
        write(tmp_path / "mac-old.json", old),
        write(tmp_path / "anchor-cpu.json", anchor),
        write(tmp_path / "null_fpr.json", null_fpr),
    ]


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The body rows of the table under ``heading``, as lists of cells."""
    section = text.split(heading, 1)[1].split("###", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]


def test_runs_from_several_machines_merge_into_one_report(tables, results, tmp_path) -> None:
    md, png = tmp_path / "out.md", tmp_path / "out.png"
    tables.main([*map(str, results), "--md", str(md), "--png", str(png)])
    text = md.read_text()

    full = table_rows(text, "Full-sequence scoring")
    gpu = next(r for r in full if r[0] == "H100")
    assert gpu[1:5] == ["MLX-CUDA (NVIDIA H100)", "llama-1b", "bfloat16", "8×512"]
    # bare, base (share of bare), ft (not run), λ (not run), null
    assert gpu[5:10] == ["250k", "225k (90%)", "–", "–", "200k (80%)"]
    mac = next(r for r in full if r[0] == "mac-old")
    assert mac[1:3] == ["MLX-Metal", "smollm2-135m"]
    assert mac[7] == "950"

    nxt = table_rows(text, "Next-token scoring")
    hf = next(r for r in nxt if r[1] == "torch-CUDA")
    assert hf[6] == "1.5k" and hf[10] == "9.0k (125%)" and hf[11] == "3.0 GiB"

    anchor = table_rows(text, "dlm-sway")
    assert anchor == [
        [
            "anchor-cpu",
            "hf",
            "1.00 s vs 4.00 s (**4.0×**)",
            "0.50 s vs 3.00 s (**6.0×**)",
            "16.00 s vs 20.00 s (**1.2×**)",
            "15.00 s vs 18.00 s (**1.2×**)",
            "no",
        ]
    ]
    assert "null_fpr" not in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_printed_report_is_the_written_one(tables, results, tmp_path, capsys) -> None:
    md = tmp_path / "out.md"
    tables.main([str(results[2]), "--md", str(md), "--png", str(tmp_path / "unused.png")])
    assert capsys.readouterr().out == md.read_text()
    assert not (tmp_path / "unused.png").exists()  # no throughput run: no chart


DOCS = TABLES.parents[1] / "docs"


def test_the_docs_tables_are_what_the_committed_results_give(tables) -> None:
    """No figure typed by hand: every table block in docs/ regenerates unchanged."""
    blocks = 0
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        blocks += len(tables.BLOCK.findall(text))
        assert tables.render_docs(text) == text, (
            f"{page.name}: tables differ from benchmarks/results; run "
            "python benchmarks/tables.py --write-docs docs/benchmarks.md docs/statistics.md"
        )
    assert blocks >= 8  # anchor, throughput and false-positive tables


def test_write_docs_fills_the_blocks_and_keeps_the_prose(tables, results, tmp_path) -> None:
    doc = tmp_path / "bench.md"
    doc.write_text(
        "Intro kept.\n\n<!-- table: anchor anchor-cpu.json -->\nstale table\n"
        "<!-- table: end -->\n\nOutro kept.\n"
    )
    new = tables.render_docs(doc.read_text(), tmp_path)
    assert new.startswith("Intro kept.\n\n<!-- table: anchor anchor-cpu.json -->\n| run |")
    assert "stale table" not in new and new.endswith("<!-- table: end -->\n\nOutro kept.\n")
    assert "1.00 s vs 4.00 s (**4.0×**)" in new
    assert tables.render_docs(new, tmp_path) == new  # idempotent

    doc.write_text("<!-- table: speed anchor-cpu.json -->\n<!-- table: end -->\n")
    with pytest.raises(ValueError, match="unknown table kind 'speed'"):
        tables.render_docs(doc.read_text(), tmp_path)
    with pytest.raises(SystemExit, match="no <!-- table"):
        tables.write_docs([tmp_path / "mac-old.json"], tmp_path)


def test_false_positive_tables_count_passes_per_k_and_prompts(tables, tmp_path) -> None:
    summary = {
        "norm_matched@0.02 K=3 P=4": {"delta_kl:random": [1, 8], "adapter_ablation:random": [0, 8]},
        "norm_matched@0.02 K=3 P=8": {"delta_kl:random": [0, 8], "adapter_ablation:random": [2, 8]},
        "fixed@0.05 K=3 P=4": {"delta_kl_old_rule:random": [1, 2]},
    }
    records = [
        {
            "name": "healthy",
            "group": "trained",
            "verdicts": {"norm_matched@0.02|3|8": {"ratio": 47.8}},
        }
    ]
    payload = {"ks": [3], "prompts": [4, 8], "summary": summary, "records": records}
    write(tmp_path / "fpr.json", payload)
    text = tables.render_docs(
        "<!-- table: fpr fpr.json -->\n<!-- table: end -->\n"
        "<!-- table: fpr-fixed fpr.json -->\n<!-- table: end -->\n"
        "<!-- table: fpr-ratios fpr.json -->\n<!-- table: end -->\n",
        tmp_path,
    )
    rows = {
        line.split(" | ")[0].strip("| "): line
        for line in text.splitlines()
        if line.startswith("| ")
    }
    assert rows["random adapters passing `delta_kl`, 4 / 8 prompts"].endswith("| 1/8 · 0/8 |")
    # adapter_ablation is judged on 4 prompts whatever P: one count per K
    assert rows["random adapters passing `adapter_ablation` (4 prompts)"].endswith("| 0/8 |")
    assert rows["random adapters at init scale 0.05 passing, old rule"].endswith("| 1/2 · – |")
    assert rows["healthy"].endswith("| – · 48× |")
