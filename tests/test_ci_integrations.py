"""The pre-commit hook and the GitHub Action, run as CI would run them.

- pre-commit: `pre-commit try-repo` on a git copy of this project runs the `sway-gate` hook
  on the sample spec, in the environment pre-commit builds for it (sway-mlx without
  extras, from the package index: no torch, no mlx).
- the Action: its shell steps are scripts/action-gate.sh, run here with a dummy-backend
  spec; action.yml only calls it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SPEC = REPO / "examples" / "sway-gate.yaml"
SCRIPT = REPO / "scripts" / "action-gate.sh"
VENV_BIN = Path(sys.executable).parent
# What `pip install .` needs, and the hook manifest.
HOOK_REPO_FILES = ("pyproject.toml", "README.md", ".pre-commit-hooks.yaml")
HOOK_REPO_DIRS = ("sway_common", "sway_mlx", "sway_hf")
FIXED_GIT = {
    "GIT_AUTHOR_NAME": "sway",
    "GIT_AUTHOR_EMAIL": "sway@example.invalid",
    "GIT_AUTHOR_DATE": "2026-01-01T00:00:00+00:00",
    "GIT_COMMITTER_NAME": "sway",
    "GIT_COMMITTER_EMAIL": "sway@example.invalid",
    "GIT_COMMITTER_DATE": "2026-01-01T00:00:00+00:00",
}


def _git(cwd: Path, *args: str) -> str:
    env = {**os.environ, **FIXED_GIT}
    done = subprocess.run(
        ["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True
    )
    return done.stdout.strip()


def _build_hook_repo(dst: Path) -> None:
    """A git repo of this project's package sources at ``dst``."""
    dst.mkdir(parents=True)
    for name in HOOK_REPO_FILES:
        shutil.copy2(REPO / name, dst / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
    for name in HOOK_REPO_DIRS:
        shutil.copytree(REPO / name, dst / name, ignore=ignore)
    _git(dst, "init", "-q", "-b", "main")
    _git(dst, "add", "-A")
    _git(dst, "commit", "-q", "-m", "sway-mlx hook repo")


def test_pre_commit_try_repo_runs_the_hook_on_the_sample_spec(tmp_path: Path) -> None:
    """try-repo builds the hook's environment afresh each time (its own temp store), by
    `pip install .` from the package index: a minute on a busy 2-core machine, so once."""
    hook_repo = tmp_path / "hook-repo"
    _build_hook_repo(hook_repo)
    project = tmp_path / "project"
    project.mkdir()
    _git(project, "init", "-q")
    shutil.copy(SAMPLE_SPEC, project / "sway.yaml")  # the hook's default argument
    _git(project, "add", "sway.yaml")

    done = subprocess.run(
        [sys.executable, "-m", "pre_commit", "try-repo", str(hook_repo), "sway-gate"]
        + ["--all-files", "--verbose"],
        cwd=project,
        env={**os.environ, "PRE_COMMIT_HOME": str(tmp_path / "pre-commit-home")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sway-mlx gate" in done.stdout and "Passed" in done.stdout
    assert "PASS score=" in done.stdout


def test_a_plain_install_has_no_framework() -> None:
    """The hook's environment (and `pip install .`) gets only the base dependencies: the
    passing hook above then shows a dummy-backend gate needs neither torch nor mlx."""
    base = [r for r in importlib.metadata.requires("sway-mlx") or [] if "extra ==" not in r]
    names = {re.split(r"[\s<>=!~;\[]", dep, maxsplit=1)[0].lower() for dep in base}
    assert "numpy" in names
    assert not names & {"torch", "mlx", "mlx-lm", "transformers", "peft", "matplotlib"}


def test_the_hook_manifest_gates_a_spec_it_is_given() -> None:
    (hook,) = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    assert hook["id"] == "sway-gate" and hook["entry"] == "sway-mlx gate"
    assert hook["language"] == "python" and hook["pass_filenames"] is False
    assert hook["args"] == ["sway.yaml"]


# ------------------------------------------------------------------ the GitHub Action
def _action(mode: str, tmp_path: Path, **env: str) -> tuple[int, str, dict[str, str], str]:
    """Run the action's script as a step would: (exit code, output, GITHUB_OUTPUT, summary)."""
    outputs, summary = tmp_path / "github_output", tmp_path / "step_summary"
    outputs.write_text("")
    summary.write_text("")
    full_env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        "GITHUB_OUTPUT": str(outputs),
        "GITHUB_STEP_SUMMARY": str(summary),
        **env,
    }
    done = subprocess.run(
        ["bash", str(SCRIPT), mode],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    values = dict(line.split("=", 1) for line in outputs.read_text().splitlines())
    return done.returncode, done.stdout + done.stderr, values, summary.read_text()


def test_action_gate_passes_and_writes_every_report(tmp_path: Path) -> None:
    code, output, values, summary = _action(
        "gate", tmp_path, SWAY_SPEC=str(SAMPLE_SPEC), SWAY_OUT="reports", SWAY_ARGS="--seed 3"
    )
    assert code == 0, output
    assert values == {"verdict": "PASS", "exit-code": "0"}
    out = tmp_path / "reports"
    assert sorted(p.name for p in out.iterdir()) == [
        "sway.html",
        "sway.json",
        "sway.md",
        "sway.xml",
    ]
    result = json.loads((out / "sway.json").read_text())
    assert result["verdict"] == "PASS" and result["meta"]["seed"] == 3
    assert ET.parse(out / "sway.xml").getroot().get("failures") == "0"
    assert 'id="verdict"' in (out / "sway.html").read_text(encoding="utf-8")
    assert summary.startswith("# sway-mlx: PASS")


def test_action_gate_fails_on_the_threshold_and_still_reports(tmp_path: Path) -> None:
    code, output, values, summary = _action(
        "gate", tmp_path, SWAY_SPEC=str(SAMPLE_SPEC), SWAY_THRESHOLD="1.0"
    )
    assert code == 1, output
    assert values == {"verdict": "FAIL", "exit-code": "1"}
    assert (tmp_path / "sway-report" / "sway.html").is_file()
    assert summary.startswith("# sway-mlx: FAIL")


def test_action_gate_on_a_missing_spec_exits_two(tmp_path: Path) -> None:
    code, output, values, summary = _action("gate", tmp_path, SWAY_SPEC="nope.yaml")
    assert code == 2 and "nope.yaml" in output
    assert values == {"verdict": "ERROR", "exit-code": "2"} and summary == ""


def test_action_install_runs_pip_with_the_extras(tmp_path: Path) -> None:
    """pip itself is stood in for (no download); the null-cache dir is the real code's."""
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "pip.log"
    (fake / "python").write_text(
        "#!/usr/bin/env bash\n"
        f'if [ "$1 $2" = "-m pip" ]; then printf "%s\\n" "$@" > {log}; exit 0; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    (fake / "python").chmod(0o755)
    env = {"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "SWAY_SOURCE": "/src/sway-mlx"}
    extra_index = "--extra-index-url https://download.pytorch.org/whl/cpu"
    code, output, values, _ = _action(
        "install", tmp_path, **env, SWAY_EXTRAS="hf,plot", SWAY_PIP_ARGS=extra_index
    )
    assert code == 0, output
    args = log.read_text().split("\n")
    assert args[-2] == "/src/sway-mlx[hf,plot]" and extra_index.split() == args[-4:-2]
    assert values == {"null-cache-dir": os.environ["SWAY_MLX_NULL_CACHE"]}
    code, output, _, _ = _action("install", tmp_path, **env, SWAY_EXTRAS="hf plot; rm -rf /")
    assert code == 2 and "comma-separated" in output


def test_action_yml_only_calls_the_script() -> None:
    """Every shell step is the tested script; no input is spliced into a command."""
    action = yaml.safe_load((REPO / "action.yml").read_text())
    steps = action["runs"]["steps"]
    assert action["runs"]["using"] == "composite"
    runs = [s["run"] for s in steps if "run" in s]
    assert runs == [
        f'bash "$GITHUB_ACTION_PATH/scripts/action-gate.sh" {m}' for m in ("install", "gate")
    ]
    uses = {s["uses"].split("@")[0]: s for s in steps if "uses" in s}
    assert set(uses) >= {"actions/setup-python", "actions/cache/restore", "actions/cache/save"}
    upload = uses["actions/upload-artifact"]
    assert upload["with"]["path"] == "${{ inputs.output-dir }}" and "always()" in upload["if"]
    cache_dir = "${{ steps.install.outputs.null-cache-dir }}"
    assert uses["actions/cache/restore"]["with"]["path"] == cache_dir
    assert uses["actions/cache/save"]["with"]["path"] == cache_dir
