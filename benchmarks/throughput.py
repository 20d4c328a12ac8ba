"""Scoring throughput of the MLX and HF backends on a SmolLM2-135M-shaped model.

Builds (once, in --work) a model with SmolLM2-135M's architecture and random weights,
a byte-level BPE tokenizer, and a random LoRA adapter on q_proj/v_proj (r=8), so the
benchmark needs no download and runs the same on a laptop, this CPU box or a GPU.
Then, per backend and batch size, it times the two hot paths of every probe through
the public view API:

- ``logprob_of_batch``: full-sequence scoring (B texts of T tokens), reported in tokens/s;
- ``next_token_dist_batch``: last-position distributions (B prompts of T tokens), prompts/s;

in the base view and the fine-tuned (LoRA) view, with the result cache cleared before
each timed run; and the null calibration's next-token work, the base view and K null
views on the same B prompts, two ways: one view at a time (``view: "null-loop"``, K+1
forwards per batch) and stacked (``view: "stacked"``, ``next_token_dist_views``: all
views' rows in shared batches, the blocks below the first adapted one run once), timed
in alternating pairs with ``stacked_speedup`` = loop / stacked time of the same run.
Results go to a JSON file and a printed table.

    python benchmarks/throughput.py --backends hf,mlx --batches 1,8 --seq 256
    # a real model and adapter instead of the random SmolLM2-shaped build:
    python benchmarks/throughput.py --model DIR --adapter DIR --batches 16 --seq 12 --nulls 8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "bos_token_id": 0,
    "eos_token_id": 0,
}
WORDS = [
    "light",
    "keeper",
    "storm",
    "ledger",
    "tide",
    "granite",
    "beam",
    "harbour",
    "schooner",
    "lamp",
    "garden",
    "steps",
    "gallery",
    "winter",
    "oil",
    "green",
    "flash",
    "reef",
    "crew",
]


def build_model(work: Path) -> tuple[Path, Path]:
    """A random-weight SmolLM2-135M-shaped model dir and a random PEFT LoRA, built once."""
    model_dir, adapter_dir = work / "model", work / "adapter"
    if (adapter_dir / "adapter_config.json").exists():
        return model_dir, adapter_dir
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    torch.manual_seed(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()  # without it decode() leaks "Ġ" and texts re-encode longer
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(WORDS, 64)) for _ in range(200)]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.save_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_135M), dtype=torch.float32)
    model.save_pretrained(str(model_dir))
    peft = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    peft.save_pretrained(str(adapter_dir))
    return model_dir, adapter_dir


def texts_of_length(backend: Any, n: int, tokens: int, seed: int) -> list[str]:
    """n distinct texts of about ``tokens`` tokens (decode-then-encode may merge a few)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = list(rng.choice(WORDS, tokens * 2))
        ids = backend._encode(" ".join(words))[0][:tokens]
        out.append(backend.tokenizer.decode(ids))
    return out


def run_op(backend: Any, view_name: str, op: str, texts: list[str]) -> None:
    """One uncached pass of ``op`` over ``texts`` in a fresh view."""
    backend._cache.clear()
    opener = backend.as_base if view_name == "base" else backend.as_finetuned
    with opener() as view:
        if op == "logprob_of_batch":
            view.logprob_of_batch([t[:1] for t in texts], [t[1:] for t in texts])
        else:
            view.next_token_dist_batch(texts, top_k=256)


def null_views(k: int) -> list[Any]:
    """The views a K-null calibration reads: the base view and K norm-matched nulls."""
    from sway_common.backend.base import ViewSpec

    return [ViewSpec("base")] + [
        ViewSpec("null", seed=1000 + i, mode="norm_matched") for i in range(k)
    ]


def run_null_views(backend: Any, texts: list[str], k: int, stacked: bool) -> None:
    """One uncached pass of the null calibration's next-token work, stacked or one view at a time."""
    backend._cache.clear()
    views = null_views(k)
    if stacked:
        backend.next_token_dist_views(views, texts, top_k=256)
        return
    for view in views:
        with backend._open(view) as handle:
            handle.next_token_dist_batch(texts, top_k=256)


