"""What the verdict benchmark measured for each probe kind, for `list-probes` to show.

The file ``data/false_rates.json`` is written by ``benchmarks/verdicts.py --rates``; no
rate is typed anywhere else.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

RATES_FILE = "false_rates.json"
LABELS = {
    "false_pass": "false PASS (random, B≈0 adapters)",
    "false_fail_or_warn": "false FAIL or WARN (healthy adapters)",
    "false_fail": "false FAIL (healthy adapters)",
    "false_fail_random": "false FAIL (random adapters)",
    "catches_damage": "FAILs a damaging adapter",
}


# Rates the verdict should reach, not false ones: an upper bound says nothing there.
SHARES = ("catches_damage",)


def load_rates() -> dict[str, Any]:
    """Per probe kind and backend, the benchmark's counts; empty when none were measured."""
    path = resources.files("sway_common.probes").joinpath("data").joinpath(RATES_FILE)
    if not path.is_file():
        return {}
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def describe_rates(kind: str, rates: dict[str, Any]) -> list[str]:
    """One line per backend: "hf (2026-12-07): false PASS 0/80 (≤ 3.7%); …"."""
    lines = []
    for backend, r in sorted(rates.get(kind, {}).items()):
        parts = [
            f"{LABELS[key]} {r[key]['k']}/{r[key]['n']}"
            + ("" if key in SHARES else f" (≤ {100 * r[key]['upper95']:.1f}%)")
            for key in LABELS
            if key in r and r[key]["n"]
        ]
        if parts:
            lines.append(f"{backend}, {r['date']}: " + "; ".join(parts))
    return lines
