"""style_fingerprint and adapter_revert: the math, the verdict rules, degenerate output.

A scripted backend stands in for a model: each view returns set continuations, and its
embeddings are bags of words on top of a large shared offset (as an LM's mean-pooled
states share one huge direction), so similarity has to be standardised to mean anything.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from sway_common.backend.dummy import DummyDifferentialBackend
from sway_common.probes import REGISTRY, NullCalibration, RunContext
from sway_common.probes import stylometry as st
from sway_common.probes.adapter_revert import AdapterRevertConfig
from sway_common.probes.similarity import answer_span
from sway_common.probes.style_fingerprint import StyleFingerprintConfig
from sway_common.suite.runner import run_suite
from sway_common.suite.spec import SpecError, parse_spec
from sway_common.types import Verdict

PLAIN = (
    "The harbour was quiet in the evening and the boats rested against the wall while the "
    "keeper walked along the pier, thinking about the long winter that was coming to the town."
)
TERSE = "Wind north.\nSea rough, 4 ft.\n- Lamp lit 1805.\n- Oil low.\nAll well.\nLog shut 2210."
DOC = "\n\n".join([TERSE.replace("4", str(i)) for i in range(6)])
Script = Callable[[str], str]


class _View:
    def __init__(self, write: Script) -> None:
        self.write = write

    def generate_batch(self, prompts: Sequence[str], **_: object) -> list[str]:
        return [self.write(p) for p in prompts]


class ScriptedBackend:
    """Views that write what they are told; null seed k writes ``null(k, prompt)``."""

    def __init__(self, base: Script, ft: Script, null: Callable[[int, str], str]) -> None:
        self.base, self.ft, self.null = base, ft, null
        self.info = {"backend": "scripted"}

    @contextmanager
    def as_base(self) -> Iterator[_View]:
        yield _View(self.base)

    @contextmanager
    def as_finetuned(self) -> Iterator[_View]:
        yield _View(self.ft)

    @contextmanager
    def as_null_adapter(self, seed: int, **_: object) -> Iterator[_View]:
        yield _View(lambda p: self.null(seed, p))

    def mean_hidden_states(self, texts: Sequence[str]) -> np.ndarray:
        rows = np.zeros((len(texts), 64), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                rows[i, zlib.crc32(w.strip(".,").encode()) % 64] += 1.0
            rows[i] /= max(1.0, np.linalg.norm(rows[i]))
        return rows + 50.0  # the shared offset: raw cosines are all ~1


def _ctx(backend: object, runs: int = 4) -> RunContext:
    return RunContext(backend=backend, null=NullCalibration(runs=runs, seed_base=10))


def _style(backend: object, **kw: object):
    cfg = StyleFingerprintConfig(
        name="style", kind="style_fingerprint", prompts=["a", "b", "c", "d"], doc_reference=DOC
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return REGISTRY["style_fingerprint"]().run(cfg, _ctx(backend))


def _varied(seed: int, prompt: str) -> str:
    """Base-like prose with a little per-draw variation (a null adapter's small move)."""
    words = PLAIN.split()
    k = (seed * 7 + ord(prompt[0])) % 9
    return " ".join(words[k:] + words[:k]) + (", then" * (seed % 2))


# ------------------------------------------------------------------ stylometry
def test_features_read_the_habits_they_name() -> None:
    f = dict(zip(st.FEATURES, st.features(TERSE), strict=True))
    g = dict(zip(st.FEATURES, st.features(PLAIN), strict=True))
    assert f["sentence_words"] < 4 < g["sentence_words"]
    assert f["line_breaks"] > 0.2 and g["line_breaks"] == 0
    assert f["list_lines"] == pytest.approx(2 / 6) and g["list_lines"] == 0
    assert f["numbers"] > 0.1 and g["numbers"] == 0


def test_vocabulary_does_not_fall_with_length() -> None:
    # Plain type-token ratio halves when a text is repeated; the windowed one barely moves.
    once, thrice = st.features(PLAIN)[3], st.features(" ".join([PLAIN] * 3))[3]
    assert abs(once - thrice) < 0.05


@pytest.mark.parametrize(
    ("text", "why"),
    [("", "empty"), ("  \n ", "empty"), ("Yes.", "word"), ("ha " * 20, "repeated"), ("!!!", "0")],
)
def test_degenerate_text_says_why(text: str, why: str) -> None:
    assert why in (st.degenerate(text) or "")
    assert st.degenerate(PLAIN) is None


def test_the_frame_puts_base_at_0_and_the_document_at_1() -> None:
    base = np.stack([st.features(PLAIN), st.features(PLAIN + " And so on, it went.")])
    doc = np.stack([st.features(c) for c in st.document_chunks(DOC, 12)])
    fr = st.frame(base, doc)
    assert fr.shift(fr.base, fr.base) == pytest.approx(0.0)
    assert fr.shift(fr.doc, fr.base) == pytest.approx(1.0)
    assert fr.shift(2 * fr.base - fr.doc, fr.base) == pytest.approx(-1.0)
    sideways = np.linalg.svd(fr.direction[None, :])[2][1] * fr.scale  # orthogonal to it
    assert fr.shift(fr.base + sideways, fr.base) == pytest.approx(0.0, abs=1e-9)


def test_no_feature_dominates_by_its_units() -> None:
    # Sentence length differs by 10 words but varies by 10 within each writer; the comma
    # rate differs by 0.2 and varies by 0.02: in raw units sentence length would decide,
    # scaled, the comma rate is the style difference.
    sign = np.array([-1.0, 1.0] * 3)
    base = np.tile(st.FLOORS * 2, (6, 1))
    base[:, 0] = 20 + 10 * sign
    base[:, 4] = 0.1 + 0.02 * sign
    doc = base.copy()
    doc[:, 0] += 10
    doc[:, 4] += 0.2
    fr = st.frame(base, doc)
    assert abs(fr.direction[4]) > 5 * abs(fr.direction[0])
    commas_only = fr.base.copy()
    commas_only[4] = fr.doc[4]
    assert fr.shift(commas_only, fr.base) > 0.9


def test_a_feature_that_never_varies_is_floored_not_blown_up() -> None:
    rows = np.tile(np.arange(1.0, 11.0), (4, 1))
    assert np.array_equal(st.pooled_scale([rows, rows + 1]), st.FLOORS)


def test_document_chunks_keep_line_breaks_and_whole_paragraphs() -> None:
    chunks = st.document_chunks(DOC, 20)
    assert len(chunks) == 3 and all("\n- Lamp" in c for c in chunks)
    assert "".join(chunks).replace("\n", "") == DOC.replace("\n", "")


def test_document_chunks_undo_a_markdown_hard_wrap_but_keep_lists_and_headings() -> None:
    long = "A sentence long enough to reach the column where an editor wraps it onto"
    text = f"# Notes\n{long}\nthe next line.\nA short line.\n- an item {long[2:]}\nwrapped\n- two"
    (chunk,) = st.document_chunks(text, 100)
    want = f"# Notes\n{long} the next line.\nA short line.\n- an item {long[2:]} wrapped\n- two"
    assert chunk == want


# ------------------------------------------------------------- style_fingerprint
def test_style_passes_an_adapter_that_writes_like_the_document() -> None:
    r = _style(ScriptedBackend(lambda p: PLAIN, lambda p: TERSE, _varied))
    assert r.verdict is Verdict.PASS, r.message
    assert r.raw > 0.5 and r.z is not None and r.z > 3
    assert "random adapters" in r.evidence["null_meaning"]


def test_style_fails_an_adapter_that_writes_like_the_base() -> None:
    r = _style(ScriptedBackend(lambda p: PLAIN, lambda p: PLAIN, _varied))
    assert r.verdict is Verdict.FAIL and r.raw == pytest.approx(0.0)
    assert "still writes like the base" in r.message


def test_style_fails_when_random_adapters_move_it_as_far() -> None:
    def nulls(seed: int, prompt: str) -> str:
        return TERSE if seed % 2 else _varied(seed, prompt)

    r = _style(ScriptedBackend(lambda p: PLAIN, lambda p: TERSE, nulls))
    assert r.verdict is Verdict.FAIL and "move the style as far" in r.message


def test_style_moved_on_half_the_prompts_warns_instead_of_passing() -> None:
    r = _style(ScriptedBackend(lambda p: PLAIN, lambda p: TERSE if p in "ab" else PLAIN, _varied))
    assert r.raw >= 0.25 and r.z > 3
    assert r.verdict is Verdict.WARN and "beyond its nulls on 2 of 4" in r.message


@pytest.mark.parametrize("ft", ["", "   ", "Lamp.", "lamp " * 30])
def test_style_warns_on_empty_or_degenerate_output_never_passes(ft: str) -> None:
    # dlm-sway once read all-empty output as a +0.82 shift toward the document.
    r = _style(ScriptedBackend(lambda p: PLAIN, lambda p: ft, _varied))
    assert r.verdict is Verdict.WARN, r.message
    assert "degenerate" in r.message


def test_style_with_one_degenerate_continuation_warns_instead_of_passing() -> None:
    r = _style(ScriptedBackend(lambda p: PLAIN, lambda p: "" if p == "a" else TERSE, _varied))
    assert r.verdict is Verdict.WARN and "1 of 4" in r.message


def test_style_warns_when_the_document_reads_like_the_base() -> None:
    r = _style(
        ScriptedBackend(lambda p: PLAIN, lambda p: TERSE, _varied),
        doc_reference=" ".join([PLAIN] * 3),
    )
    assert r.verdict is Verdict.WARN and "already the base's" in r.message


def test_style_reads_the_document_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "doc.md").write_text(DOC, encoding="utf-8")
    r = _style(
        ScriptedBackend(lambda p: PLAIN, lambda p: TERSE, _varied),
        doc_reference="",
        doc=str(tmp_path / "doc.md"),
    )
    assert r.verdict is Verdict.PASS, r.message


