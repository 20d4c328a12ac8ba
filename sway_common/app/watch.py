"""Watch a training run and test every checkpoint as soon as it is safely on disk.

Trainers write checkpoints in place (mlx-lm calls ``mx.save_safetensors`` straight onto
the final name), so a file seen mid-write must neither crash the watch nor be judged.
A checkpoint is *ready* when its files' sizes and mtimes stayed the same over two polls
at least ``settle_s`` apart and its safetensors header promises exactly the bytes on
disk; one that stays unreadable for ``max_tries`` polls is recorded as an ERROR.

Every result is appended to a JSONL history (write, flush, fsync per line), which is
also the resume point: a restarted watch skips what the history already holds, and an
interrupted evaluation leaves no line, so it is simply redone.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sway_common.app.checkpoints import BackendBuildError, CheckpointEvaluator, CheckpointSetup
from sway_common.report.files import to_jsonable
from sway_common.suite.trajectory import (
    Checkpoint,
    CheckpointError,
    CheckpointRow,
    error_row,
    same_content,
    scan,
)
from sway_common.types import Verdict

Evaluate = Callable[[Checkpoint], CheckpointRow]
# Polls a settled but unreadable checkpoint is retried before it is recorded as ERROR; if its
# writer was only stalled, the completed file is tested again (its fingerprint changed).
DEFAULT_MAX_TRIES = 5


# ------------------------------------------------------------------ readiness
def weights_problem(ckpt: Checkpoint) -> str | None:
    """Why this checkpoint cannot be read yet (half-written, truncated), or None.

    Cheap: reads the config and the safetensors header, never the tensors. A complete
    file is exactly 8 + header length + the end offset of its last tensor.
    """
    try:
        cfg = json.loads(ckpt.config.read_text(encoding="utf-8"))
        if not isinstance(cfg, dict):
            return f"{ckpt.config.name} does not hold a JSON object"
        size = ckpt.weights.stat().st_size
        with open(ckpt.weights, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return f"{ckpt.weights.name} is shorter than a safetensors header"
            (n,) = struct.unpack("<Q", raw)
            if 8 + n > size:
                return f"{ckpt.weights.name}: its header runs past the end of the file"
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"
    if size != 8 + n + end:
        return f"{ckpt.weights.name} holds {size} bytes, its header promises {8 + n + end}"
    return None


def fingerprint(ckpt: Checkpoint) -> str | None:
    """Sizes and mtimes of a checkpoint's files; None while one of them is missing."""
    try:
        stats = [ckpt.weights.stat(), ckpt.config.stat()]
    except OSError:
        return None
    return "/".join(f"{s.st_size}:{s.st_mtime_ns}" for s in stats)


@dataclass
class _Seen:
    fingerprint: str
    since: float
    tries: int = 0


