"""A training run's own data as the quick eval's workload.

The data (read by :mod:`.data_splits`) is in one of mlx-lm's formats, told apart as
mlx-lm tells them (by the first row's keys):

- ``completions``: ``{"prompt", "completion"}`` (mlx-lm trains them as a user turn and an
  assistant turn of the chat template, so the prompt is rendered as that user turn);
- ``chat``: ``{"messages": [...]}`` and ``tools``: the same with ``"tools"``: the
  conversation up to its last assistant turn, through the tokenizer's chat template,
  with the assistant's turn opened;
- ``text``: ``{"text"}``: its first sentence, at most :data:`PROMPT_WORDS` words.

The prompts come from the held-out split (``valid``, else ``test``; with neither, the
last tenth of ``train``, which the run may have trained on), a seeded choice of at most
:data:`MAX_PROMPTS`, in file order. The training text (what the model learned to write:
the ``text``, the ``completion``, the assistant turns) becomes the document of the
doc-based probes. A JSONL file or a ``datasets`` dataset saved to disk serves the same way.

Conversations stay unrendered (:class:`Conversation`) until a tokenizer is at hand
(:func:`render_prompts`): the model's own, once it is loaded.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sway_common.atomic import atomic_write
from sway_common.backend.generation import has_chat_template
from sway_common.backend.scoring import text_hash
from sway_common.probes import ProbeConfig
from sway_common.probes.leakage import LeakageConfig
from sway_common.probes.section_internalization import SectionInternalizationConfig
from sway_common.probes.style_fingerprint import StyleFingerprintConfig
from sway_common.suite.data_splits import (
    Features,
    Split,
    TrainingDataError,
    held_out,
    read_splits,
)
from sway_common.suite.spec import ModelSpec, SuiteSpec, quick_suite

MAX_PROMPTS = 16
DOC_EXAMPLES = 8
"""Training examples in the document: enough for the doc probes' windows and sections."""
STYLE_PROMPTS = 4
PROMPT_WORDS = 16
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


@dataclass
class Conversation:
    """Messages (and tools) to render through a chat template, the assistant's turn opened."""

    messages: list[dict[str, Any]]
    tools: Any = None

    def plain(self) -> str:
        """The messages' text, for a tokenizer with no chat template."""
        return "\n".join(str(m.get("content") or "") for m in self.messages).strip()


Prompt = str | Conversation


@dataclass
class Workload:
    """Prompts drawn from held-out rows and the training text, with where they came from."""

    prompts: list[Prompt]
    doc: str
    fmt: str
    source: str
    """The file (and split) the prompts came from, with what kind of rows they are."""

    def describe(self) -> str:
        return f"{len(self.prompts)} from {self.source} ({self.fmt} format)"


# ------------------------------------------------------------------ rows to prompts
def detect_format(row: dict[str, Any], features: Features, where: str) -> str:
    """mlx-lm's rule on a split's first row: completions, then chat (tools), then text."""
    if features.prompt in row and features.completion in row:
        return "completions"
    if features.chat in row:
        return "tools" if row.get("tools") else "chat"
    if features.text in row:
        return "text"
    keys = ", ".join(sorted(row)) or "none"
    raise TrainingDataError(
        f"{where}: a row with keys {keys} is in no mlx-lm format; expected "
        f"{features.prompt!r}+{features.completion!r}, {features.chat!r} or {features.text!r}"
    )


def first_words(text: str, words: int = PROMPT_WORDS) -> str:
    """The first sentence, at most ``words`` words."""
    flat = " ".join(text.split())
    end = _SENTENCE_END.search(flat)
    return " ".join((flat[: end.end()] if end else flat).split()[:words])


def _field(row: dict[str, Any], key: str, where: str) -> Any:
    if key not in row:
        raise TrainingDataError(f"{where}: no {key!r} field; every row of this file needs one")
    return row[key]


def prompt_of(row: dict[str, Any], fmt: str, features: Features, where: str) -> Prompt | None:
    """A row's prompt; None when it has none (an empty text, no turn before the answer)."""
    if fmt == "text":
        return first_words(str(_field(row, features.text, where))) or None
    if fmt == "completions":
        prompt = str(_field(row, features.prompt, where))
        return (
            Conversation([{"role": "user", "content": prompt}], row.get("tools"))
            if prompt.strip()
            else None
        )
    messages = _field(row, features.chat, where)
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise TrainingDataError(f"{where}: {features.chat!r} must be a list of messages")
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    head = messages[: turns[-1]] if turns else messages
    return Conversation(list(head), row.get("tools")) if head else None


def doc_of(row: dict[str, Any], fmt: str, features: Features, where: str) -> str:
    """The text a row taught the model to write."""
    if fmt == "text":
        return str(_field(row, features.text, where)).strip()
    if fmt == "completions":
        return str(_field(row, features.completion, where)).strip()
    messages = _field(row, features.chat, where)
    said = [
        m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "assistant"
    ]
    return "\n".join(s.strip() for s in said if isinstance(s, str) and s.strip())


