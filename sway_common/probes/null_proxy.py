"""A backend stand-in whose "fine-tuned" view is a seeded null adapter.

Running an unchanged probe against it answers "what would this metric read if the
fine-tune were structural noise?", which is the denominator of the probe's z-score.

It forwards only the :class:`DifferentialBackend` surface on purpose: scaling a null
adapter means nothing, and a probe must not null-calibrate itself recursively.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sway_common.backend.nulls import DEFAULT_INIT_SCALE, NullSpec
from sway_common.protocols import NullCalibratedBackend, NullMode, ScoringModel


class NullCalibrationBackendProxy:
    """``as_base()`` is the real base; ``as_finetuned()`` is the null view for ``seed``.

    Entering ``as_finetuned()`` twice gives the same null view (same seed, same draw).
    """

    def __init__(
        self,
        inner: NullCalibratedBackend,
        *,
        seed: int,
        init_scale: float = DEFAULT_INIT_SCALE,
        rank_scale: float = 1.0,
        mode: NullMode = "fixed",
    ) -> None:
        self._inner = inner
        self.null = NullSpec(seed, init_scale, rank_scale, mode)

    @classmethod
    def of(cls, inner: NullCalibratedBackend, null: NullSpec) -> NullCalibrationBackendProxy:
        """The proxy whose fine-tuned view is ``null``."""
        return cls(inner, **null.draw())

    @contextmanager
    def as_base(self) -> Iterator[ScoringModel]:
        with self._inner.as_base() as view:
            yield view

    @contextmanager
    def as_finetuned(self) -> Iterator[ScoringModel]:
        null = self.null
        with self._inner.as_null_adapter(
            null.seed, init_scale=null.init_scale, rank_scale=null.rank_scale, mode=null.mode
        ) as view:
            yield view
