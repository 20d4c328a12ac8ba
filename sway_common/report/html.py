"""A self-contained HTML report: the verdict first, the probe table, the plots, the detail.

One file with nothing to fetch: the styles are inline, the plots are the PNGs ``--plot``
writes (:func:`~sway_common.report.figures.write_result_plots`) embedded as base64, and a
Content-Security-Policy forbids every network request, so the report opened from a CI
artifact, offline, looks as it did when it was written. No script runs in it: the
per-probe detail folds with ``<details>``.

Every plot ``--plot`` makes for a result appears here, in its order; each gets its caption
from :data:`PLOT_TITLES` (by file name; a plot written once per probe, ``sway-x-<probe>``,
gets ``sway-x``'s caption and the probe's name). A caller with plots of its own (a
trajectory) passes them to :func:`render_html`.
"""

from __future__ import annotations

import base64
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from sway_common import __version__
from sway_common.atomic import atomic_write_text
from sway_common.report.figures import write_result_plots
from sway_common.report.files import (
    META_FIELDS,
    composite_line,
    format_duration,
    format_effect,
    format_metric,
    format_score,
    to_jsonable,
)
from sway_common.report.headline import headline
from sway_common.report.plots import COLORS
from sway_common.stats import format_z
from sway_common.types import ProbeResult, SuiteResult, Verdict

PathLike = str | Path

PLOT_TITLES: dict[str, str] = {
    "sway-z": "Signal vs noise per probe: z against null adapters of the same shape",
    "sway-ablation": "Adapter dose-response: divergence from the base as the adapter is scaled",
    "sway-attribution": "Attribution: each group's share of the effect, overall and per prompt",
    "sway-spectrum": "Weight spectrum: the update's size against the base weight, and intruder "
    "dimensions, per layer and module type",
}
NO_MATPLOTLIB = "No plots: they need matplotlib (pip install 'sway-mlx[plot]')."
# Evidence can hold embeddings and long per-token arrays; the detail shows the start.
EVIDENCE_CHARS = 20_000
# Nothing may be fetched: only the inline styles and the data: images render.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #212121;
  max-width: 1100px; margin: 0 auto; padding: 1.5rem; }
