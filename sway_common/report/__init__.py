"""Reports of a SuiteResult: terminal (rich), JSON, Markdown and JUnit files."""

from sway_common.report.files import (
    atomic_write,
    atomic_write_text,
    load_json,
    render_junit,
    render_markdown,
    to_jsonable,
    write_json,
    write_junit,
    write_markdown,
)
from sway_common.report.headline import headline
from sway_common.report.terminal import render_terminal

__all__ = [
    "atomic_write",
    "headline",
    "atomic_write_text",
    "load_json",
    "render_junit",
    "render_markdown",
    "render_terminal",
    "to_jsonable",
    "write_json",
    "write_junit",
    "write_markdown",
]
