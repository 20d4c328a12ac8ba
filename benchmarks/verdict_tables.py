"""Counting the verdict benchmark's records: false rates with bounds, Markdown, list-probes' file.

What counts as false, per probe kind:
- an effect probe (delta_kl, adapter_ablation) claims "more than a random adapter of its
  size": a PASS for a random or B≈0 adapter is false; a FAIL or WARN for a healthy one is;
- a harm probe (calibration_drift, external_perplexity) claims "no damage beyond what its
  size explains": a FAIL for a healthy or a random adapter (random adapters are exchangeable
  with the nulls it is judged against) is false; the damaging adapters show whether harm is
  caught at all (each must FAIL at least one harm probe, not every one).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from sway_common.stats import binomial_upper_bound

EFFECT_KINDS = ("delta_kl", "adapter_ablation")
HARM_KINDS = ("calibration_drift", "external_perplexity")
CONTROLS = ("random", "b_zero")
BEGIN, END = "<!-- verdicts:begin -->", "<!-- verdicts:end -->"


def rate(k: int, n: int) -> dict[str, Any]:
    """k of n, the point estimate and the one-sided 95% upper bound."""
    if n == 0:
        return {"k": 0, "n": 0, "point": None, "upper95": None}
    return {"k": k, "n": n, "point": k / n, "upper95": binomial_upper_bound(k, n)}


def _verdicts(records: list[dict[str, Any]], kind: str, groups: tuple[str, ...]) -> list[str]:
    return [
        p["verdict"]
        for r in records
        if r["group"] in groups
        for p in r["probes"].values()
        if p["kind"] == kind
    ]


def probe_rates(records: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    if kind in EFFECT_KINDS:
        controls = _verdicts(records, kind, CONTROLS)
        healthy = _verdicts(records, kind, ("healthy",))
        return {
            "false_pass": rate(controls.count("PASS"), len(controls)),
            "false_fail_or_warn": rate(sum(v != "PASS" for v in healthy), len(healthy)),
        }
    healthy = _verdicts(records, kind, ("healthy",))
    random = _verdicts(records, kind, ("random",))
    damaging = _verdicts(records, kind, ("damaging",))
    return {
        "false_fail": rate(healthy.count("FAIL"), len(healthy)),
        "warn_healthy": rate(healthy.count("WARN"), len(healthy)),
        "false_fail_random": rate(random.count("FAIL"), len(random)),
        "catches_damage": rate(damaging.count("FAIL"), len(damaging)),
    }


def overall_rates(records: list[dict[str, Any]]) -> dict[str, Any]:
    healthy = [r for r in records if r["group"] == "healthy"]
    damaging = [r for r in records if r["group"] == "damaging"]
    controls = [r for r in records if r["group"] in CONTROLS]
    named = [
        r
        for r in damaging
        if r["overall"] == "FAIL"
        and any(
            p["kind"] in HARM_KINDS and p["verdict"] == "FAIL" and n in (r["decided_by"] or "")
            for n, p in r["probes"].items()
        )
    ]
    return {
        "healthy_pass": rate(sum(r["overall"] == "PASS" for r in healthy), len(healthy)),
        "healthy_fail": rate(sum(r["overall"] == "FAIL" for r in healthy), len(healthy)),
        "damaging_fail_harm_named": rate(len(named), len(damaging)),
        "false_pass": rate(sum(r["overall"] == "PASS" for r in controls), len(controls)),
    }


def reported(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What is shown, not counted: the 4-step adapters (the detection limit) per shape, and
    each mlx-lm-defaults adapter's reading."""
    faint = [r for r in records if r["group"] == "faint"]
    return {
        "faint_pass": {
            s: rate(
                sum(r["overall"] == "PASS" for r in faint if r["shape"] == s),
                sum(r["shape"] == s for r in faint),
            )
            for s in sorted({r["shape"] for r in faint})
        },
        "mlx_defaults": [
            {
                "name": r["name"],
                "overall": r["overall"],
                "decided_by": r["decided_by"],
                "delta_kl": r["probes"].get("delta_kl", {}).get("message"),
            }
            for r in records
            if r["group"] == "mlx_defaults"
        ],
    }


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    kinds = sorted({p["kind"] for r in records for p in r["probes"].values()})
    judged = [k for k in kinds if k in EFFECT_KINDS + HARM_KINDS]
    shapes = sorted({r["shape"] for r in records})
    return {
        "probes": {k: probe_rates(records, k) for k in judged},
        "overall": overall_rates(records),
        "reported": reported(records),
        "by_shape": {
            s: {
                "overall": overall_rates([r for r in records if r["shape"] == s]),
                "probes": {
                    k: probe_rates([r for r in records if r["shape"] == s], k) for k in judged
                },
            }
            for s in shapes
        },
    }


