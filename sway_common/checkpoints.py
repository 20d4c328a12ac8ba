"""Training checkpoints as a trajectory: find them, test each against its null, summarise.

Two layouts are understood:

- mlx-lm (``--save-every N``): ``NNNNNNN_adapters.safetensors`` files beside one
  ``adapter_config.json``, plus the final ``adapters.safetensors``. mlx-lm rewrites the
  final file at every save, so it is a point of its own only when its content differs
  from the highest numbered checkpoint (training stopped between saves).
- PEFT / HF Trainer: ``checkpoint-N/`` dirs holding ``adapter_config.json`` and
  ``adapter_model.safetensors``; a top-level ``adapter_model.safetensors`` (``save_model``
  into the output dir) is the final point under the same rule.

The base model is loaded once; each checkpoint is swapped in with ``set_adapter``, so
the base view's cached results stay valid across the whole trajectory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from sway_common import platform
from sway_common.report.files import format_z
from sway_common.spec import Defaults, ModelSpec, SuiteSpec
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
# A z this far below the best so far counts as a regression even while still passing.
REGRESSION_FRACTION = 0.5


class CheckpointError(ValueError):
    """No usable checkpoints where the user pointed, or a layout we cannot read."""


class BackendBuildError(RuntimeError):
    """The base model could not be loaded: fatal for a trajectory, unlike one bad checkpoint."""


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
        from sway_common.adapter_files import load_safetensors

        ta, tb = load_safetensors(a), load_safetensors(b)
    except (OSError, ValueError):
        return False
    import numpy as np

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
        ckpt.step, ckpt.label, None, None, None, None, Verdict.ERROR, message,
        path=str(ckpt.path), duration_s=duration_s, key=ckpt.key,
    )


def row_from_result(ckpt: Checkpoint, result: SuiteResult, duration_s: float) -> CheckpointRow:
    dk = next((p for p in result.probes if p.kind == "delta_kl"), None)
    if dk is None:  # preflight refused the adapter (NaN weights, broken logits)
        bad = next((p for p in result.probes if p.verdict is Verdict.ERROR), None)
        return error_row(ckpt, bad.message if bad else "delta_kl did not run", duration_s)
    null = dk.null
    return CheckpointRow(
        ckpt.step, ckpt.label, dk.raw, dk.z, null.mean if null else None,
        null.std if null else None, dk.verdict, dk.message, path=str(ckpt.path),
        effect_ratio=dk.effect_ratio, duration_s=duration_s, key=ckpt.key,
    )


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


class CheckpointEvaluator:
    """Tests checkpoints one at a time against one loaded base model.

    The backend is built at the first checkpoint that reads cleanly; later ones are
    swapped in with ``set_adapter``. A checkpoint that fails to read, load or run gives
    an ERROR row; only a base model that cannot load raises (:class:`BackendBuildError`).
    """

    def __init__(
        self, *, model: str, backend: str = "auto", prompts: Sequence[str], runs: int = 8,
        seed: int = 0,
    ) -> None:
        from sway_common.probes.delta_kl import DeltaKLConfig
        from sway_common.probes.null_adapter import NullAdapterConfig

        self.model, self.backend_kind = model, backend
        self.spec = SuiteSpec(
            probes=[
                NullAdapterConfig(name="null_baseline", kind="null_adapter", runs=runs, prompts=list(prompts)),
                DeltaKLConfig(name="delta_kl", kind="delta_kl", prompts=list(prompts)),
            ],
            defaults=Defaults(seed=seed),
            source="checkpoint trajectory",
        )
        self.backend: Any = None
        self.builds = 0

    def __call__(
        self, ckpt: Checkpoint, on_probe: Callable[[str], None] | None = None
    ) -> CheckpointRow:
        from sway_common.adapters import read_adapter
        from sway_common.runner import run_suite

        start = time.perf_counter()
        try:
            # numpy only: a corrupt file never costs a model load or disturbs the backend.
            read_adapter(ckpt.path)
        except (OSError, ValueError) as e:
            return error_row(ckpt, f"cannot read the adapter: {_short(e)}")
        if self.backend is None:
            spec = ModelSpec(base=self.model, adapter=str(ckpt.path), kind=self.backend_kind)
            try:
                self.backend = platform.build_backend(spec, self.backend_kind)
            except Exception as e:
                raise BackendBuildError(f"cannot load {self.model} with {ckpt.path.name}: {_short(e)}") from e
            self.builds += 1
        else:
            try:
                self.backend.set_adapter(ckpt.path)
            except Exception as e:
                return error_row(ckpt, f"cannot load the adapter: {_short(e)}", time.perf_counter() - start)
        try:
            result = run_suite(
                self.spec, backend=self.backend,
                on_result=(lambda r: on_probe(r.name)) if on_probe else None,
            )
        except Exception as e:
            return error_row(ckpt, f"evaluation failed: {_short(e)}", time.perf_counter() - start)
        if result.meta.get("interrupted"):
            raise KeyboardInterrupt  # an unfinished checkpoint must not be recorded
        return row_from_result(ckpt, result, time.perf_counter() - start)

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if callable(close):
            close()
        self.backend = None


def evaluate_checkpoints(
    run_dir: str | Path,
    *,
    model: str,
    backend: str = "auto",
    prompts: Sequence[str],
    runs: int = 8,
    seed: int = 0,
    on_row: Callable[[CheckpointRow], None] | None = None,
    on_status: Callable[[Checkpoint, str], None] | None = None,
    checkpoints: Sequence[Checkpoint] | None = None,
) -> list[CheckpointRow]:
    """One :class:`CheckpointRow` per checkpoint in ``run_dir``, in step order.

    ``on_status(ckpt, what)`` hears "loading" and each finished probe's name, for a
    progress display; ``checkpoints`` skips discovery when the caller already did it.
    """
    ckpts = list(checkpoints) if checkpoints is not None else discover_checkpoints(run_dir)
    evaluator = CheckpointEvaluator(model=model, backend=backend, prompts=prompts, runs=runs, seed=seed)
    rows: list[CheckpointRow] = []
    try:
        for ckpt in ckpts:
            if on_status is not None:
                on_status(ckpt, "loading")
            note = (lambda name, c=ckpt: on_status(c, name)) if on_status else None
            rows.append(evaluator(ckpt, note))
            if on_row is not None:
                on_row(rows[-1])
    finally:
        evaluator.close()
    return rows


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
    last: CheckpointRow | None = None
    line: str = ""

    @property
    def last_passes(self) -> bool:
        return self.last is not None and self.last.verdict is Verdict.PASS


def _z(z: float | None) -> str:
    return "no z" if z is None else f"z={format_z(z)}"


def summarize(rows: Sequence[CheckpointRow]) -> TrajectorySummary:
    """First checkpoint above noise, the best, and regressions after the first pass.

    A regression is a later checkpoint that no longer passes, or whose z fell below
    half of the best z seen before it (still significant, but losing what it learned).
    """
    rows = sorted(rows, key=lambda r: r.step)
    scored = [r for r in rows if r.verdict is not Verdict.ERROR]
    first = next((r for r in rows if r.verdict is Verdict.PASS), None)
    best = max(
        scored,
        key=lambda r: (r.z is not None, r.z if r.z is not None else (r.divergence or 0.0)),
        default=None,
    )
    regressions: list[Regression] = []
    peak: CheckpointRow | None = None  # highest z so far, before the row being judged
    for r in rows:
        if first is not None and r.step > first.step:
            if r.verdict is not Verdict.PASS:
                regressions.append(Regression(r.step, r.label, f"{r.verdict.value}: {r.message}"))
            elif peak is not None and r.z is not None and r.z < REGRESSION_FRACTION * peak.z:
                reason = f"z fell from {peak.z:+.1f}σ ({peak.label}) to {r.z:+.1f}σ"
                regressions.append(Regression(r.step, r.label, reason))
        if r.z is not None and r.verdict is not Verdict.ERROR and (peak is None or r.z > peak.z):
            peak = r
    last = rows[-1] if rows else None
    if not rows:
        line = "no checkpoints evaluated"
    elif first is None:
        line = "no checkpoint rose above noise" + (f" (best: {best.label}, {_z(best.z)})" if best else "")
    else:
        parts = [f"first above noise: {first.label} ({_z(first.z)})"]
        if best is not None and best is not first:
            parts.append(f"best: {best.label} ({_z(best.z)})")
        parts.append("regressed at " + ", ".join(g.label for g in regressions) if regressions else "no regressions")
        parts.append("the last checkpoint passes" if last and last.verdict is Verdict.PASS
                     else "the last checkpoint does NOT pass")
        line = "; ".join(parts)
    return TrajectorySummary(first, best, regressions, last, line)
