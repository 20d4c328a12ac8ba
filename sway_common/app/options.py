"""What every `sway-mlx` command shares: exit codes, the error line, options, prompts."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.markup import escape

from sway_common.app.platform import BACKEND_KINDS, installed
from sway_common.models import cache_root
from sway_common.null_cache import NullCache
from sway_common.probes.base import DEFAULT_PROMPTS
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
        text = Path(path).read_text(encoding="utf-8")
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


def report_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--json/--markdown/--junit/--plot, --backend and --seed for the suite commands."""
    options = [
        click.option(
            "--json",
            "json_path",
            type=click.Path(dir_okay=False),
            help="Write the full result as JSON here (loads back with sway_common.report.load_json).",
        ),
        click.option(
            "--markdown",
            "markdown_path",
            type=click.Path(dir_okay=False),
            help="Write a Markdown report here.",
        ),
        click.option(
            "--junit",
            "junit_path",
            type=click.Path(dir_okay=False),
            help="Write a JUnit XML report here (for CI).",
        ),
        plot_option("z per probe against the null band, the ablation curve"),
        backend_option(),
        seed_option,
        no_cache_option,
    ]
    for option in reversed(options):
        f = option(f)
    return f
