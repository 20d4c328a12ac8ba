"""Training checkpoints as a trajectory: find them, turn results into rows, summarise.

Two layouts are understood:

- mlx-lm (``--save-every N``): ``NNNNNNN_adapters.safetensors`` files beside one
  ``adapter_config.json``, plus the final ``adapters.safetensors``. mlx-lm rewrites the
  final file at every save, so it is a point of its own only when its content differs
  from the highest numbered checkpoint (training stopped between saves).
- PEFT / HF Trainer: ``checkpoint-N/`` dirs holding ``adapter_config.json`` and
  ``adapter_model.safetensors``; a top-level ``adapter_model.safetensors`` (``save_model``
  into the output dir) is the final point under the same rule.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sway_common.adapters.files import load_safetensors
from sway_common.stats import format_z
from sway_common.types import SuiteResult, Verdict

CheckpointFormat = Literal["mlx", "peft"]

MLX_CHECKPOINT_RE = re.compile(r"^(\d+)_adapters\.safetensors$")
PEFT_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
CONFIG = "adapter_config.json"
MLX_FINAL = "adapters.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
LOOKED_FOR = (
    f"mlx-lm NNNNNNN_adapters.safetensors files (with {CONFIG} beside them, written by "
    f"--save-every) or PEFT/HF Trainer checkpoint-N/ dirs ({CONFIG} + {PEFT_WEIGHTS})"
)
# Probes of this category measure what the base knew (general knowledge, held-out prose):
# only they can call a checkpoint a regression.
HELD_OUT_CATEGORY = "regression"


class CheckpointError(ValueError):
    """No usable checkpoints where the user pointed, or a layout we cannot read."""


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    """What ``set_adapter`` takes: the mlx-lm weights file, or the PEFT checkpoint dir."""
    fmt: CheckpointFormat
    label: str
    final: bool = False

    @property
    def weights(self) -> Path:
        return self.path / PEFT_WEIGHTS if self.fmt == "peft" else self.path

    @property
    def config(self) -> Path:
        return (self.path if self.fmt == "peft" else self.path.parent) / CONFIG

    @property
    def key(self) -> str:
        """Identity in a watch history. A final adapter is named by its content: its step
        may only be a guess, and it changes on every save while training runs."""
        if self.final:
            return f"{self.fmt}:final:{file_digest(self.weights)[:16]}"
        return f"{self.fmt}:{self.step}"


# ------------------------------------------------------------------ discovery
def file_digest(path: Path) -> str:
    st = path.stat()
    return _digest(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    # Keyed by size and mtime so a watch loop re-reads a file only after it changed.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def same_content(a: Path, b: Path) -> bool:
    """Same tensors: equal bytes, or (rarely) equal arrays under different file metadata."""
    try:
        if file_digest(a) == file_digest(b):
            return True
        ta, tb = load_safetensors(a), load_safetensors(b)
    except (OSError, ValueError):
        return False
    return ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _final_step(highest: int, recorded: Any) -> int:
    # The trainer's own record (mlx-lm's "iters", HF's "global_step") when it is plausible.
    return recorded if isinstance(recorded, int) and recorded > highest else highest + 1


def scan(run_dir: Path) -> tuple[list[Checkpoint], Checkpoint | None]:
    """Numbered checkpoints (sorted by step) and the final-adapter candidate, unfiltered."""
    mlx: list[Checkpoint] = []
    peft: list[Checkpoint] = []
    for child in run_dir.iterdir():
        m = MLX_CHECKPOINT_RE.match(child.name)
        if m and child.is_file():
            step = int(m.group(1))
            mlx.append(Checkpoint(step, child, "mlx", f"step {step}"))
        m = PEFT_CHECKPOINT_RE.match(child.name)
        if m and (child / CONFIG).is_file() and (child / PEFT_WEIGHTS).is_file():
            step = int(m.group(1))
            peft.append(Checkpoint(step, child, "peft", f"step {step}"))
    if mlx and peft:
        raise CheckpointError(
            f"{run_dir} holds both mlx-lm checkpoint files and checkpoint-N/ dirs; "
            "point at the directory of one training run"
        )
    if mlx and not (run_dir / CONFIG).is_file():
        raise CheckpointError(
            f"{run_dir} has mlx-lm checkpoints but no {CONFIG} (rank and scale come from it)"
        )
    numbered = sorted(mlx or peft, key=lambda c: c.step)
    highest = numbered[-1].step if numbered else 0
    final = None
    if not peft and (run_dir / MLX_FINAL).is_file() and (run_dir / CONFIG).is_file():
        step = _final_step(highest, _read_json(run_dir / CONFIG).get("iters"))
        final = Checkpoint(step, run_dir / MLX_FINAL, "mlx", f"final (step {step})", final=True)
    elif not mlx and (run_dir / PEFT_WEIGHTS).is_file() and (run_dir / CONFIG).is_file():
        step = _final_step(highest, _read_json(run_dir / "trainer_state.json").get("global_step"))
        final = Checkpoint(step, run_dir, "peft", f"final (step {step})", final=True)
    return numbered, final


def discover_checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """Every checkpoint of a training run in ``run_dir``, sorted by step."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a directory (give the training run's output dir)")
    numbered, final = scan(run_dir)
    if not numbered:
        hint = ""
        if final is not None:
            hint = (
                f" (only a final {final.weights.name} is there: train with --save-every N to "
                "keep checkpoints, or test it alone with `sway-mlx eval`)"
            )
        elif any(PEFT_CHECKPOINT_RE.match(d.name) for d in run_dir.iterdir() if d.is_dir()):
            hint = f" (its checkpoint-N/ dirs hold no {PEFT_WEIGHTS}: a full fine-tune, not LoRA?)"
        raise CheckpointError(f"no checkpoints in {run_dir}: looked for {LOOKED_FOR}{hint}")
    if final is not None and not same_content(final.weights, numbered[-1].weights):
        numbered.append(final)
    return numbered


