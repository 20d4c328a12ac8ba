"""export-check on SmolLM2-135M: every export of docs/export-check.md's table, built and measured.

Offline, on the MLX backend (mlx-lm's quantized exports need it). Built once and kept
under ``<sway cache>/export-bench/`` (delete it to rebuild):

- a strong adapter, trained by mlx-lm on the float base with the demo's document and
  the recipe of the end-to-end tests (:data:`RECIPE`: r=8, scale 20, 16 steps), a light
  one: the same with B × ``LIGHT``, and a stronger one with B × ``STRONG`` (no training;
  issue 25's case: ≥ 0.5 nats mean JS from the base);
- a 4-bit base, ``mlx_lm convert -q``, the base of the QLoRA cases (the adapters were
  trained on the float base: a QLoRA adapter is built this way in seconds, not trained
  for many minutes on a CPU);
- the exports: ``mlx_lm fuse`` of the float base (fuse), that fuse converted to 4 and 8
  bits (``convert -q``), the same for the B × ``STRONG`` adapter, ``mlx_lm fuse
  --export-gguf`` (GGUF f16), the 4-bit base with
  each adapter fused re-quantized (mlx-lm's default) and with ``--dequantize``, and the
  base itself passed off as the export.

Each case runs ``sway-mlx export-check`` (with ``--json``) and ``--weights-only`` (timed)
in a fresh process; the records go to ``benchmarks/results/export_check.json``.
``--table`` writes the Markdown table from that file into ``docs/export-check.md``
between its markers. Thread limits are the caller's (``OMP_NUM_THREADS=1 ...``).

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/export_check.py
    .venv/bin/python benchmarks/export_check.py --table
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "export_check.json"
DOC = REPO / "docs" / "export-check.md"
BEGIN, END = "<!-- export-table:begin -->", "<!-- export-table:end -->"
LIGHT = 0.2
"""The light adapter's B, as a share of the trained one's."""
STRONG = 3.0
"""The stronger adapter's B, as a multiple of the trained one's."""
RECIPE = {
    "steps": 16,
    "rank": 8,
    "alpha": 160.0,
    "learning_rate": 6e-4,
    "num_layers": 8,
    "max_tokens": 128,
    "batch_size": 4,
}
"""The strong adapter's training (``sway_mlx.train.train_lora``), as tests/test_mlx_e2e.py's."""


@dataclass(frozen=True)
class Case:
    name: str
    label: str
    base: str
    """"float" or "q4": the base the adapter is live on."""
    adapter: str
    """"trained", "light" or "strong"."""
    export: str
    """A path relative to the bench dir, or "base" for the float base itself."""


CASES = [
    Case("fuse", "fuse", "float", "trained", "fuse"),
    Case("fuse-q4", "fuse, then convert -q (4-bit)", "float", "trained", "fuse-q4"),
    Case("fuse-q8", "fuse, then convert -q --q-bits 8", "float", "trained", "fuse-q8"),
    Case(
        "strong-fuse-q4",
        f"strong ×{STRONG:g}, fuse, then convert -q (4-bit)",
        "float",
        "strong",
        "s-fuse-q4",
    ),
    Case(
        "strong-fuse-q8",
        f"strong ×{STRONG:g}, fuse, then convert -q --q-bits 8",
        "float",
        "strong",
        "s-fuse-q8",
    ),
    Case("gguf", "fuse --export-gguf", "float", "trained", "gguf/ggml-model-f16.gguf"),
    Case("qlora-strong-requant", "QLoRA strong, fuse (re-quantized)", "q4", "trained", "q-strong"),
    Case("qlora-strong-deq", "QLoRA strong, fuse --dequantize", "q4", "trained", "q-strong-deq"),
    Case("qlora-light-requant", "QLoRA light, fuse (re-quantized)", "q4", "light", "q-light"),
    Case("qlora-light-deq", "QLoRA light, fuse --dequantize", "q4", "light", "q-light-deq"),
    Case("base", "the base passed off as the export", "float", "trained", "base"),
]


def _run(args: list[str], log: Path) -> tuple[int, float]:
    started = time.perf_counter()
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"\n$ {' '.join(args)}\n")
        out.flush()
        code = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    return code, time.perf_counter() - started


def _mlx_lm(log: Path, *args: str) -> None:
    code, _ = _run([sys.executable, "-m", "mlx_lm", *args], log)
    if code != 0:
        raise SystemExit(f"mlx_lm {args[0]} failed; see {log}")


def _scaled_copy(trained: Path, dst: Path, factor: float) -> Path:
    import numpy as np
    from safetensors.numpy import load_file, save_file

    if (dst / "adapters.safetensors").is_file():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy(trained / "adapter_config.json", tmp / "adapter_config.json")
    tensors = load_file(str(trained / "adapters.safetensors"))
    scaled = {k: v * np.float32(factor) if "lora_b" in k else v for k, v in tensors.items()}
    save_file(scaled, str(tmp / "adapters.safetensors"))
    tmp.rename(dst)
    return dst


def build(root: Path, log: Path) -> dict[str, Path]:
    """Model, adapters and exports, each built once (a finished one is kept)."""
    from sway_common.app.demo import demo_document, document_chunks
    from sway_common.models import normalize_config, prepare_smollm2
    from sway_mlx.train import train_lora

    model = prepare_smollm2()
    float_base = str(normalize_config(model))
    trained = root / "trained"
    if not (trained / "adapters.safetensors").is_file():
        print("training the strong adapter", file=sys.stderr, flush=True)
        train_lora(float_base, document_chunks(demo_document()), trained, **RECIPE)
    paths = {
        "float": model,
        "trained": trained,
        "light": _scaled_copy(trained, root / "light", LIGHT),
        "strong": _scaled_copy(trained, root / f"strong-x{STRONG:g}", STRONG),
    }
    strong = str(paths["strong"])
    steps: list[tuple[str, list[str]]] = [
        ("q4", ["convert", "--hf-path", float_base, "-q", "--q-bits", "4", "--mlx-path"]),
        ("fuse", ["fuse", "--model", float_base, "--adapter-path", str(trained), "--save-path"]),
        ("fuse-q4", ["convert", "--hf-path", str(root / "fuse"), "-q", "--mlx-path"]),
        (
            "fuse-q8",
            ["convert", "--hf-path", str(root / "fuse"), "-q", "--q-bits", "8", "--mlx-path"],
        ),
        ("s-fuse", ["fuse", "--model", float_base, "--adapter-path", strong, "--save-path"]),
        ("s-fuse-q4", ["convert", "--hf-path", str(root / "s-fuse"), "-q", "--mlx-path"]),
        (
            "s-fuse-q8",
            ["convert", "--hf-path", str(root / "s-fuse"), "-q", "--q-bits", "8", "--mlx-path"],
        ),
        (
            "gguf",
            [
                "fuse",
                "--model",
                float_base,
                "--adapter-path",
                str(trained),
                "--export-gguf",
                "--save-path",
            ],
        ),
    ]
    for kind in ("strong", "light"):
        adapter = str(trained if kind == "strong" else paths["light"])
        fuse = ["fuse", "--model", str(root / "q4"), "--adapter-path", adapter]
        steps.append((f"q-{kind}", [*fuse, "--save-path"]))
        steps.append((f"q-{kind}-deq", [*fuse, "--dequantize", "--save-path"]))
    for name, args in steps:
        dst = root / name
        if not (dst / "config.json").is_file():
            shutil.rmtree(dst, ignore_errors=True)
            print(f"building {name}", file=sys.stderr, flush=True)
            _mlx_lm(log, *args, str(dst))
        paths[name] = dst
    return paths


def _probe(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next((p for p in report["probes"] if p["name"] == name), {})


def _record(case: Case, report: dict[str, Any], code: int, seconds: float) -> dict[str, Any]:
    weights, effect = _probe(report, "weight_delta"), _probe(report, "adapter_effect")
    nt, comp, kl = (
        _probe(report, n) for n in ("export_next_token", "export_completion", "export_kl")
    )
    ev_w, ev_nt, ev_c, ev_kl = (p.get("evidence", {}) for p in (weights, nt, comp, kl))
    floor = ev_nt.get("noise_floor") or {}
    return {
        "case": case.name,
        "label": case.label,
        "verdict": report["verdict"],
        "exit": code,
        "seconds": round(seconds, 1),
        "headline": report["meta"].get("headline"),
        "weights": {
            k: ev_w.get(k)
            for k in (
                "retained",
                "cosine",
                "off_delta",
                "faithful",
                "floor",
                "floor_upper",
                "storage",
            )
        }
        | {"verdict": weights.get("verdict")},
        "adapter_effect_js": effect.get("raw"),
        "adapter_effect_ratio": effect.get("effect_ratio"),
        "next_token": {
            "verdict": nt.get("verdict"),
            "retention": nt.get("raw"),
            "interval": ev_nt.get("retention_interval"),
            "after_floor": ev_nt.get("retention_after_floor"),
            "floor_retention": floor.get("retention"),
            "floor_at": floor.get("at"),
            "residual": ev_nt.get("residual"),
            "js_export_ft": ev_nt.get("residual_raw"),
            "floor_mean": floor.get("mean"),
            "floor_upper": floor.get("upper"),
            "floor_missing": ev_nt.get("noise_floor_missing"),
        },
        "completion": {
            "verdict": comp.get("verdict"),
            "retention": comp.get("raw"),
            "uncorrected": ev_c.get("retention_uncorrected"),
        },
        "kl": {pair: (ev_kl.get(pair) or {}).get("pooled") for pair in ("ft_export", "ft_base")},
    }


def measure(case: Case, paths: dict[str, Path], root: Path, log: Path) -> dict[str, Any]:
    prompts = REPO / "sway_common" / "app" / "data" / "demo_prompts.txt"
    export = paths["float"] if case.export == "base" else root / case.export
    cli = [sys.executable, "-m", "sway_common.app.cli", "export-check", "--backend", "mlx"]
    cli += ["--model", str(paths[case.base]), "--adapter-path", str(paths[case.adapter])]
    cli += ["--export", str(export), "--prompts", str(prompts), "--no-cache"]
    out = root / "reports" / f"{case.name}.json"
    out.parent.mkdir(exist_ok=True)
    code, seconds = _run([*cli, "--json", str(out)], log)
    record = _record(case, json.loads(out.read_text(encoding="utf-8")), code, seconds)
    only = root / "reports" / f"{case.name}-weights.json"
    code, seconds = _run([*cli, "--weights-only", "--json", str(only)], log)
    report = json.loads(only.read_text(encoding="utf-8"))
    record["weights_only"] = {
        "verdict": report["verdict"],
        "exit": code,
        "seconds": round(seconds, 2),
        "in_process_s": report["meta"].get("duration_s"),
    }
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="*", help="case names (default: all)")
    parser.add_argument("--table", action="store_true", help="only write the table into the doc")
    opts = parser.parse_args()
    if opts.table:
        write_table()
        return
    from sway_common.models import cache_root

    root = cache_root() / "export-bench"
    root.mkdir(parents=True, exist_ok=True)
    log = root / "bench.log"
    paths = build(root, log)
    wanted = [c for c in CASES if not opts.cases or c.name in opts.cases]
    old = json.loads(RESULTS.read_text(encoding="utf-8")) if RESULTS.is_file() else {}
    records = {r["case"]: r for r in old.get("records", [])}
    for case in wanted:
        print(f"measuring {case.name}", file=sys.stderr, flush=True)
        records[case.name] = measure(case, paths, root, log)
        _save(records)
    write_table()


def _save(records: dict[str, dict[str, Any]]) -> None:
    import platform

    order = [c.name for c in CASES]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "model": "SmolLM2-135M-Instruct",
        "backend": "mlx (CPU)",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
        "light_b_share": LIGHT,
        "strong_b_multiple": STRONG,
        "records": sorted(records.values(), key=lambda r: order.index(r["case"])),
    }
    RESULTS.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.0%}"


def _span(interval: list[float] | None) -> str:
    if not interval or interval[0] == interval[1]:
        return ""
    return f"({interval[0]:.0%}..{interval[1]:.0%})"


def _after(nt: dict[str, Any]) -> str:
    """The retention as a share of what the floor's models read, where that differs."""
    after = nt.get("after_floor")
    return "" if after is None or _pct(after) == _pct(nt["retention"]) else f", {_pct(after)}"


