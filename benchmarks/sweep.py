"""Sweep throughput: adapters per hour against the number of workers (1, 2, ... GPUs, or
CPU workers where there is no GPU), and a base spread over two GPUs against one.

Builds (once, in --work) a random-weight model of a real architecture and its random
r=8 LoRA (``bench_model.py``), then ``--adapters`` adapters of that shape (the LoRA's
factors redrawn per adapter, seeded), and a small suite (``null_adapter`` with --runs
nulls, ``delta_kl`` and ``adapter_ablation`` on --prompts prompts; ``--suite quick``: the
quick suite of ``eval --model`` on those prompts, which also checks general knowledge and
held-out prose, as a user's default sweep does). Each setting runs
``sway-mlx sweep`` as a user would, in its own process with a cold null cache:

- ``local``: no Ray, one process, the base loaded once;
- ``ray-N``: ``--ray local --workers N`` (a fresh local cluster per run), one worker per
  GPU (``--gpus-per-worker``) or, with no GPU, per CPU.

Per run: the wall clock of the whole command (Ray start, model loads, every adapter), the
sweep's own duration, adapters/hour on each, and the speed-up over one Ray worker. With
``--split``, one adapter is also evaluated with the base spread over every GPU
(``--max-memory``) and on one GPU; the record says whether the verdicts match and the
largest relative difference of any number.

    # this CPU (2 cores): plumbing and CPU workers
    OMP_NUM_THREADS=1 python benchmarks/sweep.py --shape tiny --adapters 6 --workers 1,2 \\
        --gpus-per-worker 0 --out benchmarks/results/sweep-cpu.json
    # two GPUs: 32 adapters of a Llama-3.2-1B-shape base, and the split check
    python benchmarks/sweep.py --shape llama-1b --adapters 32 --suite quick --prompts 32 \\
        --workers 1,2 --split --out $OUT/sweep-2gpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_model import SHAPES, WORDS, build_model
from safetensors.numpy import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The first ten of the benchmark model's tokenizer words.
PROMPT_WORDS = WORDS[:10]


def make_adapters(src: Path, root: Path, n: int) -> list[Path]:
    """``n`` adapters of ``src``'s shape, each with freshly drawn factors (seeded by index)."""
    out = []
    for i in range(n):
        dst = root / f"adapter{i:02d}"
        if not dst.exists():
            shutil.copytree(src, dst)
            weights = dst / "adapter_model.safetensors"
            tensors = load_file(str(weights))
            rng = np.random.default_rng(i)
            for key, value in tensors.items():
                std = 0.02 * (1 + i % 4) if "lora_B" in key else float(value.std()) or 0.02
                drawn = rng.standard_normal(value.shape) * std
                tensors[key] = drawn.astype(value.dtype)
            save_file(tensors, str(weights))
        out.append(dst)
    return out


