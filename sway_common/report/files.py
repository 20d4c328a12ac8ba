"""File reports: JSON (the machine record), Markdown (for humans / PR comments), JUnit (for CI).

Every file is written atomically, so a crash mid-report never leaves a truncated file where
a previous good one stood.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
import xml.etree.ElementTree as ET
from typing import IO, Any

import numpy as np

from sway_common.atomic import atomic_write, atomic_write_text
from sway_common.report.headline import headline
from sway_common.stats import format_z
from sway_common.suite.runner import decide
from sway_common.types import ProbeResult, SuiteResult, Verdict

PathLike = str | os.PathLike[str]

# Run facts shown in the Markdown report, in this order, when result.meta holds them.
META_FIELDS: tuple[tuple[str, str], ...] = (
    ("backend", "Backend"),
    ("model", "Model"),
    ("adapter", "Adapter"),
    ("seed", "Seed"),
    ("duration_s", "Duration"),
)

# Evidence can hold per-prompt arrays; CI logs only need enough to start debugging.
_JUNIT_EVIDENCE_CHARS = 4000

# Characters XML 1.0 forbids even when escaped (ANSI escapes in messages would break parsers).
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


# --------------------------------------------------------------------------- formatting
# Shared with the terminal report so both show the same numbers.


def format_metric(x: float | None) -> str:
    """Four significant digits; scientific notation for tiny or huge values."""
    if x is None:
        return "—"
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def format_effect(ratio: float | None) -> str:
    if ratio is None:
        return "—"
    ratio = float(ratio)
    if not math.isfinite(ratio):
        return f"{ratio}×"
    if abs(ratio) >= 10:
        return f"{ratio:.0f}×"
    if abs(ratio) >= 1:
        return f"{ratio:.1f}×"
    return f"{ratio:.2g}×"


def format_score(score: float | None) -> str:
    if score is None:
        return "—"
    score = float(score)
    return f"{score:.3f}" if math.isfinite(score) else str(score)


def format_duration(seconds: Any) -> str:
    try:
        s = float(seconds)
    except (TypeError, ValueError):
        return str(seconds)
    if not math.isfinite(s):
        return str(s)
    return f"{s:.2f} s" if s < 60 else f"{int(s // 60)} min {s % 60:.0f} s"


def composite_line(result: SuiteResult) -> str:
    """What decided the verdict, then the composite against its threshold: 'gating
    delta_kl failed · composite 0.749 ≥ threshold 0.500'."""
    score = result.score
    if score is None or not math.isfinite(float(score)):
        op = "vs"
    else:
        op = "≥" if float(score) >= result.threshold else "<"
    line = f"composite {format_score(score)} {op} threshold {format_score(result.threshold)}"
    verdict, reason = decide(result.probes, score, result.threshold)
    # An interrupted run, or export-check's own rule, is decided elsewhere: the numbers only.
    return f"{reason} · {line}" if verdict is result.verdict and result.probes else line


# --------------------------------------------------------------------------- atomic writes


# --------------------------------------------------------------------------- JSON