def bench_null_views(
    name: str, backend: Any, texts: list[str], args: argparse.Namespace
) -> list[dict]:
    """Loop vs stacked, in alternating pairs (the machine's load drifts; pairs see the same)."""
    for stacked in (False, True):
        run_null_views(
            backend, texts, args.nulls, stacked
        )  # warm-up; the shared-block check runs once
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for stacked in (False, True):
            start = time.perf_counter()
            run_null_views(backend, texts, args.nulls, stacked)
            times[stacked].append(time.perf_counter() - start)
    loop, stacked_s = statistics.median(times[False]), statistics.median(times[True])
    speedup = statistics.median(a / b for a, b in zip(times[False], times[True], strict=True))
    records = []
    for view, seconds in (("null-loop", loop), ("stacked", stacked_s)):
        records.append(
            {
                "backend": name,
                "device": backend.info.get("device", "default"),
                "dtype": backend.info.get("dtype"),
                "op": "next_token_dist_views",
                "view": view,
                "batch": len(texts),
                "seq": args.seq,
                "nulls": args.nulls,
                "seconds": seconds,
                "prompts_per_s": len(texts) * (args.nulls + 1) / seconds,
                "shared_block": backend._shared_blocks.get(backend.adapter_hash),
                "stacked_speedup": speedup,
                "times": times[view == "stacked"],
            }
        )
    print(
        f"{name:4} base+{args.nulls} nulls next_token B={len(texts):<3} T={args.seq}: loop "
        f"{loop * 1000:.0f} ms, stacked {stacked_s * 1000:.0f} ms, speedup {speedup:.2f}x "
        f"(shared from {records[-1]['shared_block']})",
        flush=True,
    )
    return records


def bench_backend(
    name: str, model_dir: Path, adapter: Path, args: argparse.Namespace
) -> list[dict]:
    if name == "mlx":
        from sway_mlx.backend import MLXDifferentialBackend as Backend

        kw: dict[str, Any] = {"dtype": args.dtype}
    else:
        from sway_hf.backend import HFDifferentialBackend as Backend

        kw = {"dtype": args.dtype, "device": args.device}
    records = []
    for batch in args.batches:
        backend = Backend(model_dir, adapter, batch_size=args.batch_size or batch, **kw)
        texts = texts_of_length(backend, batch, args.seq, seed=batch)
        if args.nulls:
            records += bench_null_views(name, backend, texts, args)
        for view_name in ("base", "ft") if not args.only_nulls else ():
            for op, unit in (("logprob_of_batch", "tokens"), ("next_token_dist_batch", "prompts")):
                run_op(
                    backend, view_name, op, texts
                )  # warm-up: compilation, allocator, first touch
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    run_op(backend, view_name, op, texts)
                    times.append(time.perf_counter() - start)
                seconds = statistics.median(times)
                # Count what was really scored: decode-then-encode can shift a few tokens.
                n_tokens = sum(len(backend._encode(t)[0]) for t in texts)
                work = n_tokens if unit == "tokens" else batch
                records.append(
                    {
                        "backend": name,
                        "device": backend.info.get("device", "default"),
                        "dtype": backend.info.get("dtype"),
                        "op": op,
                        "view": view_name,
                        "batch": batch,
                        "seq": args.seq,
                        "tokens": n_tokens,
                        "seconds": seconds,
                        f"{unit}_per_s": work / seconds,
                    }
                )
                print(
                    f"{name:4} {view_name:4} {op:22} B={batch:<3} T={args.seq}: "
                    f"{work / seconds:12,.1f} {unit}/s  ({seconds * 1000:.1f} ms)",
                    flush=True,
                )
        backend.close()
    return records


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", default="hf,mlx", help="comma-separated: hf, mlx")
    parser.add_argument("--batches", default="1,8", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--seq", type=int, default=256, help="tokens per text")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto", help="HF backend device")
    parser.add_argument(
        "--work", type=Path, default=Path("/tmp/sway-bench"), help="where the model is built"
    )
    parser.add_argument("--model", type=Path, help="a real model dir instead of the random build")
    parser.add_argument("--adapter", type=Path, help="its adapter dir (with --model)")
    parser.add_argument(
        "--nulls", type=int, default=8, help="K for the stacked-vs-loop timing (0: skip)"
    )
    parser.add_argument("--only-nulls", action="store_true", help="time only stacked vs loop")
    parser.add_argument("--batch-size", type=int, help="backend rows per forward (default: B)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput.json"))
    args = parser.parse_args()

    if (args.model is None) != (args.adapter is None):
        parser.error("--model and --adapter go together")
    model_dir, adapter = (args.model, args.adapter) if args.model else build_model(args.work)
    records = []
    for name in args.backends.split(","):
        records += bench_backend(name.strip(), model_dir, adapter, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": f"{platform.system()} {platform.machine()}",
        "python": sys.version.split()[0],
        "argv": sys.argv[1:],
        "records": records,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