# ------------------------------------------------------------------ history
def _history_records(path: Path) -> Iterable[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []  # a first run; other read errors are the caller's to report
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line torn by a crash mid-write: that checkpoint is redone
        if isinstance(rec, dict) and rec.get("key") and rec.get("verdict") in Verdict.__members__:
            out.append(rec)
    return out


def read_history(path: str | Path) -> list[CheckpointRow]:
    """The rows of a history file, the latest line per checkpoint, sorted by step."""
    latest = {rec["key"]: rec for rec in _history_records(Path(path))}
    return sorted((CheckpointRow.from_dict(r) for r in latest.values()), key=lambda r: r.step)


def _history_index(path: Path) -> dict[str, str | None]:
    """key -> None (done), or the fingerprint an ERROR was recorded for: a checkpoint
    rewritten since its error is tried again."""
    return {
        rec["key"]: rec.get("fingerprint") if rec["verdict"] == Verdict.ERROR.value else None
        for rec in _history_records(path)
    }


def append_history(path: str | Path, row: CheckpointRow, fp: str | None = None) -> None:
    """Append one JSON line and make it durable before returning."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        **row.to_dict(),
        "fingerprint": fp,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    line = json.dumps(to_jsonable(record), allow_nan=False).encode("utf-8") + b"\n"
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line  # finish a torn line so ours stays parseable
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------ the loop
def _pending(run_dir: Path, done: dict[str, str | None]) -> list[Checkpoint]:
    """Checkpoints not yet recorded (or recorded as ERROR and rewritten since)."""
    try:
        numbered, final = scan(run_dir)
    except (OSError, CheckpointError):
        return []  # a run dir being created or cleaned up: look again next poll

    def todo(c: Checkpoint) -> bool:
        try:
            key = c.key
        except OSError:
            return False
        return key not in done or (done[key] is not None and done[key] != fingerprint(c))

    out = [c for c in numbered if todo(c)]
    # mlx-lm writes the final file just before each numbered checkpoint: consider it only
    # once every numbered one is recorded, and only if it differs from the highest of them.
    if (
        final is not None
        and not out
        and todo(final)
        and (not numbered or not same_content(final.weights, numbered[-1].weights))
    ):
        out.append(final)
    return out


def watch(
    run_dir: str | Path,
    setup: CheckpointSetup,
    *,
    history: str | Path,
    poll_s: float = 2.0,
    settle_s: float | None = None,
    stop: Callable[[], bool] | None = None,
    max_checkpoints: int | None = None,
    max_tries: int = DEFAULT_MAX_TRIES,
    evaluate: Evaluate | None = None,
    on_row: Callable[[CheckpointRow], None] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> list[CheckpointRow]:
    """Test each new checkpoint in ``run_dir`` as training writes it; return this session's rows.

    Ends when ``stop()`` returns true, after ``max_checkpoints`` rows, or on Ctrl-C
    (KeyboardInterrupt is absorbed: every finished row is already in the history).
    ``settle_s`` defaults to ``poll_s``. ``evaluate`` replaces the real evaluation (a
    :class:`CheckpointEvaluator` of ``setup``, whose backend is built at the first ready
    checkpoint). Only a base model that cannot load (:class:`BackendBuildError`) ends the
    watch with an error.
    """
    run_dir, history = Path(run_dir).expanduser(), Path(history).expanduser()
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a directory (give the training run's output dir)")
    settle = poll_s if settle_s is None else settle_s
    status = on_status or (lambda _msg: None)
    done = _history_index(history)
    evaluator = None
    if evaluate is None:
        evaluator = CheckpointEvaluator(setup)
        evaluate = evaluator
    seen: dict[str, _Seen] = {}
    rows: list[CheckpointRow] = []

    def finished() -> bool:
        return (stop is not None and stop()) or (
            max_checkpoints is not None and len(rows) >= max_checkpoints
        )

    def record(ckpt: Checkpoint, row: CheckpointRow, fp: str) -> None:
        row.key = row.key or ckpt.key
        append_history(history, row, fp)
        done[row.key] = fp if row.verdict is Verdict.ERROR else None
        rows.append(row)
        if on_row is not None:
            on_row(row)

    try:
        while not finished():
            for ckpt in _pending(run_dir, done):
                if finished():
                    break
                where, fp, now = str(ckpt.weights), fingerprint(ckpt), time.monotonic()
                s = seen.get(where)
                if fp is None:  # a file vanished between the scan and now
                    seen.pop(where, None)
                    continue
                if s is None or s.fingerprint != fp:
                    # New or still changing: the settle clock (re)starts now.
                    seen[where] = _Seen(fp, now)
                    status(f"{ckpt.label}: waiting for the file to settle")
                    continue
                if now - s.since < settle:
                    continue
                problem = weights_problem(ckpt)
                if problem is not None:
                    s.tries += 1
                    if s.tries < max_tries:
                        status(f"{ckpt.label}: not readable yet ({problem}); will retry")
                        continue
                    row = error_row(ckpt, f"unreadable after {s.tries} tries: {problem}")
                else:
                    status(f"{ckpt.label}: evaluating")
                    try:
                        row = evaluate(ckpt)
                    except BackendBuildError:
                        raise
                    except Exception as e:  # one bad checkpoint must not end the watch
                        row = error_row(ckpt, f"evaluation failed: {type(e).__name__}: {e}")
                seen.pop(where, None)
                record(ckpt, row, fp)
            if not finished():
                status(f"watching {run_dir} ({len(rows)} evaluated this session)")
                time.sleep(poll_s)
    except KeyboardInterrupt:
        status("interrupted: the history holds every finished checkpoint")
    finally:
        if evaluator is not None:
            evaluator.close()
    return rows