def to_jsonable(obj: Any) -> Any:
    """Strict-JSON copy of ``obj``: numpy to Python, arrays to lists, NaN/Inf to None.

    Unknown objects become their ``str`` so a stray value in evidence cannot lose a report.
    """
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, dict):
        return {_json_key(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    return str(obj)


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, np.generic):
        key = key.item()
    return str(key)


def write_json(result: SuiteResult, path: PathLike) -> None:
    # The headline travels with the numbers: a reader of an interrupted run's file sees
    # "no verdict" without knowing what meta.interrupted means.
    payload = to_jsonable({"headline": headline(result), **result.to_dict()})

    def write(f: IO[str]) -> None:
        # allow_nan=False: a non-finite value that slipped through fails loudly, not as
        # a file that strict JSON parsers reject.
        json.dump(payload, f, indent=2, allow_nan=False)
        f.write("\n")

    atomic_write(path, write)


def load_json(path: PathLike) -> SuiteResult:
    with open(path, encoding="utf-8") as f:
        return SuiteResult.from_dict(json.load(f))


# --------------------------------------------------------------------------- Markdown


def _md_cell(value: Any) -> str:
    text = str(value).replace("\\", "\\\\").replace("|", "\\|")
    return " ".join(text.split())  # a newline would end the table row


def render_markdown(result: SuiteResult) -> str:
    lines = [
        f"# sway-mlx: {result.verdict.value}",
        "",
        f"**{result.verdict.value}**: {composite_line(result)}",
        "",
        _md_cell(headline(result)),
        "",
    ]
    counts = {v: sum(p.verdict is v for p in result.probes) for v in Verdict}
    summary = ", ".join(f"{n} {v.value}" for v, n in counts.items() if n)
    lines += [f"{len(result.probes)} probes" + (f" ({summary})" if summary else ""), ""]

    if result.probes:
        lines += [
            "| Probe | Kind | Verdict | Raw | z | Effect | Message |",
            "|---|---|---|---:|---:|---:|---|",
        ]
        for p in result.probes:
            effect = format_effect(p.effect_ratio)
            if p.effect_ratio is not None:
                effect += " null"
            cells = [
                p.name,
                p.kind,
                f"**{p.verdict.value}**",
                format_metric(p.raw),
                format_z(p.z, p.null.n if p.null else None),
                effect,
                p.message,
            ]
            lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
        lines.append("")

    if result.category_scores:
        lines += ["## Categories", "", "| Category | Score |", "|---|---:|"]
        for name, score in result.category_scores.items():
            lines.append(f"| {_md_cell(name)} | {format_score(score)} |")
        lines.append("")

    meta_rows = [(label, result.meta[key]) for key, label in META_FIELDS if key in result.meta]
    if meta_rows:
        lines += ["## Run", ""]
        for label, value in meta_rows:
            shown = format_duration(value) if label == "Duration" else str(value)
            lines.append(f"- {label}: `{' '.join(shown.split())}`")
        lines.append("")

    return "\n".join(lines)


def write_markdown(result: SuiteResult, path: PathLike) -> None:
    atomic_write_text(path, render_markdown(result))


# --------------------------------------------------------------------------- JUnit


def _xml_text(value: Any) -> str:
    return _XML_ILLEGAL.sub("\ufffd", str(value))


def _seconds(value: Any) -> str:
    try:
        s = float(value)
    except (TypeError, ValueError):
        return "0.000"
    return f"{s:.3f}" if math.isfinite(s) and s >= 0 else "0.000"


def _probe_details(p: ProbeResult) -> str:
    lines = [
        f"verdict: {p.verdict.value}",
        f"kind: {p.kind}",
        f"raw: {format_metric(p.raw)}",
        f"z: {format_z(p.z, p.null.n if p.null else None)}",
        f"p_value: {format_metric(p.p_value)}",
        f"effect: {format_effect(p.effect_ratio)}"
        + (" null" if p.effect_ratio is not None else ""),
        f"score: {format_score(p.score)}",
    ]
    if p.null is not None:
        lines.append(
            f"null: mean={format_metric(p.null.mean)} std={format_metric(p.null.std)} "
            f"n={p.null.n}" + (" (degenerate)" if p.null.degenerate else "")
        )
    if p.message:
        lines.append(f"message: {p.message}")
    if p.evidence:
        evidence = json.dumps(to_jsonable(p.evidence), allow_nan=False)
        if len(evidence) > _JUNIT_EVIDENCE_CHARS:
            evidence = evidence[:_JUNIT_EVIDENCE_CHARS] + " …(truncated)"
        lines.append(f"evidence: {evidence}")
    return "\n".join(lines)


def render_junit(result: SuiteResult) -> str:
    """One <testsuite> with a <testcase> per probe.

    When the suite verdict is FAIL or ERROR but no probe carries a failure (e.g. the
    composite fell below the threshold), one extra "composite" testcase fails so that CI
    never shows green for a red suite.
    """
    cases: list[ET.Element] = []
    for p in result.probes:
        case = ET.Element(
            "testcase",
            {
                "classname": _xml_text(f"sway.{p.category}"),
                "name": _xml_text(p.name),
                "time": _seconds(p.duration_s),
            },
        )
        message = _xml_text(p.message or p.verdict.value)
        if p.verdict is Verdict.FAIL:
            sub = ET.SubElement(case, "failure", {"message": message, "type": "FAIL"})
            sub.text = _xml_text(_probe_details(p))
        elif p.verdict is Verdict.ERROR:
            sub = ET.SubElement(case, "error", {"message": message, "type": "ERROR"})
            sub.text = _xml_text(_probe_details(p))
        elif p.verdict is Verdict.SKIP:
            ET.SubElement(case, "skipped", {"message": message})
        elif p.verdict is Verdict.WARN or p.message:
            out = ET.SubElement(case, "system-out")
            out.text = _xml_text(
                f"{p.verdict.value}: {p.message}" if p.message else p.verdict.value
            )
        cases.append(case)

    probe_failed = any(p.verdict in (Verdict.FAIL, Verdict.ERROR) for p in result.probes)
    interrupted = bool(result.meta.get("interrupted"))
    if result.verdict in (Verdict.FAIL, Verdict.ERROR) and (interrupted or not probe_failed):
        case = ET.Element(
            "testcase", {"classname": "sway.suite", "name": "composite", "time": "0.000"}
        )
        tag = "failure" if result.verdict is Verdict.FAIL else "error"
        line = f"suite {result.verdict.value}: {composite_line(result)}"
        if interrupted:  # CI must read "no verdict", never a composite of half a suite
            line = f"suite {result.verdict.value}: {headline(result)}"
        sub = ET.SubElement(case, tag, {"message": _xml_text(line), "type": result.verdict.value})
        sub.text = _xml_text(line)
        cases.append(case)

    def count(tag: str) -> int:
        return sum(c.find(tag) is not None for c in cases)

    total = result.meta.get("duration_s")
    if not isinstance(total, (int, float)) or not math.isfinite(total):
        total = sum(p.duration_s for p in result.probes)
    suite = ET.Element(
        "testsuite",
        {
            "name": "sway-mlx",
            "tests": str(len(cases)),
            "failures": str(count("failure")),
            "errors": str(count("error")),
            "skipped": str(count("skipped")),
            "time": _seconds(total),
        },
    )
    suite.extend(cases)
    ET.indent(suite)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"
    )


def write_junit(result: SuiteResult, path: PathLike) -> None:
    atomic_write_text(path, render_junit(result))
