"""Scoring throughput of the MLX and HF backends against the bare forward of the same model.

Builds (once, in --work) a model of a real architecture with random weights, a BPE
tokenizer and a random r=8 LoRA on q_proj/v_proj (``bench_model.py``; ``--shape``:
``smollm2-135m``, ``llama-1b`` or ``tiny``), so the benchmark needs no download and runs
the same on a laptop, a CPU box or a GPU. Per backend it then times, in one process:

1. the bare forward (``bench_bare.py``): the model loaded by the backend without an adapter,
   called directly: full logits + float32 log-softmax + gather, or the last position;
2. the two hot paths of every probe through the public view API, uncached, in every
   view: ``base``, ``ft``, ``scaled`` (λ=0.5) and ``null`` (a norm-matched null):
   ``logprob_of_batch`` (B texts of T tokens) and ``next_token_dist_batch``;
3. the null calibration's next-token work, the base view and K nulls on the same B
   prompts, one view at a time (``null-loop``) and stacked (``stacked``:
   ``next_token_dist_views``), timed in alternating pairs.

Every record has tokens/s and ``ratio_to_bare`` (bare time for the same work / its
time: 1.0 is as fast as the bare forward; stacked views can pass 1.0, as the blocks
below the first adapted one run once for all views), and the allocator's peak memory
(``peak_memory_bytes()``; None where the framework does not say, e.g. torch on CPU).
Results go to a JSON file (merge several with ``tables.py``) and a printed table.

    # a CPU smoke test; on a CPU shared with other work, one OpenMP thread keeps torch's
    # spinning threads from dominating (timings there are still not comparable)
    OMP_NUM_THREADS=1 python benchmarks/throughput.py --shape tiny --batches 2 --seq 32 --repeats 1
    python benchmarks/throughput.py --backends hf,mlx --batches 8,32 --seq 512 --dtype bf16
    python benchmarks/throughput.py --shape llama-1b --batches 8,32 --seq 512 --dtype bf16
    # a real model and adapter instead of a random build:
    python benchmarks/throughput.py --model DIR --adapter DIR --batches 16 --seq 12 --nulls 8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from importlib import metadata
from pathlib import Path
from typing import Any

from bench_bare import bare_forwards, device_name, reset_peak_memory
from bench_model import SHAPES, build_model, texts_of_length

OPS = (("logprob_of_batch", "tokens"), ("next_token_dist_batch", "prompts"))
VIEWS = ("base", "ft", "scaled", "null")
NULL_SEED = 1000


def make_backend(name: str, model_dir: Path, adapter: Path | None, args: argparse.Namespace) -> Any:
    if name == "mlx":
        from sway_mlx.backend import MLXDifferentialBackend

        return MLXDifferentialBackend(model_dir, adapter, dtype=args.dtype, batch_size=8)
    from sway_hf.backend import HFDifferentialBackend

    return HFDifferentialBackend(
        model_dir, adapter, dtype=args.dtype, device=args.device, batch_size=8
    )


def timed(run: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    """Median seconds of ``repeats`` runs after one warm-up (compilation, allocator, first touch)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def open_view(backend: Any, view: str, lam: float) -> AbstractContextManager[Any]:
    if view == "base":
        return backend.as_base()
    if view == "ft":
        return backend.as_finetuned()
    if view == "scaled":
        return backend.as_scaled_adapter(lam)
    return backend.as_null_adapter(NULL_SEED, mode="norm_matched")


def run_op(backend: Any, view: str, op: str, texts: list[str], lam: float) -> None:
    """One uncached pass of ``op`` over ``texts`` in a freshly opened view."""
    backend.scorer.cache.clear()
    with open_view(backend, view, lam) as handle:
        if op == "logprob_of_batch":
            handle.logprob_of_batch([t[:1] for t in texts], [t[1:] for t in texts])
        else:
            handle.next_token_dist_batch(texts, top_k=256)


def record(name: str, backend: Any, op: str, view: str, texts: list[str], **kw: Any) -> dict:
    """The fields every record shares; ``kw`` adds the timing."""
    return {
        "backend": name,
        "device": backend.info.get("device", "default"),
        "device_name": device_name(name, backend),
        "dtype": backend.info.get("dtype"),
        "op": op,
        "view": view,
        "batch": len(texts),
        "peak_memory_bytes": backend.peak_memory_bytes(),
        **kw,
    }


def rates(tokens: int, prompts: int, seconds: float, bare_seconds: float | None) -> dict:
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "prompts_per_s": prompts / seconds,
        "ratio_to_bare": None if bare_seconds is None else bare_seconds / seconds,
    }


def bench_bare(name: str, model_dir: Path, args: argparse.Namespace) -> tuple[list, dict, dict]:
    """Bare-forward records, the texts of each batch size, and bare seconds by (op, batch)."""
    reset_peak_memory(name)
    backend = make_backend(name, model_dir, None, args)
    forwards = bare_forwards(name, backend)
    records, texts, seconds = [], {}, {}
    for batch in args.batches:
        texts[batch] = texts_of_length(backend, batch, args.seq, seed=batch)
        encoded = [backend.runtime.encode(t)[0] for t in texts[batch]]
        n_tokens = sum(len(e) for e in encoded)
        for op, _ in OPS:
            s, times = timed(lambda op=op, e=encoded: forwards[op](e), args.repeats)
            seconds[op, batch] = s
            stats = rates(n_tokens, batch, s, s)
            records.append(record(name, backend, op, "bare", texts[batch], seq=args.seq, **stats))
            print(f"{name:4} bare   {op:22} B={batch:<3} {n_tokens / s:12,.0f} tok/s", flush=True)
    backend.close()
    return records, texts, seconds


def bench_views(
    name: str, backend: Any, texts: list[str], bare: dict, args: argparse.Namespace
) -> list[dict]:
    """Every view and op on ``texts``, with its ratio to the bare forward."""
    batch = len(texts)
    n_tokens = sum(len(backend.runtime.encode(t)[0]) for t in texts)
    records = []
    for view in args.views:
        for op, _ in OPS:
            s, times = timed(
                lambda v=view, o=op: run_op(backend, v, o, texts, args.lam), args.repeats
            )
            stats = rates(n_tokens, batch, s, bare.get((op, batch)))
            extra = {"lam": args.lam} if view == "scaled" else {}
            records.append(
                record(name, backend, op, view, texts, seq=args.seq, times=times, **stats, **extra)
            )
            ratio = stats["ratio_to_bare"]
            print(
                f"{name:4} {view:6} {op:22} B={batch:<3} {n_tokens / s:12,.0f} tok/s"
                + (f"  {ratio:.0%} of bare" if ratio is not None else ""),
                flush=True,
            )
    return records


def run_null_views(backend: Any, texts: list[str], k: int, stacked: bool) -> None:
    """One uncached pass of the null calibration's next-token work."""
    from sway_common.backend.nulls import NullSpec
    from sway_common.backend.views import ViewSpec

    backend.scorer.cache.clear()
    views = [ViewSpec("base")] + [
        ViewSpec("null", null=NullSpec(NULL_SEED + i, mode="norm_matched")) for i in range(k)
    ]
    if stacked:
        backend.next_token_dist_views(views, texts, top_k=256)
        return
    for view in views:
        with backend.open(view) as handle:
            handle.next_token_dist_batch(texts, top_k=256)


def bench_null_views(
    name: str, backend: Any, texts: list[str], bare: dict, args: argparse.Namespace
) -> list[dict]:
    """Loop vs stacked in alternating pairs (the machine's load drifts; a pair sees the same)."""
    k = args.nulls
    for stacked in (False, True):  # warm-up; the shared-block check runs once
        run_null_views(backend, texts, k, stacked)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for stacked in (False, True):
            start = time.perf_counter()
            run_null_views(backend, texts, k, stacked)
            times[stacked].append(time.perf_counter() - start)
    speedup = statistics.median(a / b for a, b in zip(times[False], times[True], strict=True))
    n_tokens = sum(len(backend.runtime.encode(t)[0]) for t in texts)
    bare_s = bare.get(("next_token_dist_batch", len(texts)))
    records = []
    for view, stacked in (("null-loop", False), ("stacked", True)):
        s = statistics.median(times[stacked])
        stats = rates(n_tokens * (k + 1), len(texts) * (k + 1), s, bare_s and bare_s * (k + 1))
        records.append(
            record(
                name, backend, "next_token_dist_views", view, texts, seq=args.seq, nulls=k,
                shared_block=backend.stacker.shared_blocks.get(backend.adapter_hash),
                stacked_speedup=speedup, times=times[stacked], **stats,
            )
        )  # fmt: skip
    loop_s, stacked_s = (r["seconds"] for r in records)
    print(
        f"{name:4} base+{k} nulls next_token B={len(texts):<3}: loop {loop_s * 1000:.0f} ms, "
        f"stacked {stacked_s * 1000:.0f} ms, speedup {speedup:.2f}x "
        f"(shared from {records[-1]['shared_block']})",
        flush=True,
    )
    return records