def cell(r: dict[str, Any]) -> str:
    """A false rate: k of n and its one-sided 95% upper bound."""
    if not r["n"]:
        return "–"
    return f"{r['k']}/{r['n']} (≤ {100 * r['upper95']:.1f}%)"


def share(r: dict[str, Any]) -> str:
    """A rate the verdict should reach (healthy PASS, damage caught): k of n and the share."""
    return f"{r['k']}/{r['n']} ({100 * r['point']:.0f}%)" if r["n"] else "–"


def row(*cells: str) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(cells) + " |"


def overall_row(label: str, o: dict[str, Any]) -> str:
    """One row of the overall-verdict table: all shapes, or one shape."""
    return row(
        label,
        share(o["healthy_pass"]),
        cell(o["healthy_fail"]),
        share(o["damaging_fail_harm_named"]),
        cell(o["false_pass"]),
    )


def judged_counts(res: dict[str, Any]) -> dict[str, int]:
    """Adapters judged per group, over every shape and command merged into ``res``."""
    if "records" not in res:
        return dict(res["counts"])
    return dict(Counter(r["group"] for r in res["records"]))


def markdown(results: list[dict[str, Any]]) -> str:
    """The tables docs/statistics.md shows, one set per results file."""
    lines = []
    for res in results:
        s = res["summary"]
        lines += [
            f"**{res['backend']} backend**, {res['machine']}, {dtype_of(res)}, {res['date']}: "
            f"{', '.join(res['shapes'])}; K = {res['runs']} nulls; judged "
            + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in judged_counts(res).items())
            + f" ({res['wall_s'] / 60:.0f} min).",
            f"Command: {res['command']}",
            "",
            "| probe | false PASS (random, B≈0) | false FAIL or WARN (healthy) |",
            "|---|---|---|",
        ]
        lines += [
            row(kind, cell(r["false_pass"]), cell(r["false_fail_or_warn"]))
            for kind, r in s["probes"].items()
            if kind in EFFECT_KINDS
        ]
        lines += [
            "",
            "| harm probe | false FAIL (healthy) | WARN (healthy) | false FAIL (random) | FAILs a damaging adapter |",
            "|---|---|---|---|---|",
        ]
        lines += [
            row(
                kind,
                cell(r["false_fail"]),
                cell(r["warn_healthy"]),
                cell(r["false_fail_random"]),
                share(r["catches_damage"]),
            )
            for kind, r in s["probes"].items()
            if kind in HARM_KINDS
        ]
        o = s["overall"]
        lines += [
            "",
            "| overall verdict | healthy PASS | healthy FAIL | damaging FAIL, harm probe named | random or B≈0 PASS |",
            "|---|---|---|---|---|",
            overall_row("all shapes", o),
        ]
        lines += [overall_row(shape, by["overall"]) for shape, by in s["by_shape"].items()]
        lines += reported_lines(s.get("reported", {}))
        lines.append("")
    lines.append(
        "A false rate: k of n, then the one-sided 95% upper bound on the rate (Clopper-Pearson);"
        " a rate the verdict should reach (healthy PASS, damage caught): k of n and the share."
    )
    return "\n".join(lines)


