"""docs/architecture.md names real code: every `file.py: Name.attr` reference resolves."""

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


def test_every_reference_in_the_architecture_page_exists() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    references = REFERENCE.findall(text)
    assert len(references) > 20, "the page names the code it walks through"
    for suffix, dotted in references:
        obj = importlib.import_module(module_for(suffix))
        for part in dotted.split("."):
            assert hasattr(obj, part), f"{suffix}: {dotted} does not exist"
            obj = getattr(obj, part)