def seeded_order(n: int, seed: int) -> list[int]:
    """Row indices in a seeded random order: the same for the same seed and row count."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def _drawn(
    split: Split, limit: int, seed: int, make: Callable[[dict[str, Any], str], Any]
) -> Iterator[tuple[int, Any]]:
    """(index, value) of up to ``limit`` rows in seeded order whose ``make`` gives a new value."""
    seen: set[str] = set()
    for i in seeded_order(len(split), seed):
        if len(seen) >= limit:
            return
        value = make(split.row(i), split.where(i))
        key = plain(value) if value else ""
        if key and key not in seen:
            seen.add(key)
            yield i, value


def load_workload(
    path: Path, features: Features | None = None, *, seed: int = 0, max_prompts: int = MAX_PROMPTS
) -> Workload:
    """Prompts from the held-out rows at ``path`` and the training text as the document."""
    features = features or Features()
    prompts_from, train = held_out(read_splits(path))
    fmt = detect_format(prompts_from.row(0), features, prompts_from.where(0))
    picked = _drawn(prompts_from, max_prompts, seed, lambda r, w: prompt_of(r, fmt, features, w))
    prompts = [p for _, p in sorted(picked, key=lambda x: x[0])]
    if not prompts:
        raise TrainingDataError(f"{prompts_from.source}: no row gives a prompt")
    texts = _drawn(train, DOC_EXAMPLES, seed, lambda r, w: doc_of(r, fmt, features, w))
    doc = "\n\n".join(t for _, t in sorted(texts, key=lambda x: x[0]))
    return Workload(prompts=prompts, doc=doc, fmt=fmt, source=prompts_from.source)


# ------------------------------------------------------------------ rendering
def plain(prompt: Prompt) -> str:
    """A prompt as text without a tokenizer (a conversation's messages, joined)."""
    return prompt if isinstance(prompt, str) else prompt.plain()


def render_prompts(prompts: Sequence[Prompt], tokenizer: Any = None) -> list[str]:
    """Prompts as the model reads them: conversations through the tokenizer's chat
    template (assistant turn opened), or as plain text where it has none."""
    return [_render(p, tokenizer) for p in prompts]


def _render(prompt: Prompt, tokenizer: Any) -> str:
    if isinstance(prompt, str) or tokenizer is None or not has_chat_template(tokenizer):
        return plain(prompt)
    try:
        text = tokenizer.apply_chat_template(
            prompt.messages, tools=prompt.tools, tokenize=False, add_generation_prompt=True
        )
    except Exception as e:  # a template raises what it likes (jinja errors, its own)
        raise TrainingDataError(
            f"the model's chat template refused a held-out conversation: {e}"
        ) from None
    return str(text)


def write_doc(text: str, root: Path) -> Path:
    """The training text as a file the doc probes read, named by its content."""
    path = root / f"{text_hash(text)}.txt"
    if not path.is_file():
        atomic_write(path, lambda f: f.write(text))
    return path


# ------------------------------------------------------------------ the suite
def doc_probes(doc: str, prompts: Sequence[str]) -> list[ProbeConfig]:
    """The doc-based probes on the training text: reported, not gating and outside the
    composite (weight 0), since a run without a spec asked for no such verdict; a spec
    that lists them gates on them. Smaller than their defaults, so the quick eval stays
    quick: leakage's windows fit a training example (often one short paragraph; a
    window never crosses one), and style_fingerprint writes less on fewer prompts."""
    off: dict[str, Any] = {"doc": doc, "gate": False, "weight": 0.0}
    return [
        LeakageConfig(
            name="leakage",
            kind="leakage",
            prefix_chars=64,
            continuation_chars=128,
            max_new_tokens=48,
            max_windows=4,
            perturbations=["typo", "prefix_inject"],
            **off,
        ),
        SectionInternalizationConfig(
            name="section_internalization",
            kind="section_internalization",
            max_prose_chars=512,
            **off,
        ),
        StyleFingerprintConfig(
            name="style_fingerprint",
            kind="style_fingerprint",
            prompts=list(prompts[:STYLE_PROMPTS]),
            max_new_tokens=48,
            **off,
        ),
    ]


def training_suite(
    prompts: Sequence[str], doc: str | None, *, runs: int = 8, model: ModelSpec | None = None
) -> SuiteSpec:
    """The quick suite on the training run's prompts, plus the doc probes on its text."""
    spec = quick_suite(list(prompts), runs=runs, model=model)
    if doc is not None:
        spec.probes.extend(doc_probes(doc, prompts))
    spec.source = "quick suite on the training data"
    return spec
