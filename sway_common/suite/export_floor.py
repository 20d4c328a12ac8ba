"""export-check's noise floor: what storing a model the export's way does to a model that
carries a delta of the adapter's size but no learned direction.

For each of the run's null adapters (norm-matched, the draws the adapter's effect is
judged against), the floor's model is the loaded export with each adapted module's
weight replaced by ``Q(W_B + ΔN)``: the base weight plus the null's delta, stored the
way the export stores that module (its dtype; MLX affine bits and group size; a GGUF
type numpy can quantize; bitsandbytes' nf4/fp4/int8 by bitsandbytes' own quantizer),
read by :mod:`sway_common.weight_reader`. Every other module
is the export's own, so the floor carries all of the export's other rounding.

Where it is measured. The same rounding moves different models by different amounts: a
strong fine-tune stored 4-bit sits several times farther from itself than a null's model
(base + a null of the adapter's size) does from its own stored copy, nearly all of it
from the rounding of the weights the adapter does not touch (measured in
docs/export-check.md). So the floor is measured **at the fine-tune**: each adapted
module holds ``W_B + ΔW + (Q(W_B + ΔN) − (W_B + ΔN))``, the fine-tune's weight carrying
the rounding error storing the null's model left (never the adapter's own rounding,
which is what is judged: a format that rounds the delta away is not in the floor), and
the reference is the fine-tune ``F``. That needs a model that holds the values as given:
a bitsandbytes layer quantizes them again and a half-precision one rounds them, which
could round ``ΔW`` away as the export did; there the floor is measured at the null's
model instead, ``Q(W_B + ΔN)`` against the base with the null live (``B + N``). Per
prompt, with ``R`` the reference (``F`` or ``B + N``) and ``S`` the floor's model:

- next tokens: ``JS(R, S)``, the distance storage alone puts between a model and its
  stored copy;
- completions: ``lp_S − lp_R`` on the fine-tune's own completions, the shift in log-prob
  that the same storage gives (zero-mean noise lowers log-probs on average: log-sum-exp
  is convex).

At the fine-tune, the floor's models also read a next-token retention: they keep all of
the effect, so what they miss is what the format's noise costs the reading (near JS's
ln 2 bound noise cannot move a model farther from the base, so it reads as lost effect).
The export's retention is judged against it (:func:`~sway_common.suite.export_math.after_floor`).

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
from sway_common.suite.export_math import FLOOR_DRAWS, next_token_retention
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
    requantized_on_install: bool = False
    """Some adapted module is a bitsandbytes layer, which quantizes the values it is given
    again: the floor cannot be measured at the fine-tune (see the module docstring)."""

    def weights(self, spec: NullSpec, *, at_finetune: bool = False) -> dict[str, F32]:
        """``Q(W_B + ΔN)`` per adapted module for the null ``spec``: the values the export's
        storage keeps of it (its dtype; mlx's affine codes dequantized; a GGUF type;
        bitsandbytes' codes dequantized). ``at_finetune``: ``W_B + ΔW`` plus that storage's
        rounding error, ``Q(W_B + ΔN) − (W_B + ΔN)``: the fine-tune carrying the null's
        rounding."""
        assert self.adapter is not None and self.base is not None and self.export is not None
        factors = null_factors(self.adapter.modules, spec)
        out: dict[str, F32] = {}
        for name, module in sorted(self.adapter.modules.items()):
            w_b, _ = self.base.module_weight(name, module.shape)
            _, storage = self.export.module_weight(name, w_b.shape)
            a, b = factors[name]
            carried = w_b.astype(np.float64) + module.scale * (
                b.astype(np.float64) @ a.astype(np.float64)
            )
            stored = storage.requantize(carried)
            if at_finetune:
                own = module.scale * (module.b.astype(np.float64) @ module.a.astype(np.float64))
                stored = (w_b + own + (stored - carried)).astype(np.float32)
            out[name] = stored
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
    bnb = False
    for name, module in sorted(adapter.modules.items()):
        w_b, _ = base.module_weight(name, module.shape)
        _, storage = export.module_weight(name, w_b.shape)
        kinds.add(storage.describe())
        bnb = bnb or storage.kind == "bnb"
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
    return FloorModels(
        list(specs)[:FLOOR_DRAWS], adapter, base, export, "/".join(sorted(kinds)), "", bnb
    )


@dataclass(frozen=True)
class Floor:
    """One measure's floor: per null (rows) and prompt (columns)."""

    values: NDArray[np.float64]
    storage: str
    at: str = "fine-tune"
    """Where it was measured: ``fine-tune`` or ``null`` (a null's model, ``B + N``)."""
    kept: tuple[float, ...] = ()
    """Next tokens at the fine-tune: the retention each floor's model reads (it keeps
    all of the effect, so what it misses is what the format's noise costs the reading)."""

    @property
    def kept_mean(self) -> float | None:
        return float(np.mean(self.kept)) if self.kept else None

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


def floor_at_finetune(models: FloorModels, export: ModelViews) -> bool:
    """Whether the floor can be measured at the fine-tune: the export's layers must hold
    the floor's values as given (computed in float32, no bitsandbytes layer)."""
    return not models.requantized_on_install and export.runtime.dtype == "float32"


def measure_floor(
    backend: ModelViews,
    export: ModelViews,
    models: FloorModels,
    prompts: Sequence[str],
    completions: Sequence[str],
    top_k: int,
) -> tuple[Floor, Floor]:
    """(next-token JS floor, completion log-prob shift) over the floor's null draws
    (none: an export stored in float32, whose floor is 0), at the fine-tune where
    :func:`floor_at_finetune` allows, else at each null's model."""
    at_ft = floor_at_finetune(models, export)
    js_rows: list[list[float]] = [[0.0] * len(prompts)] if not models.specs else []
    shift_rows = [np.zeros(len(prompts))] if not models.specs else []
    reference = None
    kept: list[float] = []
    if at_ft and models.specs:
        with backend.as_finetuned() as ft:
            reference = (
                ft.next_token_dist_batch(prompts, top_k=top_k),
                logprobs_in(ft, prompts, completions),
            )
        with backend.as_base() as base:
            base_d = base.next_token_dist_batch(prompts, top_k=top_k)
        js_bf = [divergence(a, b, kind="js") for a, b in zip(base_d, reference[0], strict=True)]
    for spec in models.specs:
        weights = models.weights(spec, at_finetune=at_ft)
        if reference is not None:
            ref, ref_lp = reference
        else:
            with backend.open(ViewSpec("null", null=spec)) as live:
                ref = live.next_token_dist_batch(prompts, top_k=top_k)
                ref_lp = logprobs_in(live, prompts, completions)
        with export.weights_replaced(weights), export.as_base() as stored:
            got = stored.next_token_dist_batch(prompts, top_k=top_k)
            got_lp = logprobs_in(stored, prompts, completions)
        js_rows.append([divergence(a, b, kind="js") for a, b in zip(ref, got, strict=True)])
        shift_rows.append(np.asarray(got_lp, np.float64) - np.asarray(ref_lp, np.float64))
        if reference is not None:
            js_bs = [divergence(a, b, kind="js") for a, b in zip(base_d, got, strict=True)]
            kept.append(next_token_retention(js_bf, js_bs, js_rows[-1]).retention)
    at = "fine-tune" if at_ft else "null"
    return (
        Floor(np.asarray(js_rows, np.float64), models.storage, at, tuple(kept)),
        Floor(np.asarray(shift_rows, np.float64), models.storage, at),
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
        "at": floor.at,
        "retention": floor.kept_mean,
    }