# ------------------------------------------------------------------ evaluation
@dataclass
class CheckpointRow:
    step: int
    label: str
    divergence: float | None
    """delta_kl's raw metric: mean next-token JS divergence from the base, in nats."""
    z: float | None
    null_mean: float | None
    null_std: float | None
    verdict: Verdict
    message: str
    path: str = ""
    effect_ratio: float | None = None
    duration_s: float = 0.0
    key: str = ""
    null_n: int | None = None
    """How many null draws the z stands on (for showing it honestly)."""
    held_out: dict[str, str] = field(default_factory=dict)
    """Verdicts of the held-out probes (what the base knew), by probe name."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdict"] = self.verdict.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointRow:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["verdict"] = Verdict(known["verdict"])
        return cls(**known)


def error_row(ckpt: Checkpoint, message: str, duration_s: float = 0.0) -> CheckpointRow:
    return CheckpointRow(
        ckpt.step,
        ckpt.label,
        None,
        None,
        None,
        None,
        Verdict.ERROR,
        message,
        path=str(ckpt.path),
        duration_s=duration_s,
        key=ckpt.key,
    )


def row_from_result(ckpt: Checkpoint, result: SuiteResult, duration_s: float) -> CheckpointRow:
    dk = next((p for p in result.probes if p.kind == "delta_kl"), None)
    if dk is None:  # preflight refused the adapter (NaN weights, broken logits)
        bad = next((p for p in result.probes if p.verdict is Verdict.ERROR), None)
        return error_row(ckpt, bad.message if bad else "delta_kl did not run", duration_s)
    null = dk.null
    held_out = {p.name: p.verdict.value for p in result.probes if p.category == HELD_OUT_CATEGORY}
    return CheckpointRow(
        ckpt.step,
        ckpt.label,
        dk.raw,
        dk.z,
        null.mean if null else None,
        null.std if null else None,
        dk.verdict,
        dk.message,
        path=str(ckpt.path),
        effect_ratio=dk.effect_ratio,
        duration_s=duration_s,
        key=ckpt.key,
        null_n=null.n if null else None,
        held_out=held_out,
    )


# ------------------------------------------------------------------ summary
@dataclass
class Regression:
    step: int
    label: str
    reason: str


@dataclass
class TrajectorySummary:
    first_pass: CheckpointRow | None
    best: CheckpointRow | None
    regressions: list[Regression] = field(default_factory=list)
    """Checkpoints where a held-out probe failed after passing before: the base's knowledge lost."""
    last: CheckpointRow | None = None
    line: str = ""
    below_noise: list[CheckpointRow] = field(default_factory=list)
    """Checkpoints after the first pass that are no longer above noise (not a regression)."""

    @property
    def last_passes(self) -> bool:
        return self.last is not None and self.last.verdict is Verdict.PASS