def bench_backend(
    name: str, model_dir: Path, adapter: Path, args: argparse.Namespace
) -> tuple[list[dict], dict]:
    """Bare phase, then the views on one backend (one load; the batch size set per run)."""
    records, texts, bare = bench_bare(name, model_dir, args) if args.bare else ([], {}, {})
    memory = {
        "backend": name,
        "bare_peak_bytes": records[-1]["peak_memory_bytes"] if records else None,
    }
    reset_peak_memory(name)
    backend = make_backend(name, model_dir, adapter, args)
    for batch in args.batches:
        backend.runtime.batch_size = args.batch_size or batch
        batch_texts = texts.get(batch) or texts_of_length(backend, batch, args.seq, seed=batch)
        if args.nulls:
            records += bench_null_views(name, backend, batch_texts, bare, args)
        if not args.only_nulls:
            records += bench_views(name, backend, batch_texts, bare, args)
    memory["views_peak_bytes"] = backend.peak_memory_bytes()
    backend.close()
    return records, memory


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("torch", "transformers", "peft", "mlx", "mlx-lm", "mlx-cuda-13", "sway-mlx"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--backends", default="hf,mlx", help="comma-separated: hf, mlx")
    add("--shape", default="smollm2-135m", choices=sorted(SHAPES), help="random-weight model")
    add("--batches", default="1,8", type=lambda s: [int(x) for x in s.split(",")])
    add("--seq", type=int, default=256, help="tokens per text")
    add("--repeats", type=int, default=3)
    add("--dtype", default="auto")
    add("--device", default="auto", help="HF backend device")
    add(
        "--views",
        default=",".join(VIEWS),
        type=lambda s: s.split(","),
        help="of " + ",".join(VIEWS),
    )
    add("--lam", type=float, default=0.5, help="λ of the scaled view")
    add("--work", type=Path, default=Path("/tmp/sway-bench"), help="where models are built")
    add("--model", type=Path, help="a real model dir instead of the random build")
    add("--adapter", type=Path, help="its adapter dir (with --model)")
    add("--nulls", type=int, default=8, help="K for the stacked-vs-loop timing (0: skip)")
    add("--only-nulls", action="store_true", help="time only stacked vs loop")
    add("--no-bare", dest="bare", action="store_false", help="skip the bare forward")
    add("--batch-size", type=int, help="backend rows per forward (default: B)")
    add("--label", help="names this run in tables.py's table (default: from the device)")
    add("--out", type=Path, default=Path("benchmarks/results/throughput.json"))
    args = parser.parse_args()
    if (args.model is None) != (args.adapter is None):
        parser.error("--model and --adapter go together")
    if unknown := set(args.views) - set(VIEWS):
        parser.error(f"--views: unknown {sorted(unknown)}")
    return args


def each_backend_in_its_own_process(args: argparse.Namespace) -> tuple[list, list]:
    """Runs this script once per backend and merges what they wrote.

    On Linux the MLX backend loads OpenBLAS into its process, under which torch runs
    slower; and a framework's allocator peak should not include the other's.
    """
    records, memory = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backends.split(","):
            out = Path(tmp) / f"{name.strip()}.json"
            argv = [*sys.argv[1:], "--backends", name.strip(), "--out", str(out)]
            subprocess.run([sys.executable, __file__, *argv], check=True)
            payload = json.loads(out.read_text())
            records += payload["records"]
            memory += payload["memory"]
    return records, memory


def main() -> None:
    args = parse_args()
    if args.model:
        model_dir, adapter = args.model, args.adapter
    else:
        model_dir, adapter = build_model(args.work, args.shape)
    if "," in args.backends:
        records, memory = each_backend_in_its_own_process(args)
    else:
        records, peaks = bench_backend(args.backends.strip(), model_dir, adapter, args)
        memory = [peaks]
        print(
            f"{args.backends} peak memory bytes: bare {peaks['bare_peak_bytes']}, "
            f"views {peaks['views_peak_bytes']}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "throughput",
        "label": args.label,
        "machine": f"{platform.system()} {platform.machine()}",
        "python": sys.version.split()[0],
        "versions": versions(),
        "shape": "custom" if args.model else args.shape,
        "seq": args.seq,
        "argv": sys.argv[1:],
        "memory": memory,
        "records": records,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