# ---------------------------------------------------------------- adapter_revert
CASES = [
    {"prompt": "Who lit the lamp?", "gold": "Odile Fenwick lit it", "paraphrases": ["p1", "p2"]},
    {"prompt": "What colour?", "gold": "green twice a minute", "paraphrases": ["p3", "p4"]},
]
BASE_ANSWERS = {
    "p1": "a sailor from the navy yard came",
    "p2": "the mayor of the old port did",
    "p3": "white light with a red sector",
    "p4": "it is usually painted in red",
}
GOLD_OF = {p: c["gold"] for c in CASES for p in c["paraphrases"]}


def _revert(ft: Script, null: Callable[[int, str], str] | None = None, cases=CASES):
    backend = ScriptedBackend(
        BASE_ANSWERS.__getitem__, ft, null or (lambda s, p: BASE_ANSWERS[p] + f" seed{s}")
    )
    cfg = AdapterRevertConfig(name="revert", kind="adapter_revert", cases=cases)
    return REGISTRY["adapter_revert"]().run(cfg, _ctx(backend))


def test_revert_passes_an_adapter_that_keeps_the_gold() -> None:
    r = _revert(lambda p: GOLD_OF[p] + " in the end")
    assert r.verdict is Verdict.PASS, r.message
    assert r.raw == 0.0 and r.evidence["informative"] == 4 and r.z > 3


