"""Small, deterministic rewrites of a prompt, for probes that ask "does it still hold?".

Each perturbation is a pure function of ``(text, seed)``: the same pair always gives the
same output, on every platform (``random.Random`` seeded with a string is stable across
processes, unlike ``hash()``). A perturbation that finds nothing to change returns the
text unchanged; callers should treat such a pair as untested rather than as robust.

The synonym and register tables were written for this project: common words of plain
English prose, each with replacements of the same part of speech.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
_PUNCT = re.compile(r"[.,;:!?\"()\[\]{}—–-]")
# Lead-ins that add a sentence before the text without touching its own words.
LEAD_INS: tuple[str, ...] = (
    "Here is a passage I found.",
    "Some background first.",
    "From an old note:",
    "The following was written years ago.",
    "Quoting from memory:",
)
SYNONYMS: dict[str, tuple[str, ...]] = {
    "first": ("initial", "earliest"),
    "famous": ("celebrated", "well-known"),
    "old": ("aged", "ancient"),
    "new": ("fresh", "recent"),
    "big": ("large", "huge"),
    "large": ("big", "sizeable"),
    "small": ("little", "tiny"),
    "still": ("yet", "even now"),
    "today": ("nowadays", "these days"),
    "every": ("each",),
    "each": ("every",),
    "all": ("every one of the",),
    "many": ("numerous", "plenty of"),
    "stands": ("rises", "sits"),
    "kept": ("tended", "maintained"),
    "lived": ("dwelt", "resided"),
    "changed": ("switched", "converted"),
    "chosen": ("picked", "selected"),
    "records": ("logs", "notes"),
    "passed": ("went by", "sailed past"),
    "reads": ("says", "runs"),
    "opens": ("unlocks", "opens up"),
    "brought": ("carried", "took"),
    "begin": ("start",),
    "start": ("begin",),
    "end": ("finish",),
    "use": ("employ",),
    "make": ("create", "produce"),
    "show": ("display", "reveal"),
    "help": ("aid", "assist"),
    "find": ("discover", "locate"),
    "important": ("significant", "key"),
    "quick": ("fast", "rapid"),
    "fast": ("quick", "rapid"),
    "slow": ("unhurried", "gradual"),
    "near": ("close to", "beside"),
    "behind": ("at the back of",),
    "under": ("beneath", "below"),
    "above": ("over",),
    "home": ("back", "ashore"),
    "sea": ("ocean",),
    "town": ("village", "borough"),
    "house": ("home", "dwelling"),
    "ship": ("vessel", "boat"),
    "boat": ("vessel", "craft"),
    "storm": ("gale", "tempest"),
    "light": ("lamp", "beam"),
    "lamp": ("light", "lantern"),
    "rocks": ("stones", "boulders"),
    "garden": ("yard", "plot"),
    "year": ("twelvemonth",),
    "years": ("winters", "seasons"),
    "people": ("folk", "persons"),
    "method": ("approach", "technique"),
    "result": ("outcome",),
    "idea": ("notion", "concept"),
    "system": ("scheme", "setup"),
    "also": ("too", "as well"),
    "often": ("frequently",),
    "usually": ("normally", "generally"),
    "because": ("since", "as"),
    "however": ("yet", "still"),
}
# Formal wording and its casual counterpart; a register shift applies them both ways.
REGISTER: tuple[tuple[str, str], ...] = (
    ("it is", "it's"),
    ("does not", "doesn't"),
    ("do not", "don't"),
    ("did not", "didn't"),
    ("is not", "isn't"),
    ("cannot", "can't"),
    ("there are", "there's"),
    ("approximately", "about"),
    ("therefore", "so"),
    ("however", "but"),
    ("received", "got"),
    ("purchase", "buy"),
    ("until", "till"),
    ("very", "super"),
)


def _rng(name: str, text: str, seed: int) -> random.Random:
    # Seeding with a string hashes it with SHA-512: stable across runs, unlike hash().
    return random.Random(f"{name}\x00{seed}\x00{text}")


def _words(text: str) -> list[re.Match[str]]:
    return list(_WORD.finditer(text))


def _replace_spans(text: str, spans: list[tuple[int, int, str]]) -> str:
    out, last = [], 0
    for start, end, new in sorted(spans):
        out.append(text[last:start])
        out.append(new)
        last = end
    out.append(text[last:])
    return "".join(out)


def _match_case(word: str, new: str) -> str:
    if word.isupper() and len(word) > 1:
        return new.upper()
    return new[0].upper() + new[1:] if word[0].isupper() else new


def _some(rng: random.Random, items: list, share: float) -> list:
    """About ``share`` of ``items`` (at least one), chosen by ``rng``, in their order."""
    if not items:
        return []
    k = max(1, round(len(items) * share))
    picked = sorted(rng.sample(range(len(items)), min(k, len(items))))
    return [items[i] for i in picked]


def typo(text: str, seed: int) -> str:
    """Swap two neighbouring inner letters in about one word in eight (of 4+ letters)."""
    rng = _rng("typo", text, seed)
    spans = []
    for m in _some(rng, [m for m in _words(text) if len(m.group()) >= 4], 1 / 8):
        w = m.group()
        i = rng.randrange(1, len(w) - 2)  # keep the first and last letters
        if w[i] == w[i + 1]:
            continue  # swapping equal letters changes nothing
        spans.append((m.start(), m.end(), w[:i] + w[i + 1] + w[i] + w[i + 2 :]))
    return _replace_spans(text, spans)


def case_flip(text: str, seed: int) -> str:
    """Swap the case of every letter in about a quarter of the words."""
    rng = _rng("case_flip", text, seed)
    spans = [(m.start(), m.end(), m.group().swapcase()) for m in _some(rng, _words(text), 1 / 4)]
    return _replace_spans(text, spans)


def drop_punct(text: str, seed: int) -> str:
    """Remove punctuation, then the doubled spaces it leaves (``seed`` is not needed)."""
    del seed
    return re.sub(r" {2,}", " ", _PUNCT.sub("", text)).strip()


def synonym_swap(text: str, seed: int) -> str:
    """Replace every word found in :data:`SYNONYMS` by one of its synonyms (seeded pick)."""
    rng = _rng("synonym_swap", text, seed)
    spans = []
    for m in _words(text):
        options = SYNONYMS.get(m.group().lower())
        if options:
            spans.append((m.start(), m.end(), _match_case(m.group(), rng.choice(options))))
    return _replace_spans(text, spans)


def clause_reverse(text: str, seed: int) -> str:
    """Swap the clauses on either side of one comma, semicolon or sentence end (seeded).

    Without such a boundary the two halves of the text swap at a word boundary.
    """
    rng = _rng("clause_reverse", text, seed)
    cuts = [m for m in re.finditer(r"[,;.]\s+", text) if m.start() > 0 and m.end() < len(text)]
    if cuts:
        cut = rng.choice(cuts)
        left, right = text[: cut.start()], text[cut.end() :]
        mark = cut.group().strip()
    else:
        spaces = [m.start() for m in re.finditer(r" ", text)]
        if not spaces:
            return text
        middle = min(spaces, key=lambda i: abs(i - len(text) // 2))
        left, right, mark = text[:middle], text[middle + 1 :], ""
    right = right.rstrip(".!?")
    # After a comma the old opening word is mid-sentence; after a full stop it starts one.
    left = left[:1].lower() + left[1:] if mark in (",", ";", "") else left
    return f"{right[:1].upper()}{right[1:]}{mark} {left}"


def prefix_inject(text: str, seed: int) -> str:
    """Put one of :data:`LEAD_INS` (seeded pick) before the text."""
    return f"{_rng('prefix_inject', text, seed).choice(LEAD_INS)} {text}"


def register_shift(text: str, seed: int) -> str:
    """Formal wording made casual and casual made formal (:data:`REGISTER`).

    Text with none of those phrases is lower-cased instead, the register of a hurried
    chat message. ``seed`` is not needed: the table decides.
    """
    del seed
    swaps = {a: b for a, b in REGISTER} | {b: a for a, b in REGISTER}
    pattern = re.compile(
        r"\b(" + "|".join(re.escape(k) for k in sorted(swaps, key=len, reverse=True)) + r")\b",
        re.IGNORECASE,
    )
    shifted = pattern.sub(lambda m: _match_case(m.group(), swaps[m.group().lower()]), text)
    return shifted if shifted != text else text.lower()


PERTURBATIONS: dict[str, Callable[[str, int], str]] = {
    "typo": typo,
    "case_flip": case_flip,
    "drop_punct": drop_punct,
    "synonym_swap": synonym_swap,
    "clause_reverse": clause_reverse,
    "prefix_inject": prefix_inject,
    "register_shift": register_shift,
}


def perturb(text: str, name: str, seed: int) -> str:
    """``text`` rewritten by the perturbation ``name``; unknown names raise ValueError."""
    try:
        fn = PERTURBATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown perturbation {name!r} (known: {', '.join(PERTURBATIONS)})"
        ) from None
    return fn(text, seed)
