"""Files written whole or not at all: a temp file beside the target, fsynced, then renamed.

Reports, caches and histories all go through here, so an interrupted run or two runs
writing the same file at once never leave a half-written one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

PathLike = str | os.PathLike[str]


def atomic_write(path: PathLike, write: Callable[[IO[str]], object]) -> None:
    """Call ``write`` on a temp file beside ``path`` (what it returns is ignored), fsync it,
    then rename it over ``path``.

    On any exception the temp file is removed and a previous ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Keep the mode of the file being replaced; a new file gets 0o666 minus the umask,
    # which the kernel applies to os.open (mkstemp would force 0o600).
    try:
        mode = target.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = None
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform, so best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


@contextlib.contextmanager
def exclusive(lock_path: PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if needed): processes building the
    same cache entry wait for the first instead of repeating its work. Where ``fcntl`` is
    missing (Windows) it holds nothing; atomic publishing still keeps the result whole."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield
