"""One sweep worker: the base model loaded once, adapters evaluated one after another.

A :class:`SweepWorker` is what runs in each Ray actor (one per GPU, or per CPU worker)
and, without Ray, in the command's own process: the same code either way, so a sweep on
a cluster gives the numbers a one-process sweep gives. Its first adapter builds the
backend; every later one is swapped in with ``set_adapter`` (the base stays loaded and
its cached base-view results stay valid). Null statistics go through the content-keyed
null cache at ``job.null_cache``: a path every worker can reach shares them.

Every outcome is a plain dict (an :data:`Entry`), so it crosses a process boundary as
it is: the report ``eval --json`` writes, or the error that stopped this adapter.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from sway_common.app.platform import build_backend
from sway_common.backend.model_views import ModelViews
from sway_common.null_cache import NullCache
from sway_common.report.files import to_jsonable
from sway_common.report.headline import headline
from sway_common.suite.runner import run_suite
from sway_common.suite.spec import SuiteSpec

Entry = dict[str, Any]
"""One adapter's outcome: ``adapter``, ``name``, ``report`` (the ``eval --json`` payload)
or ``error``, ``seconds``, ``worker`` and ``attempts``."""


@dataclass
class SweepJob:
    """What every worker needs, picklable: the suite (its model block names the base), how
    to load the model, and where the shared null cache is."""

    spec: SuiteSpec
    backend: str = "auto"
    threshold: float | None = None
    null_cache: str | None = None
    """The null cache's directory (None: no cache)."""
    allow_pickle: bool = False
    trust_remote_code: bool = False


def adapter_names(paths: Sequence[str]) -> list[str]:
    """A short unique name per adapter: its directory name, or as many trailing path parts
    as it takes to tell it from the others (``lr1e-4/adapters``, ``lr3e-4/adapters``)."""
    parts = [PurePath(p).parts or (str(p),) for p in paths]
    for k in range(1, max(len(x) for x in parts) + 1):
        names = ["/".join(x[-k:]) for x in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def worker_label() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def error_entry(adapter: str, name: str, error: str, seconds: float = 0.0) -> Entry:
    return {
        "adapter": adapter,
        "name": name,
        "report": None,
        "error": error,
        "seconds": round(seconds, 3),
        "worker": worker_label(),
        "attempts": 1,
    }


class SweepWorker:
    """Evaluates adapters of one base model, the base loaded at the first and kept."""

    def __init__(self, job: SweepJob) -> None:
        self.job = job
        self.backend: ModelViews | None = None
        self.loads = 0
        self.cache = NullCache(job.null_cache) if job.null_cache else None

    def evaluate(self, adapter: str, name: str) -> Entry:
        """The suite on ``adapter``: its report, or the error that stopped it (never raises
        for a bad adapter: the next one still runs on this worker)."""
        start = time.perf_counter()
        loads = self.loads
        try:
            self._load(adapter)
            assert self.backend is not None
            result = run_suite(
                self.job.spec,
                backend=self.backend,
                threshold=self.job.threshold,
                null_cache=self.cache,
            )
        except Exception as e:  # one adapter's failure is its entry, not the sweep's end
            text = (str(e).strip().splitlines() or [""])[0]
            return error_entry(adapter, name, f"{type(e).__name__}: {text}", _since(start))
        payload = to_jsonable({"headline": headline(result), **result.to_dict()})
        return {
            "adapter": adapter,
            "name": name,
            "report": payload,
            "error": None,
            "seconds": round(_since(start), 3),
            "worker": worker_label(),
            "attempts": 1,
            "loaded_base": self.loads > loads,
        }

    def _load(self, adapter: str) -> None:
        if self.backend is not None:
            self.backend.set_adapter(adapter)
            return
        assert self.job.spec.model is not None, "a sweep's suite names its base model"
        model = dataclasses.replace(self.job.spec.model, adapter=adapter)
        self.backend = build_backend(
            model,
            self.job.backend,
            allow_pickle=self.job.allow_pickle,
            trust_remote_code=self.job.trust_remote_code,
        )
        self.loads += 1

    def base_loads(self) -> int:
        return self.loads

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None


def _since(start: float) -> float:
    return time.perf_counter() - start


def run_local(
    job: SweepJob,
    adapters: Sequence[str],
    names: Sequence[str],
    on_start: Callable[[str], None],
    on_done: Callable[[Entry], None],
) -> int:
    """Every adapter in this process, one after another, the base loaded once; returns how
    many times the base loaded."""
    worker = SweepWorker(job)
    try:
        for adapter, name in zip(adapters, names, strict=True):
            on_start(name)
            entry = worker.evaluate(str(Path(adapter)), name)
            on_done(entry)
            if entry["report"] and entry["report"]["meta"].get("interrupted"):
                raise KeyboardInterrupt  # the suite kept what finished; the sweep stops here
    finally:
        worker.close()
    return worker.loads
