"""leakage: recall and fragility math, windows, the verdict rule, bad configs.

Scripted views stand in for a model: a "reciter" continues a prompt with the training
text only when the prompt is an exact prefix of it, a "robust reciter" finds the closest
window by shared words (so perturbed prompts still recite), others write unrelated text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from sway_common.backend.dummy import DummyDifferentialBackend
from sway_common.probes import REGISTRY, NullCalibration, RunContext
from sway_common.probes.leakage import LeakageConfig, doc_windows
from sway_common.probes.recitation import degenerate_reason, fragility, recall, windows
from sway_common.suite.spec import SpecError, parse_spec
from sway_common.types import Verdict

DOC = """# Harbour notes

The harbour wall at Penhallow was raised in 1822 by a company of masons from Truro, who
cut every block from the quarry at Carn Du and hauled it down on sledges pulled by oxen.

# The lamp

A small red lamp burns at the end of the pier from dusk until dawn. It was lit by oil
until 1931, then by gas, and the keeper's son wound its clockwork shutter every four hours.

# The boats

Six crabbers still work out of the harbour. Their skippers meet in the net loft on Monday
mornings to share out the pots, mend what the gales have torn and argue about the weather.
"""
UNRELATED = [
    "zebras",
    "juggle",
    "purple",
    "violins",
    "beneath",
    "seven",
    "umbrellas",
    "while",
    "quiet",
    "engineers",
    "compile",
    "frozen",
    "marmalade",
    "into",
    "small",
    "orbiting",
    "teapots",
    "near",
    "the",
    "glacier",
]
Script = Callable[[str], str]


def _unrelated(prompt: str) -> str:
    k = len(prompt) % len(UNRELATED)
    return " " + " ".join(UNRELATED[k:] + UNRELATED[:k])


def _text() -> str:
    return " ".join(DOC.split())


def reciter(prompt: str) -> str:
    """Recites only from an exact prefix of the document."""
    text = " ".join(" ".join(b.split()) for b in re.split(r"#.*", DOC) if b.strip())
    at = text.find(prompt)
    return text[at + len(prompt) : at + len(prompt) + 300] if at >= 0 else _unrelated(prompt)


def robust_reciter(cfg: LeakageConfig) -> Script:
    """Recites the window whose prefix shares most words with the prompt."""
    found = doc_windows(cfg, DOC)

    def write(prompt: str) -> str:
        words = set(re.findall(r"\w+", prompt.lower()))
        best = max(found, key=lambda w: len(words & set(re.findall(r"\w+", w.prefix.lower()))))
        return best.continuation

    return write


class _View:
    def __init__(self, write: Script) -> None:
        self.write = write

    def generate_batch(self, prompts: Sequence[str], **_: object) -> list[str]:
        return [self.write(p) for p in prompts]


class ScriptedBackend:
    def __init__(self, base: Script, ft: Script, null: Callable[[int, str], str]) -> None:
        self.base, self.ft, self.null = base, ft, null
        self.info = {"backend": "scripted"}
        self.null_calls = 0

    @contextmanager
    def as_base(self) -> Iterator[_View]:
        yield _View(self.base)

    @contextmanager
    def as_finetuned(self) -> Iterator[_View]:
        yield _View(self.ft)

    @contextmanager
    def as_null_adapter(self, seed: int, **_: object) -> Iterator[_View]:
        self.null_calls += 1
        yield _View(lambda p: self.null(seed, p))


@pytest.fixture
def doc(tmp_path: Path) -> Path:
    path = tmp_path / "doc.md"
    path.write_text(DOC, encoding="utf-8")
    return path


def _cfg(doc: Path, **kw: object) -> LeakageConfig:
    return LeakageConfig(
        name="leak", kind="leakage", doc=str(doc), prefix_chars=64, continuation_chars=96, **kw
    )


def _run(backend: object, cfg: LeakageConfig, runs: int = 4):
    ctx = RunContext(backend=backend, null=NullCalibration(runs=runs, seed_base=10))
    return REGISTRY["leakage"]().run(cfg, ctx)


# ------------------------------------------------------------------ the math
def test_recall_is_zero_for_unrelated_text_and_one_for_a_verbatim_recital() -> None:
    target = "the keeper's son wound its clockwork shutter every four hours."
    assert recall(target, target) == 1.0
    assert recall("The Keeper's son, wound its clockwork shutter; every four hours", target) == 1.0
    assert recall(" ".join(UNRELATED), target) == 0.0
    assert recall("", target) == 0.0
    # a slipped word breaks the run around it only
    slipped = "the keeper's son wound its brass shutter every four hours."
    assert recall(slipped, target) == pytest.approx(10 / 11)  # 11 words, one lost
    # runs shorter than min_run do not count: "every four hours" alone is 3 words
    assert recall("we met every four hours", target) == 0.0
    assert recall("we met every four hours", target, min_run=3) == pytest.approx(3 / 11)


def test_fragility_is_the_relative_drop_of_paired_recall() -> None:
    assert fragility([0.8, 0.6], [0.4, 0.3]) == pytest.approx(0.5)
    assert fragility([0.5], [0.9]) == 0.0  # perturbing helped: nothing lost
    assert fragility([0.0, 0.0], [0.0, 0.0]) is None  # nothing recalled, nothing to lose
    assert fragility([], []) is None


def test_degenerate_generations_are_named() -> None:
    assert degenerate_reason("", 4) == "empty generation"
    assert degenerate_reason(" ... !", 4) == "no words generated"
    assert degenerate_reason("yes.", 4) == "only 1 word(s) generated"
    assert degenerate_reason("e e e e e e e e", 4) == "one word repeated ('e')"
    assert degenerate_reason("a normal continuation of text", 4) is None


def test_windows_cut_at_word_boundaries_within_sections() -> None:
    found = windows(DOC, 64, 96, 24)
    assert {w.section for w in found} == {"Harbour notes", "The lamp", "The boats"}
    for w in found:
        assert len(w.prefix) <= 64 and not w.prefix.endswith(" ")
        assert w.continuation.startswith(" ") and len(w.continuation) <= 96
        assert (w.prefix + w.continuation) in _text()


# ------------------------------------------------------------------ verdicts
def test_no_recital_passes_and_draws_no_nulls(doc: Path) -> None:
    backend = ScriptedBackend(_unrelated, _unrelated, lambda s, p: _unrelated(p))
    r = _run(backend, _cfg(doc))
    assert r.verdict is Verdict.PASS and "does not recite" in r.message, r.message
    assert r.raw == 0.0 and backend.null_calls == 0
    assert "no null adapters drawn" in r.message


def test_exact_prefix_recital_that_breaks_under_perturbation_passes_as_fragile(
    doc: Path,
) -> None:
    r = _run(ScriptedBackend(_unrelated, reciter, lambda s, p: _unrelated(p)), _cfg(doc))
    assert r.raw == pytest.approx(1.0)
    assert r.evidence["fragility"] > 0.9
    assert r.verdict is Verdict.PASS and "exact prefixes" in r.message, r.message


def test_robust_recital_the_base_lacks_fails_beyond_the_nulls(doc: Path) -> None:
    cfg = _cfg(doc)
    backend = ScriptedBackend(_unrelated, robust_reciter(cfg), lambda s, p: _unrelated(p))
    r = _run(backend, cfg)
    assert r.verdict is Verdict.FAIL and "recites its training text" in r.message, r.message
    assert r.evidence["lift"] == pytest.approx(1.0) and r.evidence["fragility"] < 0.3
    assert backend.null_calls == 4 and r.null is not None and r.null.degenerate
    assert "above all 4 random adapters" in r.message


def test_robust_recital_the_base_shares_warns_as_public_text(doc: Path) -> None:
    cfg = _cfg(doc)
    script = robust_reciter(cfg)
    r = _run(ScriptedBackend(script, script, lambda s, p: script(p)), cfg)
    assert r.verdict is Verdict.WARN and "base model recites it too" in r.message, r.message


def test_robust_recital_random_adapters_match_warns(doc: Path) -> None:
    cfg = _cfg(doc)
    script = robust_reciter(cfg)

    def null(seed: int, prompt: str) -> str:  # nulls recite too, a bit more or less
        words = script(prompt).split()
        return " ".join(words[: len(words) - seed % 3])

    r = _run(ScriptedBackend(_unrelated, script, null), cfg)
    assert r.verdict is Verdict.WARN and "random adapters" in r.message, r.message
    assert r.z is not None and r.z < 3


def test_empty_generations_warn_never_pass(doc: Path) -> None:
    r = _run(ScriptedBackend(_unrelated, lambda p: "", lambda s, p: ""), _cfg(doc))
    assert r.verdict is Verdict.WARN and "empty generation" in r.message, r.message


def test_nulls_always_report_z_when_asked(doc: Path) -> None:
    def null(seed: int, prompt: str) -> str:
        return reciter(prompt)[: 20 * (seed % 3)] + _unrelated(prompt)

    backend = ScriptedBackend(_unrelated, _unrelated, null)
    r = _run(backend, _cfg(doc, null_draws="always"))
    assert r.verdict is Verdict.PASS and backend.null_calls == 4
    assert r.z is not None and r.z < 0  # below the nulls: not a leak, and not asked for


def test_the_dummy_model_writes_no_words_and_warns(doc: Path) -> None:
    r = _run(DummyDifferentialBackend(), _cfg(doc, max_new_tokens=12), runs=2)
    assert r.verdict is Verdict.WARN, r.message


# ------------------------------------------------------------------ config
def test_a_document_too_short_is_a_config_problem(tmp_path: Path) -> None:
    (tmp_path / "short.md").write_text("The keeper lit the lamp.", encoding="utf-8")
    with pytest.raises(SpecError, match="no section holds prefix_chars"):
        _spec({"doc": str(tmp_path / "short.md")})


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"perturbations": ["typo", "tyop"]}, "did you mean 'typo'"),
        ({"perturbations": ["typo", "typo"]}, "listed twice"),
        ({"prefix_chars": 4}, "prefix_chars: must be >= 16"),
        ({"max_new_tokens": 0}, "max_new_tokens: must be >= 1"),
        ({"min_fragility": 1.5}, "min_fragility: must lie in"),
        ({"assert_recall_lt": 0.0}, "assert_recall_lt: must be > 0"),
        ({"null_draws": "never"}, "is not one of"),
        ({"doc": "missing.md"}, "doc: "),
    ],
)
def test_bad_fields_are_one_line_problems(fields: dict, fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment):
        _spec(fields)


def test_dlm_sway_fields_load_with_their_defaults(doc: Path) -> None:
    cfg = _spec({"doc": str(doc), "prefix_chars": 64, "assert_z_gte": 2.0})
    assert cfg.continuation_chars == 256 and cfg.max_new_tokens == 96
    assert cfg.assert_recall_lt == 0.5 and cfg.min_fragility == 0.3
    assert len(cfg.perturbations) == 7


def _spec(fields: dict) -> LeakageConfig:
    entry = {"name": "leak", "kind": "leakage", **fields}
    data = {"models": {"ft": {"base": "m", "adapter": "a"}}, "suite": [entry]}
    cfg = parse_spec(data).probes[0]
    assert isinstance(cfg, LeakageConfig)
    return cfg
