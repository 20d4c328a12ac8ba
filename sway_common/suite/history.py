"""Runs of one evaluation over time: a probes × runs matrix and a regression gate.

The runs are suite results (``eval --json`` files), oldest first. Each probe (by name, in
order of first appearance) gets one cell per run: its verdict and score, or nothing
where that run did not have it. The gate compares the last run with the one before it:
it *regressed* when a probe that gates in the last run FAILs or ERRORs there and did not
in the run before (or was not in it), or when the composite score fell by more than
``max_drop``. Nothing else (a WARN, a score drop within the bound, a non-gating FAIL)
fails the gate; each is still shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sway_common.types import ProbeResult, SuiteResult, Verdict

FAILING = (Verdict.FAIL, Verdict.ERROR)
PREFLIGHT = "preflight"
DEFAULT_MAX_DROP = 0.1


class HistoryError(ValueError):
    """Runs that cannot be compared; the message names the file and the fix."""


@dataclass(frozen=True)
class Run:
    label: str
    result: SuiteResult


@dataclass(frozen=True)
class Cell:
    verdict: Verdict
    score: float | None
    gating: bool

    @classmethod
    def of(cls, p: ProbeResult) -> Cell:
        return cls(p.verdict, p.score, p.gating)


@dataclass(frozen=True)
class Row:
    name: str
    kind: str
    cells: list[Cell | None]
    """One per run; None where the run has no probe of this name."""

    @property
    def gating(self) -> bool:
        """Whether the probe gates in the latest run that has it."""
        present = [c for c in self.cells if c is not None]
        return bool(present) and present[-1].gating


@dataclass
class History:
    runs: list[Run]
    rows: list[Row]
    max_drop: float
    regressions: list[str] = field(default_factory=list)
    """Why the last run regressed against the one before; empty: it did not."""
    notes: list[str] = field(default_factory=list)
    """What the gate could not compare, and changes it does not gate on."""

    @property
    def regressed(self) -> bool:
        return bool(self.regressions)

    @property
    def scores(self) -> list[float | None]:
        return [r.result.score for r in self.runs]


def unique_labels(paths: list[Path]) -> list[str]:
    """Each file's stem; numbered (``2:r``) where two files share one."""
    stems = [p.stem for p in paths]
    return [f"{i + 1}:{s}" if stems.count(s) > 1 else s for i, s in enumerate(stems)]


def check_comparable(runs: list[Run]) -> None:
    """Raise :class:`HistoryError` when the runs cannot be read as one history."""
    if len(runs) < 2:
        raise HistoryError("history needs at least two runs (eval --json files), oldest first")
    models = {r.label: Path(str(r.result.meta.get("model") or "")).name for r in runs}
    named = {m for m in models.values() if m}
    if len(named) > 1:
        first, other = sorted(named)[:2]
        a = next(label for label, m in models.items() if m == first)
        b = next(label for label, m in models.items() if m == other)
        raise HistoryError(
            f"{a} was run on the model {first} and {b} on {other}: a history compares runs "
            "of one base model; give the runs of one model"
        )
    for run in runs[-2:]:
        if run.result.meta.get("interrupted"):
            raise HistoryError(
                f"{run.label} is an interrupted run (no verdict): run the eval again, or "
                "leave it out"
            )
    # A run stopped by its preflight (a broken or no-op adapter) holds that result alone:
    # it is a verdict on the run, compared like any other.
    prev, last = ({p.name for p in r.result.probes} - {PREFLIGHT} for r in runs[-2:])
    if prev and last and not prev & last:
        raise HistoryError(
            f"{runs[-2].label} and {runs[-1].label} share no probe: they are not runs of one "
            "suite (eval --json reports of the same spec)"
        )


def build_history(runs: list[Run], max_drop: float = DEFAULT_MAX_DROP) -> History:
    """The matrix and the gate; :func:`check_comparable` first."""
    check_comparable(runs)
    names: dict[str, str] = {}
    for run in runs:
        for p in run.result.probes:
            names.setdefault(p.name, p.kind)
    rows = []
    for name, kind in names.items():
        cells = []
        for run in runs:
            found = next((p for p in run.result.probes if p.name == name), None)
            cells.append(Cell.of(found) if found is not None else None)
        rows.append(Row(name, kind, cells))
    history = History(runs, rows, max_drop)
    _gate(history)
    return history


def _gate(h: History) -> None:
    prev_label, last_label = h.runs[-2].label, h.runs[-1].label
    for row in h.rows:
        before, now = row.cells[-2], row.cells[-1]
        if now is None or now.verdict not in FAILING:
            continue
        if before is not None and before.verdict in FAILING:
            h.notes.append(f"{row.name} still {now.verdict.value} (as in {prev_label})")
        elif now.gating:
            was = f"{before.verdict.value} in" if before is not None else "not in"
            h.regressions.append(
                f"gating {row.name} {now.verdict.value} in {last_label} ({was} {prev_label})"
            )
        else:
            h.notes.append(f"{row.name} newly {now.verdict.value} (not gating)")
    prev, last = h.scores[-2], h.scores[-1]
    if prev is None or last is None:
        missing = prev_label if prev is None else last_label
        h.notes.append(f"{missing} has no composite score: the score is not compared")
        return
    drop = prev - last
    line = f"score {prev:.3f} → {last:.3f} ({last - prev:+.3f}"
    if drop > h.max_drop:
        h.regressions.append(f"{line}, more than --max-drop {h.max_drop:g})")
    else:
        h.notes.append(f"{line}, within --max-drop {h.max_drop:g})")


def delta(before: Cell | None, now: Cell | None) -> str:
    """A cell's change from one run to the next: the verdict's, then the score's."""
    if before is None or now is None:
        return "new" if before is None and now is not None else "gone" if now is None else ""
    parts = []
    if before.verdict is not now.verdict:
        parts.append(f"{before.verdict.value}→{now.verdict.value}")
    if before.score is not None and now.score is not None:
        change = now.score - before.score
        if abs(change) >= 5e-4:
            parts.append(f"{change:+.3f}")
    return " ".join(parts) or "="


def score_delta(prev: float | None, last: float | None) -> str:
    if prev is None or last is None:
        return "—"
    change = last - prev
    return f"{change:+.3f}" if abs(change) >= 5e-4 else "="