def test_revert_fails_an_adapter_that_answers_like_the_base() -> None:
    r = _revert(BASE_ANSWERS.__getitem__)
    assert r.verdict is Verdict.FAIL and r.raw == 1.0
    assert "4 of 4" in r.message


def test_revert_counts_half_reverting_against_the_bar() -> None:
    r = _revert(lambda p: GOLD_OF[p] if p in ("p1", "p3") else BASE_ANSWERS[p])
    # 2 of 4 is past the 25% bar, but four paraphrases cannot tell: WARN, not a FAIL.
    assert r.raw == 0.5 and r.verdict is Verdict.WARN and r.evidence["reverts"] == 2
    assert "cannot tell" in r.message


def test_revert_warns_on_empty_answers() -> None:
    r = _revert(lambda p: "")
    assert r.verdict is Verdict.WARN and "degenerate" in r.message


def test_revert_leaves_out_paraphrases_the_base_already_answers() -> None:
    cases = [dict(CASES[0]), dict(CASES[1], gold="white light with a red sector")]
    r = _revert(lambda p: GOLD_OF.get(p, "x") + " indeed", cases=cases)
    assert r.evidence["left_out_base_near_gold"] == 1 and r.evidence["informative"] == 3
    assert "1 left out" in r.message
    same = [dict(c, gold=BASE_ANSWERS[c["paraphrases"][0]]) for c in CASES]
    for c in same:
        c["paraphrases"] = c["paraphrases"][:1]
    r = _revert(lambda p: "anything at all", cases=same)
    assert r.verdict is Verdict.WARN and "no informative paraphrase" in r.message


