"""The verdict benchmark's counting: what is a false verdict, the bounds, and list-probes' lines."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from sway_common.probes.false_rates import describe_rates, load_rates
from sway_common.stats import binomial_upper_bound

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import verdict_tables  # noqa: E402


def test_binomial_upper_bound_is_clopper_pearson():
    assert binomial_upper_bound(0, 60) == pytest.approx(1 - 0.05 ** (1 / 60), rel=1e-9)
    assert binomial_upper_bound(0, 60) < 0.05 < binomial_upper_bound(0, 58)
    # 1 of 10: the Beta(2, 9) 95th percentile (exact value 0.3942).
    assert binomial_upper_bound(1, 10) == pytest.approx(0.39416, abs=1e-4)
    assert binomial_upper_bound(10, 10) == 1.0
    with pytest.raises(ValueError):
        binomial_upper_bound(3, 2)


def _record(group: str, shape: str, overall: str, decided: str, **verdicts: str) -> dict:
    kinds = {
        "dk": "delta_kl",
        "ab": "adapter_ablation",
        "gk": "calibration_drift",
        "pp": "external_perplexity",
    }
    return {
        "group": group,
        "shape": shape,
        "overall": overall,
        "decided_by": decided,
        "probes": {n: {"kind": kinds[n], "verdict": v} for n, v in verdicts.items()},
    }


def test_summary_counts_what_each_claim_makes_false():
    records = [
        _record(
            "healthy", "a", "PASS", "every probe passed", dk="PASS", ab="PASS", gk="PASS", pp="PASS"
        ),
        _record("healthy", "a", "WARN", "…", dk="WARN", ab="PASS", gk="WARN", pp="PASS"),
        _record(
            "random", "a", "FAIL", "gating dk failed", dk="FAIL", ab="PASS", gk="FAIL", pp="PASS"
        ),
        _record(
            "b_zero", "b", "FAIL", "gating dk failed", dk="FAIL", ab="FAIL", gk="PASS", pp="PASS"
        ),
        _record(
            "damaging", "b", "FAIL", "gating gk failed", dk="PASS", ab="PASS", gk="FAIL", pp="PASS"
        ),
        _record(
            "damaging", "b", "FAIL", "gating dk failed", dk="FAIL", ab="PASS", gk="PASS", pp="FAIL"
        ),
    ]
    s = verdict_tables.summarise(records)
    dk, ab, gk = (
        s["probes"]["delta_kl"],
        s["probes"]["adapter_ablation"],
        s["probes"]["calibration_drift"],
    )
    assert (dk["false_pass"]["k"], dk["false_pass"]["n"]) == (0, 2)
    assert (ab["false_pass"]["k"], ab["false_pass"]["n"]) == (1, 2)
    assert (dk["false_fail_or_warn"]["k"], dk["false_fail_or_warn"]["n"]) == (1, 2)
    assert (gk["false_fail"]["k"], gk["warn_healthy"]["k"], gk["false_fail_random"]["k"]) == (
        0,
        1,
        1,
    )
    assert (gk["catches_damage"]["k"], gk["catches_damage"]["n"]) == (1, 2)
    o = s["overall"]
    assert (o["healthy_pass"]["k"], o["healthy_pass"]["n"]) == (1, 2)
    # Only the first damaging adapter FAILed with a harm probe named in the overall line.
    assert o["damaging_fail_harm_named"]["k"] == 1
    assert set(s["by_shape"]) == {"a", "b"}
    text = verdict_tables.markdown(
        [
            {
                "backend": "hf",
                "machine": "m",
                "date": "d",
                "shapes": {"a": {}, "b": {}},
                "runs": 8,
                "counts": {"healthy": 2},
                "wall_s": 60,
                "command": "c",
                "summary": s,
            }
        ]
    )
    assert "| delta_kl | 0/2 (≤ 77.6%) | 1/2" in text


def test_faint_and_mlx_defaults_are_shown_not_counted():
    records = [
        _record("healthy", "a", "PASS", "every probe passed", dk="PASS", gk="PASS"),
        _record("faint", "a", "FAIL", "gating dk failed", dk="FAIL", gk="PASS"),
        _record("faint", "a", "PASS", "every probe passed", dk="PASS", gk="PASS"),
        _record("mlx_defaults", "a", "PASS", "every probe passed", dk="PASS", gk="PASS"),
    ]
    records[-1]["name"] = "mlx-defaults-12"
    s = verdict_tables.summarise(records)
    # Neither group enters a false rate: one healthy adapter, one PASS.
    assert s["probes"]["delta_kl"]["false_fail_or_warn"]["n"] == 1
    assert s["overall"]["healthy_pass"]["n"] == 1
    assert (s["reported"]["faint_pass"]["a"]["k"], s["reported"]["faint_pass"]["a"]["n"]) == (1, 2)
    lines = "\n".join(verdict_tables.reported_lines(s["reported"]))
    assert "PASS a 1/2 (50%)" in lines
    assert "| mlx-defaults-12 | PASS | every probe passed | – |" in lines


def test_docs_block_is_replaced_in_place(tmp_path):
    doc = tmp_path / "statistics.md"
    doc.write_text(
        f"# Title\n\nbefore\n\n{verdict_tables.BEGIN}\nold\n{verdict_tables.END}\n\nafter\n"
    )
    verdict_tables.replace_between_markers(doc, "new table")
    text = doc.read_text()
    assert "old" not in text and "new table" in text
    assert text.startswith("# Title") and text.rstrip().endswith("after")


def test_list_probes_shows_the_measured_rates():
    rates = {
        "delta_kl": {
            "hf": {
                "false_pass": {"k": 0, "n": 60, "upper95": 0.0487},
                "false_fail_or_warn": {"k": 1, "n": 30, "upper95": 0.15},
                "date": "2026-12-07",
            }
        }
    }
    (line,) = describe_rates("delta_kl", rates)
    assert line.startswith("hf, 2026-12-07: false PASS")
    assert "0/60 (≤ 4.9%)" in line and "1/30 (≤ 15.0%)" in line
    assert describe_rates("leakage", rates) == []
    shipped = load_rates()  # the file the benchmark wrote, when it has been run
    for kind, per_backend in shipped.items():
        for r in per_backend.values():
            for key in ("false_pass", "false_fail_or_warn", "false_fail"):
                if key in r and r[key]["n"]:
                    assert math.isclose(
                        r[key]["upper95"], binomial_upper_bound(r[key]["k"], r[key]["n"])
                    ), (kind, key)
    assert json.dumps(shipped)  # readable as it ships