h1 { margin: 0 0 .3rem; font-size: 1.6rem; }
h2 { margin-top: 2rem; border-bottom: 1px solid #e0e0e0; padding-bottom: .2rem; }
.verdict { color: #fff; padding: .1rem .6rem; border-radius: 4px; }
.headline { font-size: 1.15rem; font-weight: 600; margin: .4rem 0; }
.muted { color: #616161; }
table { border-collapse: collapse; margin: .5rem 0; }
th, td { border-bottom: 1px solid #eee; padding: .3rem .6rem; text-align: left;
  vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #616161; }
details { border: 1px solid #e0e0e0; border-radius: 4px; margin: .4rem 0; padding: .3rem .6rem; }
summary { cursor: pointer; }
pre { white-space: pre-wrap; word-break: break-word; background: #fafafa; padding: .5rem;
  max-height: 30rem; overflow: auto; }
"""


@dataclass(frozen=True)
class Plot:
    """One figure of the report: its caption and its PNG bytes."""

    title: str
    png: bytes


def result_plots(result: SuiteResult) -> list[Plot] | None:
    """The plots ``--plot`` would write for ``result``; None without matplotlib."""
    try:
        import matplotlib  # noqa: F401  (an optional extra)
    except ImportError:
        return None
    with tempfile.TemporaryDirectory(prefix="sway-html-") as tmp:
        return [
            Plot(plot_title(path.stem), path.read_bytes())
            for path in write_result_plots(result, tmp)
        ]


def plot_title(stem: str) -> str:
    """The caption of the plot file ``stem``: ``sway-attribution-doc`` → the attribution
    caption, for ``doc``; an unknown plot, its name."""
    if stem in PLOT_TITLES:
        return PLOT_TITLES[stem]
    for known, title in PLOT_TITLES.items():
        if stem.startswith(known + "-"):
            return f"{title} ({stem[len(known) + 1 :]})"
    return stem


def write_html(result: SuiteResult, path: PathLike) -> None:
    """The report of ``result`` with its plots, written whole or not at all."""
    atomic_write_text(path, render_html(result, result_plots(result)))


def render_html(result: SuiteResult, plots: Sequence[Plot] | None) -> str:
    """The whole page; ``plots`` None says in one line that matplotlib is missing."""
    title = f"sway-mlx: {result.verdict.value}"
    body = [
        _header(result),
        _probe_table(result),
        _plots(plots),
        _details(result),
        _run_facts(result),
        f'<p class="muted">Written by sway-mlx {escape(__version__)}.</p>',
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(part for part in body if part)
        + "\n</body></html>\n"
    )


def _badge(verdict: Verdict) -> str:
    color = COLORS.get(verdict, "#616161")
    return f'<span class="verdict" style="background:{color}">{escape(verdict.value)}</span>'


def _header(result: SuiteResult) -> str:
    counts = {v: sum(p.verdict is v for p in result.probes) for v in Verdict}
    summary = ", ".join(f"{n} {v.value}" for v, n in counts.items() if n)
    n = len(result.probes)
    return (
        f'<header>\n<h1 id="verdict">{_badge(result.verdict)} sway-mlx verdict</h1>\n'
        f'<p class="headline" id="headline">{escape(headline(result))}</p>\n'
        f'<p class="muted">{escape(composite_line(result))}</p>\n'
        f'<p class="muted">{n} probe{"s" if n != 1 else ""}'
        f"{f' ({summary})' if summary else ''}</p>\n</header>"
    )


def _row(cells: Sequence[str], numeric: Sequence[bool] = ()) -> str:
    tds = (
        f'<td class="num">{c}</td>' if i < len(numeric) and numeric[i] else f"<td>{c}</td>"
        for i, c in enumerate(cells)
    )
    return "<tr>" + "".join(tds) + "</tr>"


def _z(p: ProbeResult) -> str:
    return format_z(p.z, p.null.n if p.null else None)


def _probe_table(result: SuiteResult) -> str:
    if not result.probes:
        return '<h2>Probes</h2>\n<p class="muted">No probes ran.</p>'
    head = "".join(
        f"<th>{h}</th>"
        for h in ("Probe", "Kind", "Verdict", "Gating", "Raw", "z", "Effect", "Score", "Message")
    )
    rows = []
    for p in result.probes:
        effect = format_effect(p.effect_ratio) + (" null" if p.effect_ratio is not None else "")
        cells = [
            f'<a href="#probe-{_anchor(p.name)}">{escape(p.name)}</a>',
            escape(p.kind),
            _badge(p.verdict),
            "yes" if p.gating else "no",
            escape(format_metric(p.raw)),
            escape(_z(p)),
            escape(effect),
            escape(format_score(p.score)),
            escape(p.message),
        ]
        rows.append(_row(cells, numeric=[False] * 4 + [True] * 4))
    table = f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(rows)
    return f"<h2>Probes</h2>\n{table}\n</tbody></table>"


def _plots(plots: Sequence[Plot] | None) -> str:
    if plots is None:
        return f'<h2>Plots</h2>\n<p class="muted" id="no-plots">{escape(NO_MATPLOTLIB)}</p>'
    if not plots:
        return ""
    figures = [
        f'<figure>\n<img alt="{escape(p.title)}" '
        f'src="data:image/png;base64,{base64.b64encode(p.png).decode("ascii")}">\n'
        f"<figcaption>{escape(p.title)}</figcaption>\n</figure>"
        for p in plots
    ]
    return "<h2>Plots</h2>\n" + "\n".join(figures)


def _anchor(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def _details(result: SuiteResult) -> str:
    if not result.probes:
        return ""
    return "<h2>Detail per probe</h2>\n" + "\n".join(_probe_detail(p) for p in result.probes)


def _probe_detail(p: ProbeResult) -> str:
    facts = [
        ("verdict", p.verdict.value),
        ("category", p.category),
        ("gating", "yes" if p.gating else "no"),
        ("raw", format_metric(p.raw)),
        ("z", _z(p)),
        ("p value", format_metric(p.p_value)),
        ("effect", format_effect(p.effect_ratio)),
        ("score", format_score(p.score)),
        ("duration", format_duration(p.duration_s)),
    ]
    if p.null is not None:
        null = f"mean {format_metric(p.null.mean)} ± {format_metric(p.null.std)}, n={p.null.n}"
        facts.append(("null", null + (" (degenerate)" if p.null.degenerate else "")))
    rows = "\n".join(_row([f"<th>{escape(k)}</th>", escape(v)]) for k, v in facts)
    summary = (
        f"{_badge(p.verdict)} <b>{escape(p.name)}</b> <span class='muted'>({escape(p.kind)})</span>"
    )
    if p.message:
        summary += f" {escape(p.message)}"
    parts = [
        f'<details id="probe-{_anchor(p.name)}">\n<summary>{summary}</summary>',
        f"<table>\n{rows}\n</table>",
        _per_prompt(p.evidence),
        _evidence(p.evidence),
        "</details>",
    ]
    return "\n".join(part for part in parts if part)


def _per_prompt(evidence: dict[str, Any]) -> str:
    """A row per prompt: every evidence list as long as ``prompts`` whose items are plain
    values (per-prompt divergences, cluster labels) is a column."""
    prompts = evidence.get("prompts")
    if not isinstance(prompts, list) or not prompts:
        return ""
    n = len(prompts)
    columns = [
        (key, value)
        for key, value in evidence.items()
        if key != "prompts"
        and isinstance(value, list)
        and len(value) == n
        and all(v is None or isinstance(v, (str, int, float, bool)) for v in value)
    ]
    head = "".join(f"<th>{escape(h)}</th>" for h in ["#", "prompt", *(k for k, _ in columns)])
    rows = []
    for i, prompt in enumerate(prompts):
        values = [_cell(col[i]) for _, col in columns]
        cells = [str(i + 1), escape(str(prompt)), *values]
        rows.append(_row(cells, numeric=[True, False] + [True] * len(values)))
    table = f"<table class='prompts'>\n<thead><tr>{head}</tr></thead>\n<tbody>\n"
    return f"<p><b>Per prompt</b> ({n})</p>\n{table}" + "\n".join(rows) + "\n</tbody></table>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return escape(format_metric(value))
    return escape("—" if value is None else str(value))


def _evidence(evidence: dict[str, Any]) -> str:
    if not evidence:
        return ""
    text = json.dumps(to_jsonable(evidence), indent=1, ensure_ascii=False)
    if len(text) > EVIDENCE_CHARS:
        text = text[:EVIDENCE_CHARS] + f"\n…(first {EVIDENCE_CHARS} characters of {len(text)})"
    return f"<details>\n<summary>evidence (JSON)</summary>\n<pre>{escape(text)}</pre>\n</details>"


def _run_facts(result: SuiteResult) -> str:
    fields = [*META_FIELDS, ("spec", "Spec"), ("sway_version", "sway-mlx version")]
    rows = []
    for key, label in fields:
        if key not in result.meta:
            continue
        value = result.meta[key]
        shown = format_duration(value) if key == "duration_s" else str(value)
        rows.append(_row([f"<th>{escape(label)}</th>", f"<code>{escape(shown)}</code>"]))
    if not rows:
        return ""
    return "<h2>Run</h2>\n<table>\n" + "\n".join(rows) + "\n</table>"
