"""The pytest plugin (entry point ``pytest11``, name ``sway_mlx``): a sway suite as tests.

::

    @pytest.mark.sway_mlx(spec="sway.yaml", threshold=0.6)
    def test_adapter(sway_result):
        ...  # optional: more checks on the SuiteResult

The marked test anchors the suite. Next to it pytest collects one item per probe of the
spec, ``test_adapter[doc]``, and a gate item, ``test_adapter[sway-gate]``, which fails
exactly when ``sway-mlx gate`` would exit non-zero. A probe item fails with the probe's
message when the probe fails and gates; a non-gating failure is an xfail, a WARN passes
with a warning, a SKIP skips, and so does a probe the suite never reached (after a failed
preflight: the gate item says why). The test itself runs last and may take the
``sway_result`` fixture.

``spec`` is relative to the test file's directory (else to pytest's rootdir);
``threshold`` overrides the spec's ``defaults.coverage_threshold``. The suite runs when
the first of its items runs, once per (spec, threshold) in a session, and each model is
loaded once per session: specs that share a base model share it, swapping adapters.

Only pytest and the standard library are imported until a sway item runs: the plugin
loads in every pytest session of an environment where sway-mlx is installed.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from sway_common.backend.model_views import ModelViews
    from sway_common.types import ProbeResult, SuiteResult

MARKER = "sway_mlx"
GATE = "sway-gate"
MARKER_HELP = (
    "sway_mlx(spec, threshold=None): run a sway-mlx suite spec; one test item per probe "
    "and a gate item, next to the marked test (which may take the sway_result fixture)"
)


class SwayFailure(Exception):
    """A probe or the gate failed: pytest shows this message alone, not a traceback."""


class SwayProbeWarning(UserWarning):
    """A probe ended WARN: the suite still passes, as `sway-mlx gate` does."""


@dataclasses.dataclass(frozen=True)
class SuiteRequest:
    spec: Path
    threshold: float | None


class SwayRuns:
    """The session's suite results by (spec, threshold) and its loaded models."""

    def __init__(self) -> None:
        self.results: dict[SuiteRequest, SuiteResult | SwayFailure] = {}
        self.backends: dict[str, ModelViews] = {}
        self.adapters: dict[str, str | None] = {}

    def result(self, request: SuiteRequest) -> SuiteResult:
        """The suite's result, run on first request; a run that could not start fails
        every item that asks again with the same message, without retrying."""
        if request not in self.results:
            try:
                self.results[request] = self._run(request)
            except SwayFailure as e:
                self.results[request] = e
        found = self.results[request]
        if isinstance(found, SwayFailure):
            raise SwayFailure(str(found))
        return found

    def _run(self, request: SuiteRequest) -> SuiteResult:
        from sway_common.app.options import null_cache
        from sway_common.suite.inputs import context_problem
        from sway_common.suite.runner import run_suite

        spec = load(request.spec)
        backend = self._backend(spec.model)
        if problem := context_problem(spec, backend):
            raise SwayFailure(f"{request.spec}: {problem}")
        return run_suite(
            spec, backend=backend, threshold=request.threshold, null_cache=null_cache(False)
        )

    def _backend(self, model: Any) -> ModelViews:
        """The loaded model for ``model``: built once per base, the adapter swapped in."""
        from sway_common.app.options import first_line
        from sway_common.app.platform import build_backend, pick_backend

        choice = pick_backend(model.kind)
        # The dummy's "adapter" is a preset chosen when it is built, not a file to swap.
        key = repr((choice, dataclasses.replace(model, adapter=None, kind=choice)))
        if choice == "dummy":
            key += repr(model.adapter)
        try:
            if key not in self.backends:
                self.backends[key] = build_backend(model, model.kind)
            elif self.adapters[key] != model.adapter:
                self.backends[key].set_adapter(model.adapter)
        except (OSError, ValueError, RuntimeError, ImportError) as e:
            raise SwayFailure(
                f"cannot load {model.base} with {model.adapter}: {first_line(e)}"
            ) from e
        self.adapters[key] = model.adapter
        return self.backends[key]

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()
        self.backends.clear()


RUNS = pytest.StashKey[SwayRuns]()


def load(spec: Path) -> Any:
    """The parsed spec, or its problems as one collection error."""
    from sway_common.suite.spec import SpecError, load_spec

    try:
        return load_spec(spec)
    except SpecError as e:
        problems = "\n".join(f"  - {p}" for p in e.problems)
        raise pytest.Collector.CollectError(
            f"{e.source}: sway spec problems:\n{problems}"
        ) from None


