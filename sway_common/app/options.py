"""What every `sway-mlx` command shares: exit codes, the error line, options, prompts."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.markup import escape

from sway_common.app.placement import placement_options
from sway_common.app.platform import installed
from sway_common.models import cache_root
from sway_common.null_cache import NullCache
from sway_common.probes.base import DEFAULT_PROMPTS
from sway_common.suite.spec import BACKEND_KINDS
from sway_common.types import Verdict

EXIT_PASS, EXIT_FAIL, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
# WARN is not a failure: it names something to look at, the adapter still did its job.
EXIT_BY_VERDICT = {Verdict.PASS: EXIT_PASS, Verdict.WARN: EXIT_PASS, Verdict.FAIL: EXIT_FAIL}

err_console = Console(stderr=True)
# Where the group's --debug flag is kept (click's ctx.meta is shared by every subcommand).
DEBUG_KEY = "sway_mlx.debug"

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def debugging() -> bool:
    """Whether ``sway-mlx --debug`` was given: errors then come with their traceback."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.meta.get(DEBUG_KEY))


def fail(message: str) -> NoReturn:
    """One line naming the problem (and the fix), exit 2.

    The message is printed as plain text: rich would read ``sway-mlx[plot]`` as a style
    tag and print ``sway-mlx``, an install hint that installs nothing new.
    """
    if debugging() and sys.exc_info()[1] is not None:
        traceback.print_exc()
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(EXIT_ERROR)


def exit_code(verdict: Verdict) -> int:
    """0 for PASS and WARN, 1 for FAIL, 2 for anything else (ERROR, SKIP)."""
    return EXIT_BY_VERDICT.get(verdict, EXIT_ERROR)


def exit_interrupted(message: str) -> NoReturn:
    """Ctrl-C: one line on stderr saying what became of the work, exit 130."""
    err_console.print(message, highlight=False)
    sys.exit(EXIT_INTERRUPTED)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_prompts(path: str | None) -> list[str]:
    """Prompts from a UTF-8 file, one per line (blank lines and '#' comments skipped).

    Without a file, the built-in generic prompts.
    """
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        # utf-8-sig: a byte-order mark (as some editors write) is not part of the first prompt.
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        fail(f"the prompts file {path} is not UTF-8 text; save it as UTF-8")
    except OSError as e:
        fail(f"cannot read the prompts file {path}: {e.strerror or e}; check the path")
    prompts = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    if not prompts:
        fail(f"the prompts file {path} holds no prompts; write one prompt per line")
    return prompts


def require_plotting(alternative: str = "or leave out --plot") -> None:
    """Refuse before any work when plots were asked for and matplotlib is missing."""
    if not installed("matplotlib"):
        fail(f"plots need matplotlib: pip install 'sway-mlx[plot]' ({alternative})")


def file_option(flag: str, dest: str, help: str) -> Decorator:
    """An option naming a file (never a directory), kept in the parameter ``dest``."""
    return click.option(flag, dest, type=click.Path(dir_okay=False), help=help)


def runs_option(help: str, most: int | None = 64) -> Decorator:
    """--runs: how many null adapters to draw (at least 2: a spread needs two)."""
    return click.option(
        "--runs", type=click.IntRange(2, most), default=8, show_default=True, help=help
    )


def backend_option(kinds: tuple[str, ...] = BACKEND_KINDS) -> Decorator:
    return click.option(
        "--backend",
        type=click.Choice(kinds),
        default="auto",
        show_default=True,
        help="auto: MLX on Apple silicon, HF on CUDA, elsewhere HF if torch is installed, else MLX.",
    )


seed_option: Decorator = click.option(
    "--seed",
    type=int,
    default=None,
    help="Seed of the null adapters [default: the spec's defaults.seed, else 0].",
)


no_cache_option: Decorator = click.option(
    "--no-cache",
    is_flag=True,
    help="Recompute the null adapters' measurements instead of reading them from the cache "
    "(kept under $SWAY_MLX_CACHE/nulls, keyed by model, adapter, prompts and seeds).",
)


def null_cache(no_cache: bool) -> NullCache | None:
    """The null cache: ``$SWAY_MLX_NULL_CACHE``, else ``nulls/`` in the sway-mlx cache."""
    if no_cache:
        return None
    return NullCache(os.environ.get("SWAY_MLX_NULL_CACHE") or cache_root() / "nulls")


def plot_option(what: str, default: str | None = None) -> Decorator:
    shown = f" [default: {default}]" if default else ""
    return click.option(
        "--plot",
        "plot_dir",
        type=click.Path(file_okay=False),
        help=f"Write PNG plots ({what}) into this directory{shown}.",
    )


def safety_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--allow-pickle and --trust-remote-code: both off, so a model or adapter runs no code."""
    f = click.option(
        "--trust-remote-code",
        is_flag=True,
        help="Let a model whose config.json names its own Python code (auto_map) run it. "
        "Off by default: only for a source you trust.",
    )(f)
    return click.option(
        "--allow-pickle",
        is_flag=True,
        help="Read pickled weights (pytorch_model.bin, adapter_model.bin). Off by default: "
        "only safetensors are read, since a pickle can run code when loaded.",
    )(f)


def option_group(cls: type[Any], options: Sequence[Decorator]) -> Decorator:
    """Add ``options`` to a command and hand their values to it as one ``args: cls``: a
    dataclass whose field names are the options' parameter names."""
    names = [f.name for f in dataclasses.fields(cls)]

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)  # keeps the command's help and the options declared below
        def command(*a: Any, **kw: Any) -> Any:
            return f(*a, args=cls(**{name: kw.pop(name) for name in names}), **kw)

        decorated: Callable[..., Any] = command
        for option in reversed(options):
            decorated = option(decorated)
        return decorated

    return decorate


@dataclass
class SuiteArgs:
    """The options every command that reports a suite result shares (:data:`suite_options`)."""

    json_path: str | None
    markdown_path: str | None
    junit_path: str | None
    html_path: str | None
    plot_dir: str | None
    backend: str
    seed: int | None
    no_cache: bool
    allow_pickle: bool
    trust_remote_code: bool
    device_map: str | None
    max_memory: dict[str, str] | None
    dtype: str | None

    @property
    def reports(self) -> dict[str, str | None]:
        """Report kind → the path to write it to, or None."""
        return {
            "json": self.json_path,
            "markdown": self.markdown_path,
            "junit": self.junit_path,
            "html": self.html_path,
        }


suite_options = option_group(
    SuiteArgs,
    [
        file_option(
            "--json",
            "json_path",
            "Write the full result as JSON here (loads back with sway_common.report.load_json).",
        ),
        file_option("--markdown", "markdown_path", "Write a Markdown report here."),
        file_option("--junit", "junit_path", "Write a JUnit XML report here (for CI)."),
        file_option(
            "--html",
            "html_path",
            "Write one self-contained HTML page here: verdict, probe table, plots (with "
            "matplotlib), per-prompt detail. Opens offline; nothing is fetched.",
        ),
        plot_option("z per probe against the null band, the ablation curve"),
        backend_option(),
        seed_option,
        no_cache_option,
        safety_options,
        *placement_options,
    ],
)
"""--json/--markdown/--junit/--html/--plot, --backend, --seed, --no-cache, the safety options
and --device-map/--max-memory/--dtype, handed to the command as one ``args: SuiteArgs``."""
