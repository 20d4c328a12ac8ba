"""Every input of a run checked before any model loads: outputs, model dir, adapters.

Each bad input ends the command with one line naming the problem and the fix (exit 2),
so a typo costs a second instead of a model load, and a run that could not write its
report is refused before it starts rather than after it finished.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

from sway_common.adapters import AdapterFormatError, read_adapter
from sway_common.app.options import fail
from sway_common.models import ModelFormatError, check_model_dir


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable(directory: Path) -> bool:
    """Can a file be created here? Tried, not inferred from mode bits (root ignores them)."""
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".sway-write-check-"):
            return True
    except OSError:
        return False


def check_output(path: str | None, option: str, *, directory: bool = False) -> None:
    """Refuse an output path that could not be written at the end of the run.

    Missing directories are fine (they are created when the report is written) as
    long as the nearest existing one is a directory that takes new files.
    """
    if not path:
        return
    target = Path(path).expanduser()
    if target.exists() and target.is_dir() != directory:
        kind = "a directory" if target.is_dir() else "a file"
        want = "a directory" if directory else "a file path"
        fail(f"{option} {path} is {kind}; give {want}")
    existing = _nearest_existing(target if directory else target.parent)
    if not existing.is_dir():
        fail(
            f"cannot write {option} {path}: {existing} is a file, not a directory; choose another path"
        )
    if not _writable(existing):
        fail(
            f"cannot write {option} {path}: the directory {existing} is not writable; choose another one"
        )


def check_outputs(reports: dict[str, str | None], plot_dir: str | None) -> None:
    for kind, path in reports.items():
        check_output(path, f"--{kind}")
    check_output(plot_dir, "--plot", directory=True)


def check_model(model: str, *, allow_pickle: bool) -> None:
    """A local model dir is checked now; a hub id when it is resolved (it may download)."""
    path = Path(model).expanduser()
    if path.is_file():
        fail(f"model {model} is a file; point at the model directory (config.json + *.safetensors)")
    if not path.is_dir():
        if path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1:
            fail(
                f"model directory {model} does not exist; check the path or give a Hugging Face id"
            )
        return
    if not (path / "config.json").is_file():
        fail(f"{model} has no config.json; point at a Hugging Face model directory")
    try:
        check_model_dir(path, allow_pickle=allow_pickle)
    except ModelFormatError as e:
        fail(str(e))


def check_adapter_paths(paths: Iterable[str]) -> None:
    """Each adapter path exists (what it holds is ``check_adapters``' to judge)."""
    for path in paths:
        if not Path(path).exists():
            fail(f"adapter path {path} does not exist; give an adapter dir or checkpoint file")


def check_adapters(paths: Iterable[str], *, allow_pickle: bool) -> None:
    """Each adapter read (format, pickles, tuner) and refused if it holds NaN or Inf."""
    for path in paths:
        try:
            weights = read_adapter(path, allow_pickle=allow_pickle)
        except AdapterFormatError as e:
            fail(str(e).splitlines()[0])
        bad = weights.nonfinite_tensors()
        if bad:
            shown = ", ".join(bad[:2]) + (f" (+{len(bad) - 2} more)" if len(bad) > 2 else "")
            fail(
                f"adapter {path} holds NaN/Inf in {shown}: its training diverged; "
                "use an earlier checkpoint or retrain with a lower learning rate"
            )
