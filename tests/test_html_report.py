"""`--html`: one self-contained page, checked as text and opened in a real Chromium.

The browser test never skips: it runs the system's Chromium (`make install` installs
Debian's) or Playwright's own, and fails, naming the fix, when there is neither.
"""

from __future__ import annotations

import json
import shutil
import sys
from html import escape
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from dummy_specs import write_dummy_spec

from sway_common.app.cli import app
from sway_common.report import headline, load_json
from sway_common.report import html as html_report
from sway_common.types import SuiteResult

DOC_PROMPTS = ["The keeper said", "<script>alert(1)</script> storm", "A ledger entry"]
PROMPTS = ["The keeper said", "Tell me about the light", "In the storm", "A ledger entry:"]


NO_BROWSER = "make install puts Debian's in place (apt-get install chromium); elsewhere run `playwright install chromium`"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def _eval(tmp_path: Path, *args: str, command: str = "eval") -> tuple[int, str]:
    result = CliRunner().invoke(app, [command, *args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def dummy_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SuiteResult]:
    """`eval SPEC --html --json` on the dummy backend: the page and the result it shows."""
    tmp = tmp_path_factory.mktemp("html")
    spec = write_dummy_spec(tmp, "trained", prompts=DOC_PROMPTS)
    out = tmp / "out"
    code, output = _eval(
        tmp, str(spec), "--html", str(out / "r.html"), "--json", str(out / "r.json")
    )
    assert code == 0, output
    return out / "r.html", load_json(out / "r.json")


def test_page_holds_verdict_table_plots_and_per_prompt_rows(
    dummy_report: tuple[Path, SuiteResult],
) -> None:
    path, result = dummy_report
    page = path.read_text(encoding="utf-8")
    verdict_at = page.index('id="verdict"')
    assert page.index("<h2>Probes</h2>") > verdict_at and page.index("<h2>Plots</h2>") > verdict_at
    assert escape(headline(result)) in page
    assert page.count("data:image/png;base64,") == 2  # the z bars and the ablation curve
    for p in result.probes:
        assert f'<details id="probe-{p.name}">' in page
    # A prompt is text, never markup: no script element reaches the page.
    assert "&lt;script&gt;alert(1)&lt;/script&gt; storm" in page
    assert "<script" not in page
    # Self-contained: nothing names another origin.
    assert "http://" not in page and "https://" not in page and 'src="data:' in page
    assert not list(path.parent.glob(".*.tmp"))


def test_without_matplotlib_the_page_says_so_in_one_line(
    dummy_report: tuple[Path, SuiteResult], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    _, result = dummy_report
    html_report.write_html(result, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert html_report.NO_MATPLOTLIB.replace("'", "&#x27;") in page
    assert "<img" not in page and 'id="verdict"' in page and "Per prompt" in page


def test_a_failed_render_leaves_the_previous_report(
    dummy_report: tuple[Path, SuiteResult], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _, result = dummy_report
    target = tmp_path / "r.html"
    target.write_text("previous report")

    def broken(*a: Any, **k: Any) -> str:
        raise RuntimeError("renderer broke")

    monkeypatch.setattr(html_report, "render_html", broken)
    with pytest.raises(RuntimeError):
        html_report.write_html(result, target)
    assert target.read_text() == "previous report" and len(list(tmp_path.iterdir())) == 1


def test_gate_writes_the_page_for_a_failing_adapter_and_refuses_a_directory(
    tmp_path: Path,
) -> None:
    spec = write_dummy_spec(tmp_path, "untrained", prompts=DOC_PROMPTS)
    code, output = _eval(tmp_path, str(spec), "--html", str(tmp_path / "r.html"), command="gate")
    assert code == 1 and output.startswith("FAIL"), output
    assert "FAIL</span> sway-mlx verdict" in (tmp_path / "r.html").read_text(encoding="utf-8")
    (tmp_path / "dir.html").mkdir()
    code, output = _eval(tmp_path, str(spec), "--html", str(tmp_path / "dir.html"))
    assert code == 2 and "--html" in output and "is a directory" in output


def test_every_result_plot_gets_a_caption() -> None:
    assert html_report.plot_title("sway-z") == html_report.PLOT_TITLES["sway-z"]
    attribution = html_report.PLOT_TITLES["sway-attribution"]
    assert html_report.plot_title("sway-attribution-doc") == f"{attribution} (doc)"
    assert html_report.plot_title("sway-new-kind") == "sway-new-kind"


# ------------------------------------------------------------------ in a real browser
def _open(path: Path, expand: str) -> dict[str, Any]:
    """Open ``path`` in Chromium; what a reader sees, before and after unfolding the
    probe ``expand``'s detail."""
    from playwright.sync_api import sync_playwright

    seen: dict[str, Any] = {"errors": [], "requests": []}
    with sync_playwright() as pw:
        try:  # the system's Chromium, else Playwright's own (`playwright install chromium`)
            browser = pw.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        except Exception as e:  # a missing browser fails the test, with the fix
            pytest.fail(f"no Chromium to run: {NO_BROWSER} ({type(e).__name__})")
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on(
                "console",
                lambda m: seen["errors"].append(m.text) if m.type == "error" else None,
            )
            page.on("pageerror", lambda e: seen["errors"].append(str(e)))
            page.on("request", lambda r: seen["requests"].append(r.url))
            page.goto(path.resolve().as_uri(), wait_until="load")
            verdict = page.locator("#verdict")
            seen["verdict"] = verdict.inner_text() if verdict.is_visible() else None
            seen["headline"] = page.locator("#headline").inner_text()
            seen["captions"] = page.locator("figcaption").all_inner_texts()
            seen["plots"] = [
                {
                    "visible": el.is_visible(),
                    "box": el.bounding_box(),
                    "decoded": el.evaluate("e => e.tagName !== 'IMG' || e.naturalWidth > 0"),
                }
                for el in page.locator("img, svg").all()
            ]
            rows = page.locator(f"#probe-{expand} table.prompts tr")
            seen["rows_before"] = rows.first.is_visible()
            page.locator(f"#probe-{expand} > summary").click()
            seen["rows_after"] = [r.inner_text() for r in rows.all() if r.is_visible()]
            seen["scripts"] = page.locator("script").count()
        finally:
            browser.close()
    return seen


def _assert_renders(seen: dict[str, Any], verdict: str, line: str, plots: int) -> None:
    assert seen["errors"] == [], seen["errors"]
    assert [u for u in seen["requests"] if not u.startswith(("file:", "data:"))] == []
    assert seen["verdict"] is not None and verdict in seen["verdict"]
    assert seen["headline"] == line
    assert len(seen["plots"]) == plots, seen["plots"]
    for plot in seen["plots"]:
        box = plot["box"]
        assert plot["visible"] and plot["decoded"] and box["width"] > 50 and box["height"] > 50
    assert seen["scripts"] == 0


def test_dummy_report_renders_in_chromium(dummy_report: tuple[Path, SuiteResult]) -> None:
    path, result = dummy_report
    seen = _open(path, "doc")
    _assert_renders(seen, result.verdict.value, headline(result), plots=2)
    # Per-prompt detail is folded until asked for, then a row per prompt (and the header).
    assert seen["rows_before"] is False and len(seen["rows_after"]) == 4
    assert "<script>alert(1)</script> storm" in seen["rows_after"][2]


def test_real_model_report_renders_in_chromium(
    tiny_model_dir: Path, tiny_mlx_adapter: Path, real_backend: str, tmp_path: Path
) -> None:
    """A quick eval of a trained adapter on the tiny Llama: real plots from real numbers."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    code, output = _eval(
        tmp_path,
        "--model",
        str(tiny_model_dir),
        "--adapter-path",
        str(tiny_mlx_adapter),
        "--backend",
        real_backend,
        "--prompts",
        str(prompts),
        "--runs",
        "3",
        "--html",
        str(out / "r.html"),
        "--json",
        str(out / "r.json"),
    )
    assert code in (0, 1), output
    result = load_json(out / "r.json")
    seen = _open(out / "r.html", "delta_kl")
    # Every plot of the page shows: the z bars and the ablation curve, and any other the
    # quick suite's probes draw.
    embedded = (out / "r.html").read_text(encoding="utf-8").count("data:image/png;base64,")
    _assert_renders(seen, result.verdict.value, headline(result), plots=embedded)
    titles = html_report.PLOT_TITLES
    assert {titles["sway-z"], titles["sway-ablation"]} <= set(seen["captions"])
    assert len(seen["rows_after"]) == len(PROMPTS) + 1
    assert json.loads((out / "r.json").read_text())["meta"]["backend"] == real_backend
