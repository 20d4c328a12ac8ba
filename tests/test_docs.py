"""The docs name real code and real files: every `file.py: Name.attr` reference in docs/
resolves, every relative link of the README and docs/ points at a file, and the README stays
a front page."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sway_common", "sway_mlx", "sway_hf")
REFERENCE = re.compile(r"`([\w/]+\.py): ([\w.]+)`")


def module_for(suffix: str) -> str:
    """The one module of the three packages whose path ends with ``suffix``."""
    found = [
        path
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if path.as_posix().endswith("/" + suffix)
    ]
    assert len(found) == 1, f"{suffix!r} names {len(found)} files: give more of its path"
    return ".".join(found[0].relative_to(ROOT).with_suffix("").parts)


def check_references(text: str) -> int:
    """Import each `file.py: Name.attr` of ``text``; how many there were."""
    references = REFERENCE.findall(text)
    for suffix, dotted in references:
        obj = importlib.import_module(module_for(suffix))
        for part in dotted.split("."):
            assert hasattr(obj, part), f"{suffix}: {dotted} does not exist"
            obj = getattr(obj, part)
    return len(references)


def test_every_reference_in_the_architecture_page_exists() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert check_references(text) > 20, "the page names the code it walks through"


def test_every_reference_in_the_other_docs_exists() -> None:
    for page in sorted((ROOT / "docs").glob("*.md")):
        if page.name != "architecture.md":
            check_references(page.read_text())


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_relative_links_point_at_files() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_the_readme_is_a_front_page() -> None:
    size = len((ROOT / "README.md").read_bytes())
    assert size <= 12 * 1024, f"README.md is {size} bytes: move reference text to docs/"