def write_spec(path: Path, model: Path, adapter: Path, args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    prompts = [" ".join(rng.choice(PROMPT_WORDS, 12)) for _ in range(args.prompts)]
    spec = {
        "version": 1,
        "models": {"ft": {"kind": "hf", "base": str(model), "adapter": str(adapter)}},
        "defaults": {"seed": 0},
        "suite": [
            {"name": "nulls", "kind": "null_adapter", "runs": args.runs},
            {"name": "delta_kl", "kind": "delta_kl", "prompts": prompts},
            {"name": "ablation", "kind": "adapter_ablation", "prompts": prompts[:8]},
        ],
    }
    path.write_text(json.dumps(spec, indent=2))


def suite_flags(suite: str, spec: Path, model: Path, args: argparse.Namespace) -> list[str]:
    """``small``: the spec's three probes; ``quick``: the quick suite of `eval --model`
    (with its general-knowledge and held-out-prose checks) on the same prompts."""
    if suite == "small":
        return ["--spec", str(spec)]
    prompts = spec.with_name("prompts.txt")
    texts = json.loads(spec.read_text())["suite"][1]["prompts"]
    prompts.write_text("\n".join(texts) + "\n")
    return ["--model", str(model), "--prompts", str(prompts), "--runs", str(args.runs)]


def run_sweep(
    suite: list[str], adapters: list[Path], flags: list[str], work: Path, label: str
) -> dict[str, Any]:
    """One `sway-mlx sweep` in its own process, cold null cache; its timings."""
    out = work / f"{label}.json"
    cache = Path(tempfile.mkdtemp(prefix="sway-sweep-nulls-", dir=work))
    cmd = [sys.executable, "-m", "sway_common.app.cli", "sweep", *suite]
    cmd += [*map(str, adapters), *flags, "--json", str(out)]
    env = {**os.environ, "SWAY_MLX_NULL_CACHE": str(cache)}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    shutil.rmtree(cache, ignore_errors=True)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{label}: exit {done.returncode}\n{done.stderr[-2000:]}")
    payload = json.loads(out.read_text())
    s = payload["sweep"]
    n = s["evaluated"]
    record = {
        "label": label,
        "flags": flags,
        "adapters": n,
        "workers": s["workers"],
        "engine": s["engine"],
        "wall_s": round(wall, 3),
        "sweep_s": s["duration_s"],
        "adapters_per_hour_wall": round(n * 3600 / wall, 2),
        "adapters_per_hour_sweep": s["adapters_per_hour"],
        "base_loads": s["base_loads"],
        # Summed over adapters (a worker's first includes loading the base): wall minus
        # this over workers is the start-up (processes, Ray, imports).
        "adapter_seconds_sum": round(sum(e["seconds"] for e in payload["adapters"]), 3),
        "verdicts": {
            e["name"]: (e["report"] or {}).get("verdict", "ERROR") for e in payload["adapters"]
        },
    }
    print(
        f"{label:8} {n} adapters, {s['workers']} worker(s): wall {wall:7.1f} s "
        f"({record['adapters_per_hour_wall']:8.1f}/h), sweep {s['duration_s']:7.1f} s",
        flush=True,
    )
    return record


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def split_check(spec: Path, work: Path) -> dict[str, Any]:
    """The spec's adapter with the base on one GPU, then spread over every GPU by a
    --max-memory that no single GPU could meet: same verdicts, same numbers?"""
    n = gpu_count()
    model = Path(json.loads(spec.read_text())["models"]["ft"]["base"])
    size_gib = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**30  # bf16
    per_gpu = max(1, math.ceil(size_gib * 0.65))  # each GPU takes under two thirds of it
    memory = ",".join(f"{i}={per_gpu}GiB" for i in range(n))
    reports = {}
    for label, flags in (("one-gpu", []), ("split", ["--max-memory", memory])):
        out = work / f"{label}.json"
        cmd = [sys.executable, "-m", "sway_common.app.cli", "eval", str(spec), "--no-cache"]
        env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": "0"} if label == "one-gpu" else {})}
        done = subprocess.run(
            [*cmd, *flags, "--json", str(out)], env=env, capture_output=True, text=True
        )
        if done.returncode not in (0, 1):
            raise RuntimeError(f"{label}: exit {done.returncode}\n{done.stderr[-2000:]}")
        reports[label] = json.loads(out.read_text())
    a, b = reports["one-gpu"], reports["split"]
    worst = 0.0
    for p, q in zip(a["probes"], b["probes"], strict=True):
        for key in ("raw", "z", "effect_ratio"):
            if p.get(key) is not None and q.get(key) is not None:
                worst = max(worst, abs(p[key] - q[key]) / max(abs(p[key]), 1e-12))
    record = {
        "max_memory": memory,
        "devices_used": _devices_used(spec, memory),
        "same_verdicts": [p["verdict"] for p in a["probes"]] == [p["verdict"] for p in b["probes"]],
        "max_rel_diff": worst,
    }
    print(f"split over {n} GPUs ({memory}): {record}", flush=True)
    return record


def _devices_used(spec: Path, memory: str) -> list[str]:
    """Where accelerate put the base's blocks under ``memory`` (loaded once more, in here)."""
    from sway_common.suite.placement import parse_max_memory
    from sway_hf.backend import HFDifferentialBackend

    ft = json.loads(spec.read_text())["models"]["ft"]
    backend = HFDifferentialBackend(ft["base"], ft["adapter"], max_memory=parse_max_memory(memory))
    try:
        placed = getattr(backend.runtime._causal_lm, "hf_device_map", {}) or {}
        return sorted({str(d) for d in placed.values()})
    finally:
        backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--shape", default="tiny", choices=sorted(SHAPES))
    add("--adapters", type=int, default=6)
    add("--workers", default="1,2", type=lambda s: [int(x) for x in s.split(",")])
    add("--gpus-per-worker", type=float, default=None, help="default: 1 with GPUs, else 0")
    add("--suite", choices=("small", "quick"), default="small", help="what each adapter gets")
    add("--runs", type=int, default=8, help="null adapters per adapter")
    add("--prompts", type=int, default=16)
    add("--no-local", dest="local", action="store_false", help="skip the one-process run")
    add("--split", action="store_true", help="also: one adapter, base spread over all GPUs")
    add("--work", type=Path, default=Path("/tmp/sway-bench"))
    add("--label", help="names this run (default: from the device)")
    add("--out", type=Path, default=REPO / "benchmarks/results/sweep.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    gpus = gpu_count()
    per_worker = args.gpus_per_worker if args.gpus_per_worker is not None else float(gpus > 0)
    model, adapter = build_model(args.work, args.shape, device="cuda" if gpus else "cpu")
    work = args.work / args.shape / "sweep"
    work.mkdir(parents=True, exist_ok=True)
    adapters = make_adapters(adapter, work, args.adapters)
    spec = work / "sway.json"
    write_spec(spec, model, adapters[0], args)
    suite = suite_flags(args.suite, spec, model, args)
    records = [run_sweep(suite, adapters, [], work, "local")] if args.local else []
    for n in args.workers:
        flags = ["--ray", "local", "--workers", str(n), "--gpus-per-worker", f"{per_worker:g}"]
        records.append(run_sweep(suite, adapters, flags, work, f"ray-{n}"))
    one = next((r for r in records if r["label"] == "ray-1"), None)
    for r in records:
        r["speedup_wall_vs_ray1"] = one and round(one["wall_s"] / r["wall_s"], 3)
        r["speedup_sweep_vs_ray1"] = one and round(one["sweep_s"] / r["sweep_s"], 3)
    payload = {
        "benchmark": "sweep",
        "label": args.label,
        "machine": f"{platform.system()} {platform.machine()}",
        "cpus": os.cpu_count(),
        "gpus": gpus,
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "shape": args.shape,
        "suite": args.suite,
        "runs": args.runs,
        "prompts": args.prompts,
        "gpus_per_worker": per_worker,
        "argv": sys.argv[1:],
        "records": records,
        "split": split_check(spec, work) if args.split and gpus > 1 else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
