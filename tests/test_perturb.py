"""Prompt perturbations: each is a deterministic function of (text, seed) that changes a
typical sentence, in the way its name says."""

from __future__ import annotations

import re

import pytest

from sway_common.probes.perturb import (
    LEAD_INS,
    PERTURBATIONS,
    SYNONYMS,
    case_flip,
    clause_reverse,
    drop_punct,
    perturb,
    prefix_inject,
    register_shift,
    synonym_swap,
    typo,
)

TEXT = (
    "The old lighthouse stands on a granite spur, and its lamp was first lit in 1861. "
    "Every night the keeper records the tide; it is a famous ledger"
)


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_same_text_and_seed_give_the_same_output(name: str) -> None:
    first = perturb(TEXT, name, 3)
    assert first == perturb(TEXT, name, 3)
    assert first != TEXT


def test_seeded_perturbations_depend_on_the_seed() -> None:
    for name in ("typo", "case_flip", "clause_reverse", "prefix_inject"):
        outputs = {perturb(TEXT, name, seed) for seed in range(8)}
        assert len(outputs) > 1, name


def test_typo_swaps_inner_letters_and_keeps_the_words_count() -> None:
    out = typo(TEXT, 0)
    before, after = TEXT.split(), out.split()
    assert len(before) == len(after)
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert changed
    for a, b in changed:
        assert sorted(a) == sorted(b) and a[0] == b[0] and a[-1] == b[-1]


def test_case_flip_changes_only_case() -> None:
    out = case_flip(TEXT, 1)
    assert out.lower() == TEXT.lower() and out != TEXT


def test_drop_punct_removes_punctuation_and_nothing_else() -> None:
    out = drop_punct(TEXT, 0)
    assert not re.search(r"[.,;]", out)
    assert out.split() == re.sub(r"[.,;]", "", TEXT).split()
    assert drop_punct(TEXT, 0) == drop_punct(TEXT, 99)


def test_synonym_swap_uses_the_table_and_keeps_capitals() -> None:
    out = synonym_swap(TEXT, 0)
    assert "old lighthouse" not in out and "stands" not in out
    assert any(f"{s} lighthouse" in out for s in SYNONYMS["old"])
    assert synonym_swap("Every night.", 0).split()[0] in ("Each",)
    assert synonym_swap("Nothing here matches xyz", 0) == "Nothing here matches xyz"


def test_clause_reverse_swaps_two_clauses_keeping_their_words() -> None:
    out = clause_reverse(TEXT, 2)
    assert sorted(re.findall(r"\w+", out.lower())) == sorted(re.findall(r"\w+", TEXT.lower()))
    assert not out.startswith("The old lighthouse")
    # no clause boundary: the halves swap at a space
    assert clause_reverse("alpha beta gamma delta", 0) == "Gamma delta alpha beta"


def test_prefix_inject_adds_a_lead_in_before_the_text() -> None:
    out = prefix_inject(TEXT, 4)
    assert out.endswith(TEXT)
    assert out[: -len(TEXT)].strip() in LEAD_INS


def test_register_shift_swaps_formal_and_casual_wording() -> None:
    assert register_shift("It is cold. We do not know.", 0) == "It's cold. We don't know."
    assert register_shift("It's cold and I don't know.", 0) == "It is cold and I do not know."
    assert register_shift("Plain words only", 0) == "plain words only"


def test_unknown_perturbation_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown perturbation 'tyop'"):
        perturb(TEXT, "tyop", 0)
