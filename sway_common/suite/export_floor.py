"""export-check's noise floor: what storing a model the export's way does to a model that
carries a delta of the adapter's size but no learned direction.

For each of the run's null adapters (norm-matched, the draws the adapter's effect is
judged against), the floor's model is the loaded export with each adapted module's
weight replaced by ``Q(W_B + ΔN)``: the base weight plus the null's delta, stored the
way the export stores that module (its dtype; MLX affine bits and group size; a GGUF
type numpy can quantize; bitsandbytes' nf4/fp4/int8 by bitsandbytes' own quantizer),
read by :mod:`sway_common.weight_reader`. Every other module
is the export's own, so the floor carries all of the export's other rounding. Its
reference is the base with the null attached live (``B + N``). Per prompt:

- next tokens: ``JS(B+N, Q(B+N))``, the distance quantization alone puts between a
  model and its stored copy;
- completions: ``lp_Q(B+N) − lp_B+N`` on the fine-tune's own completions, the shift in
  log-prob that the same storage gives any model (zero-mean noise lowers log-probs on
  average: log-sum-exp is convex).

Re-quantizing an already-quantized base alone is nearly idempotent (no floor at all);
with the null's delta on it, what the format rounds away of a delta this size shows.
No floor: a DoRA adapter (its nulls are not a weight delta), a GGUF k-quant (numpy
cannot redo llama.cpp's quantizer; out of scope), or an export that is not a loaded
model of this package.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from sway_common.adapters import AdapterWeights
from sway_common.backend.model_views import ModelViews
from sway_common.backend.nulls import NullSpec, null_factors
from sway_common.backend.views import ViewSpec
from sway_common.divergence import divergence
from sway_common.probes.likelihood import logprobs_in
from sway_common.suite.export_math import FLOOR_DRAWS
from sway_common.weight_reader import WeightSource

F32 = NDArray[np.float32]
SPREAD = 2.0
"""The floor's upper bound: its mean plus this many standard deviations over nulls."""


@dataclass(frozen=True)
class FloorModels:
    """The floor's null draws and where their weights come from, or why there is none.

    Each draw's weights are built when asked (:meth:`weights`), one draw at a time: all
    of them at once would hold ``runs`` copies of every adapted weight.
    """

    specs: list[NullSpec] = field(default_factory=list)
    adapter: AdapterWeights | None = None
    base: WeightSource | None = None
    export: WeightSource | None = None
    storage: str = ""
    missing: str = ""
    """Why there is no floor (empty when there is one)."""

    def weights(self, spec: NullSpec) -> dict[str, F32]:
        """``Q(W_B + ΔN)`` per adapted module for the null ``spec``: the values the export's
        storage keeps of it (its dtype; mlx's affine codes dequantized; a GGUF type;
        bitsandbytes' codes dequantized)."""
        assert self.adapter is not None and self.base is not None and self.export is not None
        factors = null_factors(self.adapter.modules, spec)
        out: dict[str, F32] = {}
        for name, module in sorted(self.adapter.modules.items()):
            w_b, _ = self.base.module_weight(name, module.shape)
            _, storage = self.export.module_weight(name, w_b.shape)
            a, b = factors[name]
            delta = module.scale * (b.astype(np.float64) @ a.astype(np.float64))
            out[name] = storage.requantize(w_b.astype(np.float64) + delta)
        return out


def floor_models(
    adapter: AdapterWeights,
    base: WeightSource,
    export: WeightSource,
    specs: Sequence[NullSpec],
) -> FloorModels:
    """The floor for these nulls, or a :class:`FloorModels` saying why there is none.
    Checks every adapted module's storage can be redone (reads their weights once)."""
    if adapter.dora:
        return FloorModels(missing="no noise floor for a DoRA adapter (its nulls are LoRA)")
    kinds: set[str] = set()
    exact = True
    for name, module in sorted(adapter.modules.items()):
        w_b, _ = base.module_weight(name, module.shape)
        _, storage = export.module_weight(name, w_b.shape)
        kinds.add(storage.describe())
        exact = exact and storage.kind == "float" and storage.dtype == "float32"
        try:
            storage.requantize(w_b[:1])
        except NotImplementedError:
            return FloorModels(
                missing=f"no noise floor for {storage.describe()}: it needs llama.cpp's "
                "quantizer (k-quants are out of scope)"
            )
    if exact:  # float32 stores W_B + ΔN as it is: a floor of 0, no forward needed
        return FloorModels([], adapter, base, export, "float32")
    return FloorModels(list(specs)[:FLOOR_DRAWS], adapter, base, export, "/".join(sorted(kinds)))


@dataclass(frozen=True)
class Floor:
    """One measure's floor: per null (rows) and prompt (columns)."""

    values: NDArray[np.float64]
    storage: str

    @property
    def per_prompt(self) -> list[float]:
        return [float(x) for x in self.values.mean(axis=0)]

    @property
    def mean(self) -> float:
        """Mean per prompt, averaged over nulls."""
        return float(self.values.mean())

    @property
    def spread(self) -> float:
        """Standard deviation over nulls of each null's mean per prompt."""
        rows = self.values.mean(axis=1)
        return float(rows.std(ddof=1)) if rows.size > 1 else 0.0

    @property
    def upper(self) -> float:
        return self.mean + SPREAD * self.spread


def measure_floor(
    backend: ModelViews,
    export: ModelViews,
    models: FloorModels,
    prompts: Sequence[str],
    completions: Sequence[str],
    top_k: int,
) -> tuple[Floor, Floor]:
    """(next-token JS floor, completion log-prob shift) over the floor's null draws
    (none: an export stored in float32, whose floor is 0)."""
    js_rows: list[list[float]] = [[0.0] * len(prompts)] if not models.specs else []
    shift_rows = [np.zeros(len(prompts))] if not models.specs else []
    for spec in models.specs:
        weights = models.weights(spec)
        with backend.open(ViewSpec("null", null=spec)) as live:
            ref = live.next_token_dist_batch(prompts, top_k=top_k)
            ref_lp = logprobs_in(live, prompts, completions)
        with export.weights_replaced(weights), export.as_base() as stored:
            got = stored.next_token_dist_batch(prompts, top_k=top_k)
            got_lp = logprobs_in(stored, prompts, completions)
        js_rows.append([divergence(a, b, kind="js") for a, b in zip(ref, got, strict=True)])
        shift_rows.append(np.asarray(got_lp, np.float64) - np.asarray(ref_lp, np.float64))
    return (
        Floor(np.asarray(js_rows, np.float64), models.storage),
        Floor(np.asarray(shift_rows, np.float64), models.storage),
    )


def floor_evidence(floor: Floor | None) -> dict[str, object] | None:
    """A floor for the JSON report (None: none measured)."""
    if floor is None:
        return None
    return {
        "mean": floor.mean,
        "spread": floor.spread,
        "upper": floor.upper,
        "per_prompt": floor.per_prompt,
        "runs": int(floor.values.shape[0]),
        "storage": floor.storage,
    }