def reported_lines(rep: dict[str, Any]) -> list[str]:
    """The 4-step adapters' PASS share per shape and the mlx-lm-defaults readings."""
    lines = []
    if rep.get("faint_pass"):
        shares = ", ".join(f"{shape} {share(r)}" for shape, r in rep["faint_pass"].items())
        lines += ["", f"4-step adapters (the detection limit, not counted above): PASS {shares}."]
    if rep.get("mlx_defaults"):
        lines += ["", "| mlx-lm's defaults (lr 1e-5) | overall | decided by | delta_kl |"]
        lines += ["|---|---|---|---|"]
        lines += [
            row(d["name"], d["overall"], d["decided_by"] or "", d["delta_kl"] or "–")
            for d in rep["mlx_defaults"]
        ]
    return lines


def replace_between_markers(path: Path, text: str) -> None:
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in old and END in old:
        new = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, old, flags=re.S)
    else:
        new = (
            old.rstrip("\n")
            + ("\n\n" if old else "")
            + "## Measured false rates\n\n"
            + block
            + "\n"
        )
    path.write_text(new, encoding="utf-8")


def dtype_of(res: dict[str, Any]) -> str:
    """The precision a result's models ran in; files written before it was recorded are
    this CPU's float32 runs."""
    return str(res.get("dtype") or "float32")


def rates_file(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per probe kind and backend, what list-probes prints: the rates of every float32
    record of that backend pooled over machines (their random adapters are independent
    draws), with their provenance. Half-precision runs are shown in the docs only."""
    by_backend: dict[str, list[dict[str, Any]]] = {}
    for res in results:
        if dtype_of(res) == "float32":
            by_backend.setdefault(res["backend"], []).append(res)
    out: dict[str, Any] = {}
    for backend, runs in by_backend.items():
        records = [r for res in runs for r in res["records"]]
        for kind, r in summarise(records)["probes"].items():
            out.setdefault(kind, {})[backend] = {
                **r,
                "date": max(res["date"] for res in runs),
                "machine": "; ".join(dict.fromkeys(res["machine"] for res in runs)),
                "shapes": sorted({rec["shape"] for rec in records}),
            }
    return out


def _record_key(res: dict[str, Any], r: dict[str, Any]) -> tuple[Any, ...]:
    """One adapter judged against one set of nulls: a command that judged it again (a
    trained adapter is cached by its recipe) adds nothing."""
    return (r["shape"], r["group"], r["name"], r.get("trainer"), res.get("panel_seed", 0))


def merge_results(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One result per backend, machine and precision: runs of a panel split over several
    commands, each adapter counted once."""
    merged: dict[tuple[str, str, str], dict[str, Any]] = {}
    seen: dict[tuple[str, str, str], set[tuple[Any, ...]]] = {}
    for res in results:
        key = (res["backend"], res["machine"], dtype_of(res))
        m = merged.setdefault(
            key, {**res, "records": [], "shapes": {}, "wall_s": 0.0, "command": []}
        )
        for r in res["records"]:
            if _record_key(res, r) not in seen.setdefault(key, set()):
                seen[key].add(_record_key(res, r))
                m["records"].append(r)
        m["shapes"].update(res["shapes"])
        m["wall_s"] += res["wall_s"]
        note = f" ({res['note']})" if res.get("note") else ""
        m["command"].append(f"`{res['command']}`{note}")
    for m in merged.values():
        m.pop("note", None)
        m["summary"] = summarise(m["records"])
        m["command"] = "; ".join(m["command"])
    return list(merged.values())


def write_outputs(
    results: list[dict[str, Any]], docs: Path | None, rates: Path | None, echo: bool = False
) -> None:
    results = merge_results(results)
    text = markdown(results)
    if echo:
        print(text)
    if docs:
        replace_between_markers(docs, text)
    if rates:
        rates.write_text(json.dumps(rates_file(results), indent=1) + "\n", encoding="utf-8")
