"""calibration_drift: did the adapter make the model forget general knowledge?

For each general-knowledge item (a prompt and its gold answer: the built-in pack of items
written for sway-mlx, a JSONL ``pack`` file, and the spec's own ``items``) the change in
log p(gold | prompt) from the base to the fine-tuned view. Only items the base knows (the
gold's first token among its top ``known_top_k`` next tokens) are judged: an adapter cannot
lose knowledge the base never had; the others are reported apart (count, mean change,
share that lost over ``regression_nats``), not judged. A gating regression FAILs when
more than ``assert_fraction_regressed_lt`` of the known items lost over ``regression_nats`` or
the mean change is below ``assert_mean_delta_gte``, or when the mean change is
significantly worse than random adapters of its size give (z against the nulls) and
worse than ``-tolerance``. Any other adapter PASSes, and the message says which it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sway_common.protocols import DifferentialBackend
from sway_common.types import ProbeResult, Verdict

from .base import ProbeConfig, RunContext, register
from .likelihood import (
    Regression,
    RegressionProbe,
    gold_in_top_k,
    judge_regression,
    logprob_delta,
)
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
    known_top_k: int = 5
    """An item is judged only when the base ranks its gold answer's first token among its
    top this-many next tokens (the base knows it); the others are reported apart."""


def selected_items(cfg: CalibrationDriftConfig) -> list[Item]:
    pack = spread(load_items(cfg.pack), cfg.items_limit)
    return pack + [Item(p, g, "user") for p, g in cfg.items]


@register
class CalibrationDriftProbe(RegressionProbe):
    kind = "calibration_drift"
    claim = "the adapter lost no general knowledge the base had (gold in its top k) beyond what random adapters of its size lose, or a loss within the tolerance, and no absolute limit was crossed"
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
        if cfg.known_top_k < 1:
            problems.append("known_top_k: must be >= 1")
        return problems

    def run(self, cfg: CalibrationDriftConfig, ctx: RunContext) -> ProbeResult:
        items = selected_items(cfg)
        prompts, golds = [i.prompt for i in items], [i.gold for i in items]
        known = gold_in_top_k(ctx.backend, prompts, golds, cfg.known_top_k)
        _, delta_all = logprob_delta(ctx.backend, prompts, golds)
        apart = self._apart(cfg, delta_all[~known])
        if not known.any():
            return self.result(
                cfg,
                Verdict.SKIP,
                score=None,
                message=(
                    f"not judged: the base ranks none of the {len(items)} gold answers in its "
                    f"top {cfg.known_top_k}, so it has no knowledge here to lose"
                ),
                evidence=self._evidence(items, delta_all, known, 0.0) | {"not_known": apart},
            )
        kept_items = [i for i, k in zip(items, known, strict=True) if k]
        kp, kg = [i.prompt for i in kept_items], [i.gold for i in kept_items]
        delta = delta_all[known]
        reg = self._regression(cfg, delta, len(items))

        def measure(backend: DifferentialBackend) -> float:
            return float(logprob_delta(backend, kp, kg)[1].mean())

        fraction = float(np.mean(delta < -cfg.regression_nats))
        evidence = self._evidence(items, delta_all, known, fraction) | {"not_known": apart}
        return judge_regression(self, cfg, ctx, reg, measure, (kp, kg), evidence)

    @staticmethod
    def _regression(cfg: CalibrationDriftConfig, delta: np.ndarray, total: int) -> Regression:
        """The known items' change, the absolute limits it broke, and how it reads kept."""
        mean_delta = float(delta.mean())
        fraction = float(np.mean(delta < -cfg.regression_nats))
        n = delta.size
        problems = []
        if fraction >= cfg.assert_fraction_regressed_lt:
            problems.append(
                f"{fraction:.0%} of {n} known items lost > {cfg.regression_nats:g} nats "
                f"(limit {cfg.assert_fraction_regressed_lt:.0%})"
            )
        if mean_delta < cfg.assert_mean_delta_gte:
            problems.append(f"mean change {mean_delta:+.3g} nats < {cfg.assert_mean_delta_gte:g}")
        others = f"; {total - n} the base does not know reported apart" if total > n else ""
        facts = (
            f"{fraction:.0%} of {n} items the base knows (gold in its top {cfg.known_top_k}) "
            f"lost > {cfg.regression_nats:g} nats, mean change {mean_delta:+.3g} nats{others}"
        )
        return Regression(
            mean_delta,
            problems,
            "general knowledge",
            facts,
            float(np.abs(delta).mean()),
            "these items",
            " nats",
            min_effect=cfg.min_effect,
            z_min=cfg.assert_z_gte,
            tolerance=cfg.tolerance,
        )

    @staticmethod
    def _apart(cfg: CalibrationDriftConfig, delta: np.ndarray) -> dict[str, Any]:
        """The items the base does not know: reported, not judged."""
        if delta.size == 0:
            return {"items": 0}
        return {
            "items": int(delta.size),
            "mean_delta": float(delta.mean()),
            "fraction_regressed": float(np.mean(delta < -cfg.regression_nats)),
        }

    @staticmethod
    def _evidence(
        items: list[Item], delta: np.ndarray, known: np.ndarray, fraction: float
    ) -> dict[str, Any]:
        """``delta`` and ``known`` cover every item; the worst shown are among the known."""
        ranked = [int(i) for i in np.argsort(delta) if known[i]]
        return {
            "items": len(items),
            "known_items": int(known.sum()),
            "fraction_regressed": fraction,
            "mean_delta": float(delta[known].mean()) if known.any() else None,
            "per_item": [float(d) for d in delta],
            "known": [bool(k) for k in known],
            "worst": [
                {"prompt": items[i].prompt, "gold": items[i].gold, "delta": float(delta[i])}
                for i in ranked[:WORST_SHOWN]
            ],
        }
