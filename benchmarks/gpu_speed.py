"""GPU speed where it matters: every view against the bare forward, and generation against
``model.generate``, at a Llama-3.2-1B shape and a Llama-3.1-8B shape (HF backend).

Per shape (random bf16 weights drawn on the GPU, a BPE tokenizer and a random r=8 LoRA on
q_proj/v_proj: ``bench_model.build_model(..., device="cuda")``, built once in --work):

1. scoring (``throughput.bench_backend``): the bare forward, then each view (base, ft, λ,
   null) of both hot paths, ``logprob_of_batch`` and ``next_token_dist_batch``, on
   --prompts texts of --seq tokens with --batch-size rows per forward; and the null
   calibration's base + K nulls one view at a time and stacked. Each record's
   ``ratio_to_bare`` is the bare forward's time for the same work over its time;
2. generation: greedy, --new tokens per prompt, ``generate_batch`` in the base and
   fine-tuned views against ``model.generate`` of the bare model (the same prompts, the
   same rows per call, the same stop tokens), tokens/s each.

The summary lists every ratio with the 0.9 bar of the performance targets. Everything goes
to one JSON file (``--out``, default ``$OUT/gpu_speed.json`` when $OUT is set).

    # on one H100 (about 5-8 minutes, most of it building and loading the 8B model)
    python benchmarks/gpu_speed.py
    # on this CPU, the plumbing only
    OMP_NUM_THREADS=1 python benchmarks/gpu_speed.py --shapes tiny --prompts 8 --seq 16 \\
        --batch-size 8 --new 4 --repeats 1 --nulls 2 --out /tmp/gpu_speed.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench_bare import device_name
from bench_model import SHAPES, build_model, texts_of_length
from throughput import VIEWS, bench_backend, make_backend, versions

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TARGET = 0.9


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _batches(rows: list[list[int]], size: int) -> list[list[list[int]]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _median_seconds(run: Any, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bare_generate(backend: Any, rows: list[list[int]], args: argparse.Namespace) -> tuple:
    """``model.generate`` of the adapter-less model, left-padded batches: (seconds, tokens)."""
    import torch

    from sway_common.backend.generation import cut_at_stop, stop_ids

    model = backend.runtime._causal_lm
    stops = stop_ids(backend.tokenizer, model.generation_config.eos_token_id)
    device = model.get_input_embeddings().weight.device
    pad = stops[0] if stops else 0
    counted: list[int] = []

    @torch.inference_mode()
    def run() -> None:
        counted.clear()
        for batch in _batches(rows, args.batch_size):
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(batch):
                ids[i, width - len(row) :] = torch.tensor(row)
                mask[i, width - len(row) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=args.new,
                do_sample=False,
                eos_token_id=stops or None,
                pad_token_id=pad,
            )
            counted.extend(len(cut_at_stop(r, stops)) for r in out[:, width:].tolist())

    seconds = _median_seconds(run, args.repeats)
    return seconds, sum(counted)


def ours_generate(backend: Any, view: str, texts: list[str], args: argparse.Namespace) -> tuple:
    """``generate_batch`` in ``view``: (seconds, tokens written)."""
    rows = [backend.runtime.encode(t)[0] for t in texts]
    opened = backend.as_base if view == "base" else backend.as_finetuned
    with opened() as handle:
        seconds = _median_seconds(
            lambda: handle.generate_batch(texts, max_new_tokens=args.new), args.repeats
        )
        written = backend.runtime.generate_tokens(rows, args.new, 0.0, None)
    return seconds, sum(len(r) for r in written)


def bench_generation(model_dir: Path, adapter: Path, args: argparse.Namespace) -> list[dict]:
    records = []
    bare = make_backend("hf", model_dir, None, args)
    bare.runtime.batch_size = args.batch_size
    texts = texts_of_length(bare, args.prompts, args.gen_prompt_tokens, seed=7)
    rows = [bare.runtime.encode(t)[0] for t in texts]
    bare_s, bare_tokens = bare_generate(bare, rows, args)
    name = device_name("hf", bare)
    bare.close()
    _free()
    records.append(_gen_record("bare model.generate", bare_s, bare_tokens, bare_s, name, args))
    backend = make_backend("hf", model_dir, adapter, args)
    backend.runtime.batch_size = args.batch_size
    for view in ("base", "ft"):
        s, tokens = ours_generate(backend, view, texts, args)
        rate = _gen_record(view, s, tokens, bare_s * tokens / max(bare_tokens, 1), name, args)
        records.append(rate)
    backend.close()
    _free()
    return records


def _gen_record(
    view: str, seconds: float, tokens: int, bare_seconds: float, name: str, a: Any
) -> dict:
    record = {
        "op": "generate_batch",
        "view": view,
        "device_name": name,
        "prompts": a.prompts,
        "rows_per_call": a.batch_size,
        "new_tokens": a.new,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "ratio_to_bare": bare_seconds / seconds,
    }
    print(
        f"hf   {view:20} generate B={a.batch_size:<3} {tokens / seconds:12,.0f} tok/s  "
        f"{record['ratio_to_bare']:.0%} of model.generate",
        flush=True,
    )
    return record


def bench_shape(shape: str, args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    model_dir, adapter = build_model(args.work, shape, device=args.build_device)
    _free()
    built = time.perf_counter() - started
    scoring_args = argparse.Namespace(
        batches=[args.prompts], seq=args.seq, repeats=args.repeats, dtype=args.dtype,
        device=args.device, views=list(VIEWS), lam=0.5, nulls=args.nulls, only_nulls=False,
        bare=True, batch_size=args.batch_size,
    )  # fmt: skip
    records, memory = bench_backend("hf", model_dir, adapter, scoring_args)
    _free()
    generation = bench_generation(model_dir, adapter, args) if args.new > 0 else []
    return {
        "shape": shape,
        "config": {k: v for k, v in SHAPES[shape].items() if isinstance(v, int | float)},
        "build_s": round(built, 1),
        "total_s": round(time.perf_counter() - started, 1),
        "memory": memory,
        "scoring": records,
        "generation": generation,
        "summary": summary(records, generation),
    }


def summary(scoring: list[dict], generation: list[dict]) -> list[dict]:
    """Every measured ratio to the bare forward (or model.generate), against the bar."""
    rows = []
    for r in [*scoring, *generation]:
        if r.get("view") in ("bare", "bare model.generate", "null-loop"):
            continue
        ratio = r.get("ratio_to_bare")
        rows.append(
            {
                "op": r["op"],
                "view": r["view"],
                "tokens_per_s": round(r["tokens_per_s"]),
                "ratio_to_bare": None if ratio is None else round(ratio, 3),
                "meets_0.9": None if ratio is None else ratio >= TARGET,
            }
        )
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--shapes", default="llama-1b,llama-8b", help=f"comma-separated, of {sorted(SHAPES)}")
    add("--prompts", type=int, default=64, help="texts per op (64-256)")
    add("--seq", type=int, default=128, help="tokens per scored text")
    add(
        "--batch-size",
        type=int,
        default=None,
        help="rows per forward and per generate call (>= 8) [default: --prompts, as the "
        "bare forward, which scores all prompts in one batch]",
    )
    add("--nulls", type=int, default=8, help="K: base + K nulls, looped and stacked")
    add("--new", type=int, default=32, help="new tokens per prompt (0: no generation)")
    add("--gen-prompt-tokens", type=int, default=32)
    add("--repeats", type=int, default=3)
    add("--dtype", default="auto", help="auto: bfloat16 on CUDA")
    add("--device", default="auto")
    add("--build-device", default=None, help="where weights are drawn [default: cuda if any]")
    add("--work", type=Path, default=Path("/tmp/sway-bench"))
    default_out = Path(os.environ["OUT"]) / "gpu_speed.json" if os.environ.get("OUT") else None
    add("--out", type=Path, default=default_out or REPO / "benchmarks/results/gpu_speed.json")
    args = parser.parse_args()
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        parser.error(f"--shapes: unknown {sorted(unknown)}")
    args.batch_size = args.batch_size or args.prompts
    if args.build_device is None:
        import torch

        args.build_device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    shapes = [bench_shape(s.strip(), args) for s in args.shapes.split(",")]
    payload = {
        "benchmark": "gpu_speed",
        "machine": f"{platform.system()} {platform.machine()}",
        "python": sys.version.split()[0],
        "versions": versions(),
        "argv": sys.argv[1:],
        "target_ratio": TARGET,
        "seconds": round(time.perf_counter() - started, 1),
        "shapes": shapes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    for shape in shapes:
        missed = [f"{r['op']}/{r['view']}" for r in shape["summary"] if r["meets_0.9"] is False]
        print(f"{shape['shape']}: below {TARGET:.0%} of bare: {', '.join(missed) or 'none'}")
    print(f"wrote {args.out} in {payload['seconds']} s")


if __name__ == "__main__":
    main()
