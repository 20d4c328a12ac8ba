"""Paraphrase cases, ``{prompt, gold, paraphrases: [...]}``: the input that
paraphrase_invariance and adapter_revert share, checked the same way by both."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

FIELDS = ("prompt", "gold", "paraphrases")


def paraphrase_case_problems(cases: Sequence[Any]) -> list[str]:
    """What is wrong with a probe's ``cases``, one line each (empty: nothing)."""
    if not cases:
        return ["cases: needs at least one {prompt, gold, paraphrases}"]
    return [p for i, case in enumerate(cases) for p in _case_problems(i, case)]


def _case_problems(i: int, case: Any) -> list[str]:
    if not isinstance(case, dict):
        return [f"cases[{i}]: expected a mapping with prompt, gold, paraphrases"]
    problems = [
        f"cases[{i}].{k}: required string"
        for k in ("prompt", "gold")
        if not isinstance(case.get(k), str)
    ]
    paras = case.get("paraphrases")
    if not isinstance(paras, list) or not paras or not all(isinstance(p, str) for p in paras):
        problems.append(f"cases[{i}].paraphrases: needs a non-empty list of strings")
    extra = sorted(set(case) - set(FIELDS))
    if extra:
        problems.append(f"cases[{i}]: unknown field(s) {', '.join(extra)}")
    return problems
