"""calibration_drift: did the adapter make the model forget general knowledge?

For each general-knowledge item (a prompt and its gold answer: the built-in pack of items
written for sway-mlx, a JSONL ``pack`` file, and the spec's own ``items``) the change in
log p(gold | prompt) from the base to the fine-tuned view. A gating regression FAILs when
more than ``assert_fraction_regressed_lt`` of the items lost over ``regression_nats`` or
the mean change is below ``assert_mean_delta_gte``, or when the mean change is
significantly worse than random adapters of its size give (z against the nulls) and
worse than ``-tolerance``. Any other adapter PASSes, and the message says which it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sway_common.protocols import DifferentialBackend
from sway_common.types import ProbeResult

from .base import ProbeConfig, RunContext, register
from .likelihood import Regression, RegressionProbe, judge_regression, logprob_delta
from .packs import BUILTIN, Item, is_named_file, load_items, spread

WORST_SHOWN = 5


@dataclass
class CalibrationDriftConfig(ProbeConfig):
    pack: str = BUILTIN
    """``builtin``, ``none``, or a JSONL file of {"prompt", "gold"} objects."""
    items_limit: int | None = None
    """Use at most this many pack items, spread evenly over its topics."""
    items: list[tuple[str, str]] = field(default_factory=list)
    """Extra [prompt, gold] pairs, scored with the pack's."""
    regression_nats: float = 1.0
    assert_fraction_regressed_lt: float = 0.15
    assert_mean_delta_gte: float = -0.5
    assert_z_gte: float = 3.0
    tolerance: float = 0.1
    """Mean nats per item an adapter may lose beyond its nulls' without a FAIL."""
    min_effect: float = 1e-3
    """Mean |change| in nats below which the adapter is taken to leave the items alone."""


def selected_items(cfg: CalibrationDriftConfig) -> list[Item]:
    pack = spread(load_items(cfg.pack), cfg.items_limit)
    return pack + [Item(p, g, "user") for p, g in cfg.items]


@register
class CalibrationDriftProbe(RegressionProbe):
    kind = "calibration_drift"
    claim = "the adapter lost no general knowledge beyond what random adapters of its size lose, or a loss within the tolerance, and no absolute limit was crossed"
    Config = CalibrationDriftConfig

    def check(self, cfg: CalibrationDriftConfig) -> list[str]:
        problems = super().check(cfg)
        if is_named_file(cfg.pack):
            try:
                load_items(cfg.pack)
            except ValueError as e:
                problems.append(f"pack: {e}")
        elif not cfg.items and cfg.pack != BUILTIN:
            problems.append("items: with pack: none, give at least one [prompt, gold] item")
        if cfg.items_limit is not None and cfg.items_limit < 1:
            problems.append("items_limit: must be >= 1")
        if cfg.regression_nats <= 0:
            problems.append("regression_nats: must be > 0")
        if not 0 < cfg.assert_fraction_regressed_lt <= 1:
            problems.append("assert_fraction_regressed_lt: must lie in (0, 1]")
        if cfg.tolerance < 0:
            problems.append("tolerance: must be >= 0")
        return problems

    def run(self, cfg: CalibrationDriftConfig, ctx: RunContext) -> ProbeResult:
        items = selected_items(cfg)
        prompts, golds = [i.prompt for i in items], [i.gold for i in items]
        _, delta = logprob_delta(ctx.backend, prompts, golds)
        mean_delta = float(delta.mean())
        fraction = float(np.mean(delta < -cfg.regression_nats))

        problems = []
        if fraction >= cfg.assert_fraction_regressed_lt:
            problems.append(
                f"{fraction:.0%} of {len(items)} items lost > {cfg.regression_nats:g} nats "
                f"(limit {cfg.assert_fraction_regressed_lt:.0%})"
            )
        if mean_delta < cfg.assert_mean_delta_gte:
            problems.append(f"mean change {mean_delta:+.3g} nats < {cfg.assert_mean_delta_gte:g}")

        def measure(backend: DifferentialBackend) -> float:
            return float(logprob_delta(backend, prompts, golds)[1].mean())

        kept = (
            f"general knowledge kept: {fraction:.0%} of {len(items)} items lost > "
            f"{cfg.regression_nats:g} nats, mean change {mean_delta:+.3g} nats"
        )
        reg = Regression(
            mean_delta,
            problems,
            kept,
            float(np.abs(delta).mean()),
            "these items",
            " nats",
            min_effect=cfg.min_effect,
            z_min=cfg.assert_z_gte,
            tolerance=cfg.tolerance,
        )
        evidence = self._evidence(items, delta, fraction)
        return judge_regression(self, cfg, ctx, reg, measure, (prompts, golds), evidence)

    @staticmethod
    def _evidence(items: list[Item], delta: np.ndarray, fraction: float) -> dict[str, Any]:
        worst = np.argsort(delta)[:WORST_SHOWN]
        return {
            "items": len(items),
            "fraction_regressed": fraction,
            "mean_delta": float(delta.mean()),
            "per_item": [float(d) for d in delta],
            "worst": [
                {"prompt": items[i].prompt, "gold": items[i].gold, "delta": float(delta[i])}
                for i in worst
            ],
        }
