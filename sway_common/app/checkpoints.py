"""Evaluate a run's checkpoints against one loaded base model.

The base model is loaded once; each checkpoint is swapped in with ``set_adapter``, so
the base view's cached results stay valid across the whole trajectory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sway_common.adapters import read_adapter
from sway_common.app import platform
from sway_common.backend.model_views import ModelViews
from sway_common.probes.delta_kl import DeltaKLConfig
from sway_common.probes.null_adapter import NullAdapterConfig
from sway_common.suite.runner import run_suite
from sway_common.suite.spec import Defaults, ModelSpec, SuiteSpec
from sway_common.suite.trajectory import (
    Checkpoint,
    CheckpointRow,
    discover_checkpoints,
    error_row,
    row_from_result,
)


class BackendBuildError(RuntimeError):
    """The base model could not be loaded: fatal for a trajectory, unlike one bad checkpoint."""


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


@dataclass(frozen=True)
class CheckpointSetup:
    """How every checkpoint of a run is measured: the base model and the backend it loads
    on, the prompts, the null adapters drawn (``runs``) and their seed, and whether loading
    may read pickles or run a model's own code."""

    model: str
    prompts: Sequence[str]
    backend: str = "auto"
    runs: int = 8
    seed: int = 0
    allow_pickle: bool = False
    trust_remote_code: bool = False
    device_map: str | None = None
    max_memory: dict[str, str] | None = None
    """Where the base model's weights go (``--device-map``/``--max-memory``)."""
    dtype: str = "auto"
    """The precision it runs in (``--dtype``)."""


class CheckpointEvaluator:
    """Tests checkpoints one at a time against one loaded base model.

    The backend is built at the first checkpoint that reads cleanly; later ones are
    swapped in with ``set_adapter``. A checkpoint that fails to read, load or run gives
    an ERROR row; only a base model that cannot load raises (:class:`BackendBuildError`).
    """

    def __init__(self, setup: CheckpointSetup) -> None:
        self.setup = setup
        prompts = setup.prompts
        self.spec = SuiteSpec(
            probes=[
                NullAdapterConfig(
                    name="null_baseline", kind="null_adapter", runs=setup.runs, prompts=[*prompts]
                ),
                DeltaKLConfig(name="delta_kl", kind="delta_kl", prompts=[*prompts]),
            ],
            defaults=Defaults(seed=setup.seed),
            source="checkpoint trajectory",
        )
        self.backend: ModelViews | None = None
        self.builds = 0

    def __call__(
        self, ckpt: Checkpoint, on_probe: Callable[[str], None] | None = None
    ) -> CheckpointRow:
        start = time.perf_counter()
        setup = self.setup
        try:
            # numpy only: a corrupt file never costs a model load or disturbs the backend.
            read_adapter(ckpt.path, allow_pickle=setup.allow_pickle)
        except (OSError, ValueError) as e:
            return error_row(ckpt, f"cannot read the adapter: {_short(e)}")
        if self.backend is None:
            spec = ModelSpec(
                base=setup.model,
                adapter=str(ckpt.path),
                kind=setup.backend,
                device_map=setup.device_map,
                max_memory=setup.max_memory,
                dtype=setup.dtype,
            )
            try:
                self.backend = platform.build_backend(
                    spec,
                    setup.backend,
                    allow_pickle=setup.allow_pickle,
                    trust_remote_code=setup.trust_remote_code,
                )
            except Exception as e:
                raise BackendBuildError(
                    f"cannot load {setup.model} with {ckpt.path.name}: {_short(e)}"
                ) from e
            self.builds += 1
        else:
            try:
                self.backend.set_adapter(ckpt.path)
            except Exception as e:
                return error_row(
                    ckpt, f"cannot load the adapter: {_short(e)}", time.perf_counter() - start
                )
        try:
            result = run_suite(
                self.spec,
                backend=self.backend,
                on_result=(lambda r: on_probe(r.name)) if on_probe else None,
            )
        except Exception as e:
            return error_row(ckpt, f"evaluation failed: {_short(e)}", time.perf_counter() - start)
        if result.meta.get("interrupted"):
            raise KeyboardInterrupt  # an unfinished checkpoint must not be recorded
        return row_from_result(ckpt, result, time.perf_counter() - start)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
        self.backend = None


def evaluate_checkpoints(
    run_dir: str | Path,
    setup: CheckpointSetup,
    *,
    on_row: Callable[[CheckpointRow], None] | None = None,
    on_status: Callable[[Checkpoint, str], None] | None = None,
    checkpoints: Sequence[Checkpoint] | None = None,
) -> list[CheckpointRow]:
    """One :class:`CheckpointRow` per checkpoint in ``run_dir``, in step order.

    ``on_status(ckpt, what)`` hears "loading" and each finished probe's name, for a
    progress display; ``checkpoints`` skips discovery when the caller already did it.
    """
    ckpts = list(checkpoints) if checkpoints is not None else discover_checkpoints(run_dir)
    evaluator = CheckpointEvaluator(setup)
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
