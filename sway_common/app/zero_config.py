"""`eval --adapter-path DIR` with nothing else: the base and the workload from the run.

The base comes from the adapter's ``adapter_config.json`` (``--model`` overrides it);
the prompts from the run's held-out data, its text becomes the doc of the doc probes
(:mod:`sway_common.suite.training_data`). One line says where the prompts came from.
Conversations are rendered once the model is loaded, through its own tokenizer
(:class:`RunOptions.prepare <sway_common.app.run.RunOptions>`): no second tokenizer load,
and no torch in an MLX run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape

from sway_common.app.options import err_console, fail, read_prompts
from sway_common.models import cache_root
from sway_common.suite.data_splits import (
    CONFIG_NAME,
    MissingPackageError,
    RunRecord,
    TrainingDataError,
    read_run_record,
    resolve_recorded_path,
)
from sway_common.suite.inputs import context_problem
from sway_common.suite.spec import ModelSpec, SuiteSpec, quick_suite
from sway_common.suite.training_data import (
    Workload,
    load_workload,
    plain,
    render_prompts,
    training_suite,
    write_doc,
)

Prepare = Callable[[Any, Any], str | None]
DATA_KINDS = "an mlx-lm data dir (train/valid/test.jsonl), a JSONL file, or a saved datasets dir"
DOC_NOTE = (
    "; its training text is the doc of leakage, section_internalization and "
    "style_fingerprint (reported, not gating)"
)


@dataclass
class QuickEval:
    """What a spec-less `eval` was given."""

    model: str | None
    adapter_paths: tuple[str, ...]
    prompts_file: str | None
    data: str | None
    runs: int
    seed: int


def say(line: str) -> None:
    err_console.print(escape(line), highlight=False, soft_wrap=True)


def quick_spec(q: QuickEval) -> tuple[SuiteSpec, Prepare]:
    """The quick suite, and the step that renders its prompts once the model is loaded
    and says where they came from (after every input passed its checks: a bad input
    stays one line)."""
    record = read_run_record(q.adapter_paths[0])
    said: list[str] = []
    model = ModelSpec(base=_base_model(q.model, record, said), adapter=q.adapter_paths[0])
    found = _workload(q, record)
    if not isinstance(found, Workload):
        prompts = read_prompts(q.prompts_file)
        said.append(
            _from_file(q, prompts) or f"prompts: the {len(prompts)} generic ones, since {found}"
        )
        return quick_suite(prompts, runs=q.runs, model=model), _sayer(said)
    doc = str(write_doc(found.doc, cache_root() / "training-text")) if found.doc else None
    note = DOC_NOTE if doc else "; the training rows hold no text to use as a doc"
    if q.prompts_file is not None:
        prompts = read_prompts(q.prompts_file)
        said.append(f"{_from_file(q, prompts)}; doc: the training text of {q.data}{note}")
        return training_suite(prompts, doc, runs=q.runs, model=model), _sayer(said)
    shown = [plain(p) for p in found.prompts]
    said.append(f"prompts: {found.describe()}{note}")
    return training_suite(shown, doc, runs=q.runs, model=model), _renderer(found, shown, said)


def _sayer(said: list[str]) -> Prepare:
    """Say ``said`` once the prompts passed the last check of an input, the context window."""

    def prepare(spec: SuiteSpec, backend: Any) -> str | None:
        if problem := context_problem(spec, backend):
            return problem
        for line in said:
            say(line)
        return None

    return prepare


def _from_file(q: QuickEval, prompts: list[str]) -> str:
    return f"prompts: {len(prompts)} from {q.prompts_file}" if q.prompts_file else ""


def _base_model(model: str | None, record: RunRecord, said: list[str]) -> str:
    if model:
        return model
    config = record.adapter_dir / CONFIG_NAME
    if record.base is None:
        fail(
            f"no --model given and {config} names no base model (mlx-lm's 'model', PEFT's "
            "'base_model_name_or_path'); pass --model"
        )
    # A local base recorded relative to where the run was started; else a Hub id.
    found = resolve_recorded_path(record.base, record.adapter_dir)
    base = str(found) if found is not None else record.base
    said.append(f"model: {base} (from {config})")
    return base


def _workload(q: QuickEval, record: RunRecord) -> Workload | str:
    """The training data's workload, or why the generic prompts stand in."""
    if q.data is not None:
        path = Path(q.data).expanduser()
        if not path.exists():
            fail(f"--data {q.data} does not exist; give {DATA_KINDS}")
        try:
            return load_workload(path, record.features, seed=q.seed)
        except TrainingDataError as e:
            fail(f"--data: {e}")
    if q.prompts_file is not None:
        return ""
    if record.data is None:
        return f"{record.adapter_dir} records no training data; pass --data or --prompts"
    recorded = resolve_recorded_path(record.data, record.adapter_dir)
    if recorded is None:
        return (
            f"the run's data {record.data!r} is in neither the current directory nor "
            f"{record.adapter_dir.parent}; pass --data or --prompts"
        )
    try:
        return load_workload(recorded, record.features, seed=q.seed)
    except MissingPackageError as e:
        fail(str(e))
    except TrainingDataError as e:
        return f"the run's data is unreadable: {e}"


def _renderer(workload: Workload, shown: list[str], said: list[str]) -> Prepare:
    """Put the prompts through the loaded model's chat template, in every probe that holds
    them; leave out any longer than its context window."""

    def prepare(spec: SuiteSpec, backend: Any) -> str | None:
        try:
            rendered = render_prompts(workload.prompts, getattr(backend, "tokenizer", None))
        except TrainingDataError as e:
            return str(e)
        fits = _fitting(rendered, backend)
        if not any(fits):
            return "no held-out prompt fits the model's context window; pass --prompts"
        swap = {s: r for s, r, ok in zip(shown, rendered, fits, strict=True) if ok}
        probe: Any  # the configs that hold prompts have no common class
        for probe in spec.probes:
            held = getattr(probe, "prompts", None)
            if isinstance(held, list) and held and all(p in shown for p in held):
                probe.prompts = [swap[p] for p in held if p in swap]
        left_out = fits.count(False)
        tail = [f"{left_out} held-out prompts longer than the context window: left out"]
        return _sayer(said + tail if left_out else said)(spec, backend)

    return prepare


def _fitting(prompts: list[str], backend: Any) -> list[bool]:
    limit = getattr(backend, "prompt_limit", None)
    if not isinstance(limit, int) or limit < 1:
        return [True] * len(prompts)
    return [backend.token_count(p) <= limit for p in prompts]
