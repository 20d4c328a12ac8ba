"""The built-in packs and the text handling of the likelihood probes (no model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sway_common.probes.packs import (
    chunks,
    load_corpus,
    load_items,
    paragraphs,
    read_text,
    sections,
    spread,
)

PROSE_DOC = Path(__file__).resolve().parent / "data" / "harrowgate.md"


def test_builtin_knowledge_pack_is_large_varied_and_well_formed() -> None:
    items = load_items("builtin")
    assert len(items) >= 200
    assert len({i.prompt for i in items}) == len(items)
    assert len({i.topic for i in items}) >= 8
    assert all(i.prompt.strip() and i.gold.strip() for i in items)
    # Completions continue the prompt: no doubled or missing space at the boundary.
    assert all(not i.prompt.endswith(" ") for i in items)


def test_builtin_corpus_has_enough_held_out_passages() -> None:
    passages = paragraphs(load_corpus("builtin"))
    assert len(passages) >= 16
    assert all(300 <= len(p) <= 2000 for p in passages)
    # Held out from the prose document the tests train on.
    assert not any("lighthouse" in p.lower() or "ledger" in p.lower() for p in passages)
    assert len(chunks(load_corpus("builtin"), 2048)) == len(passages)


def test_chunks_cut_long_paragraphs_and_join_short_ones() -> None:
    text = ("word " * 300).strip() + "\n\nshort one\n\nshort two\n\n" + "tail " * 40
    out = chunks(text, 200)
    assert all(len(c) <= 200 for c in out)
    assert "short one short two" in " ".join(out)
    assert " ".join(out).split() == text.split()


def test_spread_takes_evenly_from_every_topic() -> None:
    items = load_items("builtin")
    picked = spread(items, 24)
    assert len(picked) == 24 and len({i.topic for i in picked}) >= 8
    assert spread([1, 2, 3], None) == [1, 2, 3] and spread([1, 2, 3], 10) == [1, 2, 3]


def test_sections_split_at_atx_and_setext_headings() -> None:
    doc = "intro words\n\n# One\nalpha\n\n## Two ##\nbeta\n\nThree\n-----\ngamma\n"
    assert sections(doc) == [
        ("preamble", "intro words"),
        ("One", "alpha"),
        ("Two", "beta"),
        ("Three", "gamma"),
    ]


def test_a_document_with_only_a_title_splits_into_paragraphs() -> None:
    found = sections(PROSE_DOC.read_text(encoding="utf-8"))
    assert len(found) == 5
    assert found[0][0].startswith("The Harrowgate lighthouse stands")
    assert not any(body.startswith("#") for _, body in found)


def test_user_files_load_and_bad_ones_say_why(tmp_path: Path) -> None:
    pack = tmp_path / "pack.jsonl"
    pack.write_text('{"prompt": "Two plus two is", "gold": " four"}\n\n', encoding="utf-8")
    assert load_items(str(pack))[0].gold == " four"
    pack.write_text('{"prompt": "no gold"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="pack.jsonl:1"):
        load_items(str(pack))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_text(latin)
    with pytest.raises(ValueError, match="cannot read"):
        read_text(tmp_path / "missing.txt")