def request_of(item: pytest.Item, marker: pytest.Mark) -> SuiteRequest:
    """The marker's spec (resolved) and threshold, or a collection error naming the fix."""
    where = f"{item.nodeid}: @pytest.mark.{MARKER}"
    kwargs = dict(marker.kwargs)
    if marker.args:
        kwargs.setdefault("spec", marker.args[0])
    unknown = sorted(set(kwargs) - {"spec", "threshold"})
    if unknown or len(marker.args) > 1:
        raise pytest.Collector.CollectError(
            f"{where} takes spec= and threshold= only, got {', '.join(unknown) or 'more arguments'}"
        )
    if "spec" not in kwargs:
        raise pytest.Collector.CollectError(f'{where} needs spec="path/to/sway.yaml"')
    threshold = kwargs.get("threshold")
    if threshold is not None and (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not 0 <= threshold <= 1
    ):
        raise pytest.Collector.CollectError(f"{where}: threshold must be a number in [0, 1]")
    spec = Path(kwargs["spec"]).expanduser()
    candidates = (
        [spec] if spec.is_absolute() else [item.path.parent / spec, item.config.rootpath / spec]
    )
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        tried = " or ".join(str(c) for c in candidates)
        raise pytest.Collector.CollectError(f"{where}: no spec file at {tried}; check the path")
    return SuiteRequest(found.resolve(), None if threshold is None else float(threshold))


class SwayItem(pytest.Item):
    """One probe of a suite (``probe`` set) or its gate (``probe`` None)."""

    def __init__(self, *, request: SuiteRequest, probe: str | None, **kw: Any) -> None:
        super().__init__(**kw)
        self.request = request
        self.probe = probe

    def runtest(self) -> None:
        result = self.config.stash[RUNS].result(self.request)
        if self.probe is None:
            self._gate(result)
            return
        found = next((p for p in result.probes if p.name == self.probe), None)
        if found is None:  # the suite stopped before it (a no-op adapter); the gate says why
            from sway_common.report import headline

            pytest.skip(f"not run: {headline(result)}")
        self._judge(found)

    def _gate(self, result: SuiteResult) -> None:
        from sway_common.report import headline
        from sway_common.report.files import composite_line
        from sway_common.types import Verdict

        self._record(verdict=result.verdict.value, score=result.score)
        if result.verdict in (Verdict.FAIL, Verdict.ERROR):
            raise SwayFailure(
                f"suite {result.verdict.value}: {composite_line(result)}\n{headline(result)}"
            )

    def _judge(self, p: ProbeResult) -> None:
        from sway_common.report.files import format_effect, format_metric
        from sway_common.stats import format_z
        from sway_common.types import Verdict

        self._record(verdict=p.verdict.value, z=p.z, raw=p.raw)
        if p.verdict is Verdict.SKIP:
            pytest.skip(p.message or "skipped")
        if p.verdict is Verdict.WARN:
            warnings.warn(SwayProbeWarning(f"{p.name}: WARN: {p.message}"), stacklevel=1)
        if p.verdict not in (Verdict.FAIL, Verdict.ERROR):
            return
        if not p.gating:
            pytest.xfail(f"non-gating {p.name} {p.verdict.value}: {p.message}")
        numbers = (
            f"raw={format_metric(p.raw)} z={format_z(p.z, p.null.n if p.null else None)} "
            f"effect={format_effect(p.effect_ratio)}"
        )
        raise SwayFailure(f"{p.name} ({p.kind}) {p.verdict.value}: {p.message}\n{numbers}")

    def _record(self, **values: object) -> None:
        """JUnit properties (``--junitxml``): the numbers that are there."""
        self.user_properties += [(k, v) for k, v in values.items() if v is not None]

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, SwayFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        what = f"probe {self.probe}" if self.probe else "gate"
        return self.path, None, f"{self.name}: sway {what} of {self.request.spec.name}"


def _child_name(anchor: str, tag: str) -> str:
    """``test_adapter[doc]``; for a parametrized anchor ``test_adapter[x-doc]``."""
    return f"{anchor[:-1]}-{tag}]" if anchor.endswith("]") else f"{anchor}[{tag}]"


def suite_items(collector: pytest.Collector, anchor: pytest.Function) -> list[pytest.Item]:
    marker = anchor.get_closest_marker(MARKER)
    assert marker is not None
    request = request_of(anchor, marker)
    spec = load(request.spec)
    items: list[pytest.Item] = []
    for probe in [*(cfg.name for cfg in spec.probes), None]:
        item = SwayItem.from_parent(
            collector, name=_child_name(anchor.name, probe or GATE), request=request, probe=probe
        )
        item.own_markers.extend(anchor.own_markers)  # -m selects them with their anchor
        items.append(item)
    return items


# ------------------------------------------------------------------ hooks
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    runs = SwayRuns()
    config.stash[RUNS] = runs
    config.add_cleanup(runs.close)


@pytest.hookimpl(wrapper=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> Any:
    made = yield
    found = made if isinstance(made, list) else [made]
    anchors = [i for i in found if isinstance(i, pytest.Function) and i.get_closest_marker(MARKER)]
    if not anchors:
        return made
    out: list[Any] = []
    for node in found:
        if node in anchors:
            out += suite_items(collector, node)
        out.append(node)
    return out


@pytest.fixture
def sway_result(request: pytest.FixtureRequest) -> SuiteResult:
    """The SuiteResult of the test's ``@pytest.mark.sway_mlx`` suite (run once, shared)."""
    marker = request.node.get_closest_marker(MARKER)
    if marker is None:
        pytest.fail(f'sway_result needs @pytest.mark.{MARKER}(spec="sway.yaml") on the test')
    return request.config.stash[RUNS].result(request_of(request.node, marker))
