"""What a probe runs with: the backend, the null calibration, and the null measurements.

:class:`RunContext` is handed to every :meth:`Probe.run`. A probe measures something
on ``ctx.backend`` (the real adapter), then asks the context to measure the same thing
under K seeded null adapters (:meth:`RunContext.null_stats_for`,
:meth:`RunContext.null_per_prompt`) to judge it against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sway_common.backend.nulls import CALIBRATION_MODE, DEFAULT_INIT_SCALE, NullSpec
from sway_common.backend.views import ViewSpec
from sway_common.null_cache import NullCache
from sway_common.protocols import (
    DescribedBackend,
    DifferentialBackend,
    NullCalibratedBackend,
    NullMode,
)
from sway_common.stats import null_stats
from sway_common.types import NullStats

from .null_proxy import NullCalibrationBackendProxy
from .views import StackedViewsBackend


@dataclass(frozen=True)
class NullCalibration:
    """Which null adapters a run draws: ``runs`` seeds from ``seed_base``, each a
    :class:`NullSpec` at ``init_scale`` in ``mode``, at every rank multiplier."""

    runs: int = 8
    init_scale: float = DEFAULT_INIT_SCALE
    seed_base: int = 1000
    rank_multipliers: tuple[float, ...] = (1.0,)
    mode: NullMode = CALIBRATION_MODE
    calibrate_kinds: tuple[str, ...] = ()
    """Probe kinds to calibrate; empty means all calibrated kinds."""

    @property
    def seeds(self) -> list[int]:
        return [self.seed_base + i for i in range(self.runs)]

    def specs(self, rank_scale: float = 1.0) -> list[NullSpec]:
        """The nulls of this run at one rank scale, in seed order."""
        return [NullSpec(s, self.init_scale, rank_scale, self.mode) for s in self.seeds]


@dataclass(frozen=True)
class NextTokenDivergence:
    """A per-prompt next-token divergence between the base view and another.

    The measurement the stacked path serves: named by this type, a null calibration
    scores the base view and every null view of its prompts in shared batches first.
    """

    kind: str
    top_k: int
    prompts: tuple[str, ...]

    def key(self) -> tuple[Any, ...]:
        """Its name in the null cache: the same from two probes means the same numbers."""
        return ("next_token_divergence", self.kind, self.top_k, list(self.prompts))


Measurement = Sequence[Any] | NextTokenDivergence
"""What names a null measurement for the null cache (empty: not kept)."""


@dataclass
class RunContext:
    """Everything a probe run may use besides its own config.

    ``backend`` is the adapter under test; ``null`` how nulls are drawn (None when the
    backend cannot draw them: probes fall back to fixed thresholds); ``null_cache`` keeps
    null measurements across runs (None: every null forward is computed).
    """

    backend: DifferentialBackend
    seed: int = 0
    top_k: int = 256
    null: NullCalibration | None = None
    progress: Callable[[str], None] = field(default=lambda _msg: None)
    null_cache: NullCache | None = None

    def calibrates(self, kind: str) -> bool:
        if self.null is None or not isinstance(self.backend, NullCalibratedBackend):
            return False
        return not self.null.calibrate_kinds or kind in self.null.calibrate_kinds

    def null_stats_for(
        self,
        measure: Callable[[DifferentialBackend], float],
        rank_scale: float = 1.0,
        key: Measurement = (),
    ) -> NullStats:
        """Run ``measure`` under each null seed at one rank scale.

        ``key`` names the measurement (probe kind, prompts, options); with it, results
        are kept in the null cache across runs.
        """
        return null_stats([float(v) for v in self._under_nulls(measure, rank_scale, key)])

    def null_per_prompt(
        self,
        measure: Callable[[DifferentialBackend], Sequence[float]],
        rank_scale: float = 1.0,
        key: Measurement = (),
    ) -> tuple[NullStats, list[list[float]]]:
        """Run a per-prompt ``measure`` under each null seed: (stats of the means, K x P values)."""
        if isinstance(key, NextTokenDivergence):
            self._stack_null_views(rank_scale, key)
        rows = [list(map(float, r)) for r in self._under_nulls(measure, rank_scale, key)]
        return null_stats([sum(r) / len(r) for r in rows]), rows

    def _stack_null_views(self, rank_scale: float, request: NextTokenDivergence) -> None:
        """Score the base view and every uncached null of ``request`` at once.

        A backend with stacked views gives all of them in shared batches instead of
        K + 1 forwards, into its result cache, where the per-seed loop then finds them.
        """
        if self.null is None or not isinstance(self.backend, StackedViewsBackend):
            return
        views = [ViewSpec("base")]
        for null in self.null.specs(rank_scale):
            cache_key = self._cache_key(null, request)
            if cache_key and self.null_cache and self.null_cache.get(cache_key) is not None:
                continue  # kept from an earlier run: no forward at all
            views.append(ViewSpec("null", null=null))
        if len(views) > 1:
            self.progress(f"{len(views) - 1} null views stacked (rank×{rank_scale:g})")
            self.backend.next_token_dist_views(views, request.prompts, top_k=request.top_k)

    def _under_nulls(
        self, measure: Callable[[DifferentialBackend], Any], rank_scale: float, key: Measurement
    ) -> list[Any]:
        assert self.null is not None and isinstance(self.backend, NullCalibratedBackend)
        values = []
        for null in self.null.specs(rank_scale):
            cache_key = self._cache_key(null, key)
            cached = self.null_cache.get(cache_key) if cache_key and self.null_cache else None
            if cached is not None:
                values.append(cached)
                continue
            self.progress(f"null seed {null.seed} (rank×{rank_scale:g})")
            values.append(measure(NullCalibrationBackendProxy.of(self.backend, null)))
            if cache_key and self.null_cache:
                self.null_cache.put(cache_key, values[-1])
        return values

    def _cache_key(self, null: NullSpec, key: Measurement) -> str | None:
        measurement = key.key() if isinstance(key, NextTokenDivergence) else key
        if self.null_cache is None or not measurement:
            return None
        backend = self.backend
        info = dict(backend.info) if isinstance(backend, DescribedBackend) else {}
        return self.null_cache.key(info, null.draw(), measurement)