def test_revert_fails_when_random_adapters_hold_the_gold_as_well() -> None:
    def nulls(seed: int, p: str) -> str:
        return GOLD_OF[p] if seed % 2 else BASE_ANSWERS[p]

    r = _revert(lambda p: GOLD_OF[p] + " for sure", nulls)
    assert r.verdict is Verdict.FAIL and "hold the gold as well" in r.message


def test_answer_span_keeps_an_opening_as_long_as_the_gold() -> None:
    text = "one two three four five six seven eight nine ten eleven"
    assert answer_span(text, "a b") == "one two three four five six seven eight"
    assert answer_span(text, " ".join("x" * 6)) == text


# ------------------------------------------------------------------------- specs
SPEC = {
    "version": 1,
    "models": {"ft": {"kind": "dummy", "base": "dummy", "adapter": "trained"}},
    "suite": [
        {"name": "nulls", "kind": "null_adapter", "runs": 3},
        {"name": "sf", "kind": "style_fingerprint", "prompts": ["The keeper", "At dawn"],
         "doc_reference": DOC, "max_new_tokens": 16, "assert_shift_gte": 0.25,
         "extended": "auto", "assert_z_gte": 3.0, "weight": 1.0, "enabled": True},
        {"name": "ar", "kind": "adapter_revert", "max_new_tokens": 8,
         "embedding_model": "sentence-transformers/all-MiniLM-L6-v2",
         "base_gold_similarity_cap": 0.75, "assert_revert_rate_lt": 0.25,
         "cases": [{"prompt": "The keeper", "gold": " lit it", "paraphrases": ["Keeper"]}]},
    ],
}  # fmt: skip


def test_dlm_sway_fields_load_and_run_on_the_dummy_without_error() -> None:
    spec = parse_spec(SPEC)
    result = run_suite(spec, backend=DummyDifferentialBackend())
    by_kind = {p.kind: p for p in result.probes}
    for kind in ("style_fingerprint", "adapter_revert"):
        assert by_kind[kind].verdict is not Verdict.ERROR, by_kind[kind].message
        assert by_kind[kind].verdict is not Verdict.SKIP, by_kind[kind].message
    # The dummy writes one repeated letter: no style to read, and it says so.
    assert by_kind["style_fingerprint"].verdict is Verdict.WARN


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"kind": "style_fingerprint", "max_new_tokens": 2}, "max_new_tokens"),
        ({"kind": "style_fingerprint", "assert_shift_gte": 1.5}, "assert_shift_gte"),
        ({"kind": "style_fingerprint", "doc_reference": "x", "doc": "d.md"}, "not both"),
        ({"kind": "style_fingerprint", "doc": "missing.md"}, "doc: "),
        ({"kind": "style_fingerprint", "prompts": []}, "prompts"),
        ({"kind": "adapter_revert"}, "cases: needs"),
        ({"kind": "adapter_revert", "cases": [{"prompt": "p", "gold": "g"}]}, "paraphrases"),
        ({"kind": "adapter_revert", "cases": [{"prompt": "p", "gold": "", "paraphrases": ["q"]}]},
         "empty completion"),
        ({"kind": "adapter_revert", "base_gold_similarity_cap": 2}, "base_gold_similarity_cap"),
        ({"kind": "adapter_revert", "assert_revert_rate_lt": 0}, "assert_revert_rate_lt"),
    ],
)  # fmt: skip
def test_bad_generation_entries_fail_before_any_model_loads(entry: dict, fragment: str) -> None:
    data = {"models": {"ft": {"base": "m", "adapter": "a"}}, "suite": [{"name": "x", **entry}]}
    with pytest.raises(SpecError, match=fragment):
        parse_spec(data)
