"""What a training run left to read: the adapter's record of it, and its data's splits.

``mlx_lm.lora`` records in the adapter's ``adapter_config.json`` the base (``model``) and
the data (``data``): a directory of ``train.jsonl``, ``valid.jsonl`` and ``test.jsonl``.
A PEFT run records its base (``base_model_name_or_path``) only; its data is given as such
a directory, a JSONL file, or a ``datasets`` dataset saved to disk. Rows are parsed only
when chosen (:class:`Split`), so a large ``train.jsonl`` costs a read, not a parse.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_NAME = "adapter_config.json"
SPLITS = ("train", "valid", "test")
HELD_OUT = ("valid", "test")
# A dataset saved by ``datasets``' save_to_disk names its validation split so.
HF_SPLIT_NAMES = {"validation": "valid"}
TRAIN_SLICE = 0.1
"""With no valid or test split, the prompts come from this last share of train."""


class TrainingDataError(ValueError):
    """Training data that cannot be read; the message names the file and the fix."""


class MissingPackageError(TrainingDataError):
    """The data needs a package that is not installed."""


@dataclass(frozen=True)
class Features:
    """The key of each format's field, as mlx-lm's options name them (``prompt_feature``...)."""

    prompt: str = "prompt"
    completion: str = "completion"
    chat: str = "messages"
    text: str = "text"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Features:
        given = {
            name: config[f"{name}_feature"]
            for name in ("prompt", "completion", "chat", "text")
            if isinstance(config.get(f"{name}_feature"), str)
        }
        return cls(**given)


@dataclass(frozen=True)
class RunRecord:
    """What an adapter's ``adapter_config.json`` says about its training run."""

    adapter_dir: Path
    base: str | None = None
    """mlx-lm's ``model``, or PEFT's ``base_model_name_or_path``."""
    data: str | None = None
    features: Features = field(default_factory=Features)


@dataclass
class Split:
    """One split's rows, parsed when chosen: a large train.jsonl costs a read, not a parse."""

    source: str
    rows: Sequence[Any]
    """(line number, JSON text) pairs of a JSONL file, or a ``datasets`` Dataset's rows."""

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, i: int) -> dict[str, Any]:
        raw = self.rows[i]
        if not isinstance(raw, tuple):
            return dict(raw)
        line, text = raw
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise TrainingDataError(
                f"{self.source}:{line}: not valid JSON ({e.msg}); fix the line"
            ) from None
        if not isinstance(value, dict):
            raise TrainingDataError(f"{self.source}:{line}: expected a JSON object per line")
        return value

    def where(self, i: int) -> str:
        raw = self.rows[i]
        return f"{self.source}:{raw[0]}" if isinstance(raw, tuple) else f"{self.source} row {i}"

    def part(self, start: int, stop: int | None, source: str) -> Split:
        return Split(source, self.rows[start:stop])


# ------------------------------------------------------------------ the run's record
def read_run_record(adapter_path: str | Path) -> RunRecord:
    """The record beside an adapter dir, or beside a checkpoint file; empty when unreadable."""
    path = Path(adapter_path).expanduser()
    adapter_dir = path if path.is_dir() else path.parent
    try:
        config = json.loads((adapter_dir / CONFIG_NAME).read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return RunRecord(adapter_dir)
    if not isinstance(config, dict):
        return RunRecord(adapter_dir)
    base = config.get("model") or config.get("base_model_name_or_path")
    data = config.get("data")
    return RunRecord(
        adapter_dir,
        base=base if isinstance(base, str) and base else None,
        data=data if isinstance(data, str) and data and not config.get("hf_dataset") else None,
        features=Features.from_config(config),
    )


def resolve_recorded_path(value: str, adapter_dir: Path, cwd: Path | None = None) -> Path | None:
    """A path the run recorded (its data, a local base): absolute as it is; relative,
    against the current directory (where ``mlx_lm.lora`` usually ran), then the adapter
    dir's parent (the run's directory). None when neither holds it."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path if path.exists() else None
    for root in (cwd or Path.cwd(), adapter_dir.parent):
        if (root / path).exists():
            return root / path
    return None


# ------------------------------------------------------------------ reading splits
def _jsonl_split(path: Path, source: str | None = None) -> Split:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise TrainingDataError(
            f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8"
        ) from None
    except OSError as e:
        raise TrainingDataError(f"{path}: cannot read the file: {e.strerror or e}") from None
    rows = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    return Split(source or str(path), rows)


def _is_saved_dataset(path: Path) -> bool:
    """A directory written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _saved_dataset_splits(path: Path) -> dict[str, Split]:
    try:
        datasets = importlib.import_module("datasets")
    except ImportError:
        raise MissingPackageError(
            f"{path} is a Hugging Face dataset saved to disk; reading it needs the datasets "
            "package: pip install datasets (or give the data as JSONL files)"
        ) from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # whatever the library raises, the file is what is wrong
        raise TrainingDataError(f"{path}: cannot read the saved dataset: {e}") from None
    if isinstance(loaded, datasets.DatasetDict):
        return {
            HF_SPLIT_NAMES.get(name, name): Split(f"{path} [{name}]", ds)
            for name, ds in loaded.items()
        }
    return {"file": Split(str(path), loaded)}


def read_splits(path: Path) -> dict[str, Split]:
    """``train``/``valid``/``test`` of a data dir or a saved dataset; ``file`` for one file."""
    if path.is_file():
        return {"file": _jsonl_split(path)}
    if _is_saved_dataset(path):
        return _saved_dataset_splits(path)
    found = {
        n: _jsonl_split(path / f"{n}.jsonl") for n in SPLITS if (path / f"{n}.jsonl").is_file()
    }
    if not found:
        raise TrainingDataError(
            f"{path} holds no train.jsonl, valid.jsonl or test.jsonl; give an mlx-lm data "
            "directory, a JSONL file, or a dataset saved with datasets' save_to_disk"
        )
    return found


def held_out(splits: dict[str, Split]) -> tuple[Split, Split]:
    """(the rows the prompts come from, the training rows)."""
    train = splits.get("train", splits.get("file"))
    if train is not None and not len(train):
        train = None
    for name in HELD_OUT:
        split = splits.get(name)
        if split is not None and len(split):
            return split, train or split
    if train is None:
        raise TrainingDataError("the data holds no rows; write at least one example")
    if "train" not in splits:  # one file: no split tells held-out rows from trained ones
        return train, train
    cut = len(train) - max(1, math.ceil(len(train) * TRAIN_SLICE))
    tail = (
        f"the last {len(train) - cut} rows of {train.source} "
        "(no valid or test split; the run may have trained on them)"
    )
    return train.part(cut, None, tail), train.part(0, cut, train.source) if cut else train
