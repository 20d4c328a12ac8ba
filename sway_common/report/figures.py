"""Every PNG plot of a suite result, from one list: `--plot` writes them, `--html` embeds them.

A new kind of result plot is added to :data:`RESULT_PLOT_WRITERS` (and its caption to
``report/html.py: PLOT_TITLES``), and both reports show it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sway_common.report.attribution_plot import write_attribution_plots
from sway_common.report.plots import PathLike, write_plots
from sway_common.report.spectrum_plot import write_spectrum_plots
from sway_common.types import SuiteResult

RESULT_PLOT_WRITERS: tuple[Callable[[SuiteResult, PathLike], list[Path]], ...] = (
    write_plots,
    write_attribution_plots,
    write_spectrum_plots,
)
"""Each writes the plots that apply to a result into a directory and returns their paths."""


def write_result_plots(result: SuiteResult, plot_dir: PathLike) -> list[Path]:
    """Every plot that applies to ``result``, as PNGs in ``plot_dir``, in report order."""
    return [path for write in RESULT_PLOT_WRITERS for path in write(result, plot_dir)]
