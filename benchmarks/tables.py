"""Merge benchmark results from any machine into one Markdown report and one PNG.

Reads the JSON files ``throughput.py`` and ``suite_vs_anchor.py`` write (default: every
``benchmarks/results/*.json``), from a CPU, torch on CUDA, MLX on CUDA or Apple Metal,
and prints three tables: full-sequence scoring and next-token scoring (tokens/s per
view, with the share of the bare forward in brackets where the run measured it, and the
allocator's peak memory), and sway-mlx against dlm-sway (probe phase and whole process,
cold and warm, with dlm-sway's time over ours). The same Markdown goes to ``--md`` and a
bar chart of full-sequence throughput per view to ``--png``.

``--write-docs`` regenerates the tables of the docs instead: each block between
``<!-- table: KIND FILE... -->`` and ``<!-- table: end -->`` is replaced by the KIND
table (``full``, ``next``, ``anchor``, ``fpr``, ``fpr-fixed``, ``fpr-ratios``) of those
result files, so no measured figure is typed by hand.

    python benchmarks/tables.py                      # every file in benchmarks/results
    python benchmarks/tables.py run-a.json run-b.json --md out.md --png out.png
    python benchmarks/tables.py --write-docs docs/benchmarks.md docs/statistics.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
VIEWS = ("bare", "base", "ft", "scaled", "null")
VIEW_TITLES = {"bare": "bare forward", "scaled": "λ", "stacked": "stacked base+K nulls"}


@dataclass
class Run:
    """One result file: where it ran and what it holds."""

    label: str
    machine: str
    payload: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)


def is_anchor(payload: dict[str, Any]) -> bool:
    return any(isinstance(payload.get(b), dict) and "median" in payload[b] for b in ("hf", "mlx"))


def load(paths: Iterable[Path]) -> list[Run]:
    """The throughput and anchor results among ``paths`` (others, e.g. null_fpr's, are skipped).

    ``label`` is the run's own label or the file's name.
    """
    runs = []
    for path in sorted(paths):
        payload = json.loads(path.read_text())
        records = [r for r in payload.get("records", []) if isinstance(r, dict) and "op" in r]
        if records or is_anchor(payload):
            label = payload.get("label") or path.stem
            runs.append(Run(label, payload.get("machine", "?"), payload, records))
        else:
            print(
                f"tables: {path.name} is neither a throughput nor an anchor run; skipped",
                file=sys.stderr,
            )
    return runs


def platform_of(record: dict[str, Any], machine: str) -> str:
    """``MLX-CUDA``, ``MLX-Metal``, ``MLX-CPU``, ``torch-CUDA``, ``torch-MPS`` or ``torch-CPU``."""
    device = str(record.get("device", "")).lower()
    if record.get("backend") == "mlx":
        if "gpu" not in device:
            return "MLX-CPU"
        return "MLX-Metal" if machine.startswith("Darwin") else "MLX-CUDA"
    if device.startswith("cuda"):
        return "torch-CUDA"
    return "torch-MPS" if device.startswith("mps") else "torch-CPU"


def shape_of(run: Run) -> str:
    """The model: the run's ``shape``; files from before it existed timed SmolLM2-135M."""
    if "shape" in run.payload:
        return str(run.payload["shape"])
    return "custom" if "--model" in run.payload.get("argv", []) else "smollm2-135m"


def rate(value: float) -> str:
    """Tokens/s, short: 950, 12.3k, 224k, 1.2M."""
    if value >= 1e6:
        return f"{value / 1e6:.1f}M"
    if value >= 1e4:
        return f"{value / 1e3:.0f}k"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def cell(record: dict[str, Any] | None) -> str:
    if record is None:
        return "–"
    tokens_per_s = record.get("tokens_per_s")
    if tokens_per_s is None and "tokens" in record:  # next-token, before tokens/s was kept
        tokens_per_s = record["tokens"] / record["seconds"]
    elif tokens_per_s is None:
        tokens_per_s = record["prompts_per_s"] * record["seq"]
    text = rate(tokens_per_s)
    ratio = record.get("ratio_to_bare")
    if ratio is not None and record.get("view") != "bare":
        text += f" ({ratio:.0%})"
    return text


def memory(records: Iterable[dict[str, Any]]) -> str:
    peaks = [r["peak_memory_bytes"] for r in records if r.get("peak_memory_bytes") is not None]
    if not peaks:
        return "–"
    peak = max(peaks)
    return f"{peak / 2**30:.1f} GiB" if peak >= 2**30 else f"{peak / 2**20:.0f} MiB"


def scoring_table(runs: list[Run], op: str, stacked: bool) -> list[str]:
    """One row per run, platform, model, dtype and batch; one column per view."""
    views = [*VIEWS, "stacked"] if stacked else list(VIEWS)
    head = ["run", "platform", "model", "dtype", "B×T", *(VIEW_TITLES.get(v, v) for v in views)]
    lines = ["| " + " | ".join([*head, "peak memory"]) + " |", "|" + "---|" * (len(head) + 1)]
    for run in runs:
        groups: dict[tuple, dict[str, dict[str, Any]]] = {}
        for r in run.records:
            if r.get("op") not in (op, "next_token_dist_views" if stacked else None):
                continue
            key = (platform_of(r, run.machine), r.get("dtype"), r["batch"], r.get("seq"))
            groups.setdefault(key, {})[r["view"]] = r
        for (name, dtype, batch, seq), by_view in groups.items():
            if not any(v in by_view for v in views):
                continue
            where = next((r["device_name"] for r in by_view.values() if r.get("device_name")), "")
            name += f" ({where})" if where and where != "cpu" else ""
            row = [run.label, name, shape_of(run), str(dtype), f"{batch}×{seq}"]
            row += [cell(by_view.get(v)) for v in views]
            lines.append("| " + " | ".join([*row, memory(by_view.values())]) + " |")
    return lines


def anchor_table(runs: list[Run]) -> list[str]:
    """sway-mlx vs dlm-sway: medians per phase, dlm-sway's time over ours in bold."""
    head = "| run | backend | probe phase, cold | probe phase, warm | whole, cold | whole, warm | verdicts agree |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for run in runs:
        for backend in ("hf", "mlx"):
            result = run.payload.get(backend)
            if not isinstance(result, dict) or "median" not in result:
                continue
            med, ratio = result["median"], result.get("anchor_over_ours", {})
            row = [run.label, backend]
            for what in ("probe_s", "wall_s"):
                for temp in ("cold", "warm"):
                    ours, anchor = med[f"ours_{temp}"][what], med[f"anchor_{temp}"][what]
                    times = ratio.get(f"{temp}_{what}") or anchor / ours
                    row.append(f"{ours:.2f} s vs {anchor:.2f} s (**{times:.1f}×**)")
            row.append({True: "yes", False: "no"}.get(result.get("delta_kl_verdicts_agree"), "–"))
            lines.append("| " + " | ".join(row) + " |")
    return lines


def markdown(runs: list[Run]) -> str:
    throughput = [r for r in runs if r.records]
    anchor = [r for r in runs if is_anchor(r.payload)]
    parts = []
    if throughput:
        parts += ["### Full-sequence scoring (`logprob_of_batch`), tokens/s", ""]
        parts += scoring_table(throughput, "logprob_of_batch", stacked=False)
        parts += ["", "### Next-token scoring (`next_token_dist_batch`), tokens/s", ""]
        parts += scoring_table(throughput, "next_token_dist_batch", stacked=True)
        parts += [
            "",
            "In brackets: the bare forward's time for the same work over the view's time "
            "(stacked views do K+1 views' work and may pass 100%).",
        ]
    if anchor:
        parts += ["", "### sway-mlx vs dlm-sway 0.1.0 (ours vs theirs, medians)", ""]
        parts += anchor_table(anchor)
    return "\n".join(parts).strip() + "\n"


def fpr_cells(payload: dict[str, Any], mode: str, key: str) -> list[str]:
    """One cell per K: ``passed/n`` per prompt count, joined by `` · ``."""
    summary = payload["summary"]
    cells = []
    for k in payload["ks"]:
        counts = [summary.get(f"{mode} K={k} P={p}", {}).get(key) for p in payload["prompts"]]
        cells.append(" · ".join("–" if c is None else f"{c[0]}/{c[1]}" for c in counts))
    return cells


def fpr_table(payload: dict[str, Any]) -> list[str]:
    """null_fpr.py's grid against norm-matched nulls: one column per K."""
    ps, ks = " / ".join(map(str, payload["prompts"])), payload["ks"]
    mode = "norm_matched@0.02"
    rows = [
        (f"random adapters passing `delta_kl`, {ps} prompts", "delta_kl:random"),
        ("the same, raw-scale z ≥ 3 and p ≤ 0.05 alone (the old rule)", "delta_kl_old_rule:random"),
        (f"trained adapters passing `delta_kl`, {ps} prompts", "delta_kl:trained"),
        ("B shrunk 1e-4× passing `delta_kl`", "delta_kl:b_zero"),
    ]
    lines = ["| norm-matched nulls | " + " | ".join(f"K={k}" for k in ks) + " |"]
    lines.append("|---|" + "---|" * len(ks))
    for title, key in rows:
        lines.append("| " + " | ".join([title, *fpr_cells(payload, mode, key)]) + " |")
    # adapter_ablation is judged on the first 4 prompts whatever the prompt count.
    first = payload["prompts"][0]
    ablation = [
        payload["summary"].get(f"{mode} K={k} P={first}", {}).get("adapter_ablation:random")
        for k in ks
    ]
    cells = ["–" if c is None else f"{c[0]}/{c[1]}" for c in ablation]
    lines.append(
        "| random adapters passing `adapter_ablation` (4 prompts) | " + " | ".join(cells) + " |"
    )
    return lines


def fpr_fixed_table(payload: dict[str, Any]) -> list[str]:
    """Random adapters at fixed init scales against fixed-mode nulls at the same scale."""
    ps, ks = " / ".join(map(str, payload["prompts"])), payload["ks"]
    scales = sorted({key.split()[0] for key in payload["summary"] if key.startswith("fixed@")})
    lines = [f"| fixed-mode nulls, {ps} prompts | " + " | ".join(f"K={k}" for k in ks) + " |"]
    lines.append("|---|" + "---|" * len(ks))
    for mode in scales:
        scale = mode.split("@")[1]
        for rule, key in (
            ("`delta_kl`", "delta_kl:random"),
            ("old rule", "delta_kl_old_rule:random"),
        ):
            title = f"random adapters at init scale {scale} passing, {rule}"
            lines.append("| " + " | ".join([title, *fpr_cells(payload, mode, key)]) + " |")
    return lines


def fpr_ratio_table(payload: dict[str, Any]) -> list[str]:
    """Each trained adapter's effect over a random adapter's (norm-matched nulls)."""
    ps, ks = " / ".join(map(str, payload["prompts"])), payload["ks"]
    lines = [f"| trained adapter, {ps} prompts | " + " | ".join(f"K={k}" for k in ks) + " |"]
    lines.append("|---|" + "---|" * len(ks))
    for record in payload["records"]:
        if record.get("group") != "trained":
            continue
        cells = []
        for k in ks:
            ratios = [
                record["verdicts"].get(f"norm_matched@0.02|{k}|{p}", {}).get("ratio")
                for p in payload["prompts"]
            ]
            cells.append(" · ".join("–" if r is None else f"{r:.2g}×" for r in ratios))
        lines.append("| " + " | ".join([record["name"], *cells]) + " |")
    return lines


def docs_table(kind: str, paths: list[Path]) -> str:
    """The Markdown table of one docs block: KIND over the named result files."""
    if kind in ("fpr", "fpr-fixed", "fpr-ratios"):
        if len(paths) != 1:
            raise ValueError(f"a {kind} block names one null_fpr result file")
        payload = json.loads(paths[0].read_text())
        build = {"fpr": fpr_table, "fpr-fixed": fpr_fixed_table, "fpr-ratios": fpr_ratio_table}
        return "\n".join(build[kind](payload))
    runs = [run for path in paths for run in load([path])]  # in the block's order
    if kind == "full":
        return "\n".join(scoring_table(runs, "logprob_of_batch", stacked=False))
    if kind == "next":
        return "\n".join(scoring_table(runs, "next_token_dist_batch", stacked=True))
    if kind == "anchor":
        return "\n".join(anchor_table(runs))
    raise ValueError(
        f"unknown table kind {kind!r} (full, next, anchor, fpr, fpr-fixed, fpr-ratios)"
    )


BLOCK = re.compile(
    r"^<!-- table: (?P<args>(?!end )[^\n]*?) -->\n.*?^<!-- table: end -->$", re.S | re.M
)


def render_docs(text: str, results: Path = RESULTS) -> str:
    """``text`` with every table block's table regenerated from ``results``."""

    def fill(match: re.Match[str]) -> str:
        kind, *names = match["args"].split()
        table = docs_table(kind, [results / name for name in names])
        return f"<!-- table: {match['args']} -->\n{table}\n<!-- table: end -->"

    return BLOCK.sub(fill, text)


def write_docs(paths: list[Path], results: Path = RESULTS) -> None:
    """Regenerate the tables of each docs file in place; say which files changed."""
    for path in paths:
        text = path.read_text()
        if not BLOCK.search(text):
            raise SystemExit(f"tables: {path} has no <!-- table: KIND FILE... --> block")
        try:
            new = render_docs(text, results)
        except (ValueError, OSError, KeyError) as error:
            raise SystemExit(f"tables: {path}: {error}") from None
        if new != text:
            path.write_text(new)
        print(f"tables: {path}: {'updated' if new != text else 'unchanged'}")


def plot(runs: list[Run], path: Path) -> None:
    """Horizontal bars on a log scale (CPU and GPU rates differ 1000-fold): full-sequence
    tokens/s per view, one group per run, platform, model and batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, dict[str, float]] = {}
    for run in runs:
        for r in run.records:
            if r.get("op") == "logprob_of_batch" and r.get("view") in VIEWS:
                name = (
                    f"{run.label}: {platform_of(r, run.machine)}, {shape_of(run)}, B={r['batch']}"
                )
                groups.setdefault(name, {})[r["view"]] = r["tokens_per_s"]
    fig, ax = plt.subplots(figsize=(9.0, 1.0 + 0.45 * len(groups)))
    height = 0.8 / len(VIEWS)
    for i, view in enumerate(VIEWS):
        ys = [g + i * height for g, by_view in enumerate(groups.values()) if view in by_view]
        xs = [by_view[view] for by_view in groups.values() if view in by_view]
        ax.barh(ys, xs, height, label=VIEW_TITLES.get(view, view))
    ax.set_yticks([g + 0.4 - height / 2 for g in range(len(groups))], list(groups), fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("tokens/s, full-sequence scoring (log scale)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "files", nargs="*", type=Path, help="result JSONs (default: results/*.json)"
    )
    parser.add_argument("--md", type=Path, default=RESULTS / "summary.md")
    parser.add_argument("--png", type=Path, default=RESULTS / "throughput.png")
    parser.add_argument(
        "--write-docs",
        type=Path,
        nargs="+",
        metavar="DOC",
        help="regenerate the <!-- table: ... --> tables of these Markdown files in place "
        "(from results/*.json; nothing else is written)",
    )
    args = parser.parse_args(argv)
    if args.write_docs:
        write_docs(args.write_docs)
        return
    runs = load(args.files or RESULTS.glob("*.json"))
    text = markdown(runs)
    print(text, end="")
    args.md.write_text(text)
    if any(run.records for run in runs):
        plot(runs, args.png)


if __name__ == "__main__":
    main()