def _g(x: float | None, spec: str = ".2g") -> str:
    return "—" if x is None else format(x, spec)


def table(data: dict[str, Any]) -> str:
    """The Markdown table, one row per case."""
    head = (
        "| export | verdict | weights: retained (own changes / noise floor, storage) | next "
        "tokens: retention (95% interval), after the floor | JS(F,E) / noise floor | completions: "
        "retention (uncorrected) | "
        "KL(F‖E) mean / p99 / max | same top token (base) | --weights-only |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in data["records"]:
        w, nt, c, kl, wo = (
            r["weights"],
            r["next_token"],
            r["completion"],
            r["kl"],
            r["weights_only"],
        )
        fe, fb = kl.get("ft_export") or {}, kl.get("ft_base") or {}
        floor = (
            "none" if nt["floor_missing"] else f"{_g(nt['floor_mean'])} (≤ {_g(nt['floor_upper'])})"
        )
        rows.append(
            f"| {r['label']} | {r['verdict']} | {_pct(w['retained'])} "
            f"({_g(w['off_delta'])}× / {_g(w['floor'])}×, {w['storage']}) "
            f"| {_pct(nt['retention'])} {_span(nt['interval'])}{_after(nt)} "
            f"| {_g(nt['js_export_ft'])} / {floor} "
            f"| {_pct(c['retention'])} ({_pct(c['uncorrected'])}) "
            f"| {_g(fe.get('mean'))} / {_g(fe.get('p99'))} / {_g(fe.get('max'))} "
            f"| {_pct(fe.get('top1'))} ({_pct(fb.get('top1'))}) "
            f"| {wo['verdict']}, {wo['seconds']:.1f} s |"
        )
    return head + "\n".join(rows) + "\n"


def write_table() -> None:
    data = json.loads(RESULTS.read_text(encoding="utf-8"))
    text = DOC.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC} has no {BEGIN} ... {END} markers")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:start] + "\n" + table(data) + text[end:], encoding="utf-8")


if __name__ == "__main__":
    main()
