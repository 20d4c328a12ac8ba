"""sway-mlx against dlm-sway 0.1.0 on the same spec, as users run both: cold and warm.

dlm-sway is installed into its own venv by this script (``--anchor-venv``; torch from
the local CPU wheel where pip finds it). One spec, one model, one PEFT adapter:
null_adapter (K nulls), delta_kl on P prompts, adapter_ablation on 4. Runs alternate
(anchor cold, ours cold, anchor warm, ours warm) ``--repeats`` times; "cold" is a first
run with an empty null-statistics cache, "warm" a second run with it (dlm-sway keeps one
too). Per run: the whole process (wall clock) and the probe phase (the sum of the probes'
own ``duration_s`` in each tool's JSON). Reports medians, the ratios anchor/ours, and
whether the two tools' verdicts agree.

    python benchmarks/suite_vs_anchor.py --backends hf,mlx --out benchmarks/results/anchor-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sway_common.app.demo import DemoAdapter, demo_prompts, ensure_adapter
from sway_common.models import cache_root, prepare_smollm2
from sway_common.probes.base import DEFAULT_PROMPTS

ANCHOR = "dlm-sway[hf]==0.1.0"
REPO = Path(__file__).resolve().parents[1]


RUN_ANCHOR = "import sys; from dlm_sway.cli.app import main; sys.exit(main())"


def ensure_anchor(venv: Path) -> list[str]:
    """A venv holding dlm-sway 0.1.0; returns the command that runs its CLI."""
    exe = venv / "bin" / "sway"
    if exe.exists():
        return [str(exe)]
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    if sys.platform.startswith("linux"):
        subprocess.run([*pip, "torch==2.13.0"], check=False)  # the CPU wheel, where one is on disk
    subprocess.run([*pip, ANCHOR], check=True)
    return [str(exe)]


def write_spec(
    path: Path, model_dir: Path, adapter: Path, runs: int, n_prompts: int, dtype: str
) -> None:
    prompts = (demo_prompts() + list(DEFAULT_PROMPTS))[:n_prompts]
    model = {"kind": "hf", "base": str(model_dir), "dtype": dtype}
    spec = {
        "version": 1,
        "models": {"base": model, "ft": {**model, "adapter": str(adapter)}},
        "defaults": {"seed": 0},
        "suite": [
            {"name": "null_baseline", "kind": "null_adapter", "runs": runs},
            {"name": "doc_divergence", "kind": "delta_kl", "prompts": prompts},
            {"name": "ablation", "kind": "adapter_ablation", "prompts": prompts[:4]},
        ],
    }
    path.write_text(json.dumps(spec, indent=1))


def timed(cmd: list[str], env: dict[str, str], out: Path) -> dict[str, Any]:
    """Run one tool; wall time, probe time and verdicts from its JSON."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if not out.exists():
        raise RuntimeError(
            f"{cmd[0]} wrote no JSON (exit {proc.returncode}): {proc.stderr[-2000:]}"
        )
    data = json.loads(out.read_text())
    probes = data.get("probes") or data.get("results") or []
    verdicts = {p["name"]: str(p.get("verdict")).upper().split(".")[-1] for p in probes}
    return {
        "wall_s": round(wall, 2),
        "probe_s": round(sum(p.get("duration_s") or 0.0 for p in probes), 2),
        "verdicts": verdicts,
        "exit": proc.returncode,
    }


def run_pair_series(
    args: argparse.Namespace, spec: Path, anchor: list[str], backend: str, work: Path
) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {
        k: [] for k in ("anchor_cold", "ours_cold", "anchor_warm", "ours_warm")
    }
    ours = [sys.executable, "-m", "sway_common.app.cli", "eval", str(spec), "--backend", backend]
    base_env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    base_env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
    )
    for i in range(args.repeats):
        anchor_cache, our_cache = work / f"anchor-{backend}-{i}", work / f"ours-{backend}-{i}"
        for phase in ("cold", "warm"):
            env = {**base_env, "XDG_CACHE_HOME": str(anchor_cache)}
            out = work / f"anchor-{backend}-{i}-{phase}.json"
            runs[f"anchor_{phase}"].append(
                timed([*anchor, "run", str(spec), "--json", str(out)], env, out)
            )
            env = {**base_env, "SWAY_MLX_NULL_CACHE": str(our_cache)}
            out = work / f"ours-{backend}-{i}-{phase}.json"
            runs[f"ours_{phase}"].append(timed([*ours, "--json", str(out)], env, out))
            print(
                f"{backend} repeat {i} {phase}: anchor {runs[f'anchor_{phase}'][-1]['wall_s']} s, "
                f"ours {runs[f'ours_{phase}'][-1]['wall_s']} s",
                flush=True,
            )
    med = {
        k: {m: statistics.median(r[m] for r in v) for m in ("wall_s", "probe_s")}
        for k, v in runs.items()
    }
    ratios = {
        f"{phase}_{m}": round(med[f"anchor_{phase}"][m] / med[f"ours_{phase}"][m], 2)
        for phase in ("cold", "warm")
        for m in ("probe_s", "wall_s")
        if med[f"ours_{phase}"][m] > 0
    }
    agree = runs["anchor_cold"][0]["verdicts"].get("doc_divergence") == runs["ours_cold"][0][
        "verdicts"
    ].get("doc_divergence")
    return {
        "runs": runs,
        "median": med,
        "anchor_over_ours": ratios,
        "delta_kl_verdicts_agree": agree,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="hf,mlx")
    ap.add_argument("--runs", type=int, default=8, help="null adapters (K)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--anchor-venv", type=Path, default=cache_root() / "bench" / "dlm-sway-venv")
    ap.add_argument(
        "--anchor-python", help="a python that imports dlm_sway already (no venv is made)"
    )
    ap.add_argument(
        "--dtype", default="fp32", help="the spec's dtype: fp32 on a CPU, auto for a GPU's bf16"
    )
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    anchor = (
        [args.anchor_python, "-c", RUN_ANCHOR]
        if args.anchor_python
        else ensure_anchor(args.anchor_venv)
    )
    model_dir = prepare_smollm2()
    from rich.console import Console

    adapter = ensure_adapter(
        "hf", DemoAdapter("trained", 16), model_dir, cache_root(), Console(stderr=True)
    )
    results: dict[str, Any] = {
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "k": args.runs,
        "prompts": args.prompts,
        "dtype": args.dtype,
    }
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "sway.yaml"
        write_spec(spec, model_dir, adapter, args.runs, args.prompts, args.dtype)
        for backend in args.backends.split(","):
            results[backend] = run_pair_series(args, spec, anchor, backend, Path(tmp))
    for backend in args.backends.split(","):
        r = results[backend]
        print(
            f"{backend}: anchor/ours "
            + ", ".join(f"{k} {v}×" for k, v in r["anchor_over_ours"].items())
            + f"; delta_kl verdicts agree: {r['delta_kl_verdicts_agree']}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