def _z(row: CheckpointRow) -> str:
    return "no z" if row.z is None else f"z={format_z(row.z, row.null_n)}"


def effect_text(row: CheckpointRow) -> str:
    """The checkpoint's effect as the ranking reads it: a multiple of its nulls, else nats."""
    if row.effect_ratio is not None:
        return f"{row.effect_ratio:.3g}× a random adapter of its size"
    return "no effect measured" if row.divergence is None else f"{row.divergence:.3g} nats"


def _rank(row: CheckpointRow) -> tuple[bool, bool, float]:
    """Best first: kept what the base knew, above noise, then the largest effect.

    Not z: with norm-matched nulls z falls as the effect grows (the nulls grow with the
    adapter's norm), so the checkpoint with the highest z is often an early, weak one.
    """
    kept = all(v != Verdict.FAIL.value for v in row.held_out.values())
    effect = row.effect_ratio if row.effect_ratio is not None else (row.divergence or 0.0)
    return kept, row.verdict is Verdict.PASS, effect


def held_out_regressions(rows: Sequence[CheckpointRow]) -> list[Regression]:
    """A held-out probe that FAILs at a checkpoint after it passed (or warned) at an earlier one."""
    found: list[Regression] = []
    held: set[str] = set()  # probes that have not failed so far
    for r in rows:
        failed = [
            name for name, v in r.held_out.items() if v == Verdict.FAIL.value and name in held
        ]
        if failed:
            found.append(
                Regression(r.step, r.label, f"{', '.join(sorted(failed))} got worse (FAIL)")
            )
        held |= {
            name for name, v in r.held_out.items() if v in (Verdict.PASS.value, Verdict.WARN.value)
        }
        held -= set(failed)
    return found


def effect_trend(rows: Sequence[CheckpointRow]) -> str:
    """The adapter's effect over the run, plainly: first and last divergence and the direction."""
    measured = [(r.label, r.divergence) for r in rows if r.divergence is not None]
    if len(measured) < 2:
        return ""
    (a, first), (b, last) = measured[0], measured[-1]
    direction = "rising" if last > first else "falling" if last < first else "flat"
    return f"effect {first:.3g} → {last:.3g} nats ({direction}, {a} → {b})"


def summarize(rows: Sequence[CheckpointRow]) -> TrajectorySummary:
    """First checkpoint above noise, the best, the effect's trend, and held-out regressions.

    With norm-matched nulls a z can fall while the effect grows (the null grows with the
    adapter's norm), so neither a falling z nor a lost pass is a regression: only a
    held-out probe that got worse is (the base's knowledge was lost).
    """
    rows = sorted(rows, key=lambda r: r.step)
    scored = [r for r in rows if r.verdict is not Verdict.ERROR]
    first = next((r for r in rows if r.verdict is Verdict.PASS), None)
    best = max(scored, key=_rank, default=None)
    regressions = held_out_regressions(rows)
    below = [
        r
        for r in rows
        if first is not None and r.step > first.step and r.verdict is not Verdict.PASS
    ]
    last = rows[-1] if rows else None
    if not rows:
        line = "no checkpoints evaluated"
    elif first is None:
        line = "no checkpoint rose above noise" + (
            f" (best: {best.label}, {effect_text(best)})" if best else ""
        )
    else:
        parts = [f"first above noise: {first.label} ({_z(first)})"]
        if best is not None and best is not first:
            parts.append(f"best: {best.label} ({effect_text(best)})")
        if trend := effect_trend(scored):
            parts.append(trend)
        parts.append(
            "regressed at " + ", ".join(g.label for g in regressions)
            if regressions
            else "no held-out regressions"
            if any(r.held_out for r in rows)
            else "no held-out probe ran"
        )
        parts.append(
            "the last checkpoint passes"
            if last and last.verdict is Verdict.PASS
            else "the last checkpoint does NOT pass"
        )
        line = "; ".join(parts)
    return TrajectorySummary(first, best, regressions, last, line, below)
