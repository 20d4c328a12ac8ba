"""Every bad input a user can hand `sway-mlx eval`/`gate`: one line, exit 2, nothing written.

One table, one test: each case builds its command from shared broken artefacts (made once
per module from the tiny model and adapter), runs it through click, and asserts

- exit 2 (bad input; a verdict on an adapter would be 1),
- exactly one line of output, starting ``error:``, naming the problem and the fix,
- no traceback (``--debug`` shows one; tested below the table),
- no report: ``--json`` and ``--markdown`` point into a fresh directory that must stay empty.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from adapter_variants import edited_peft
from click.testing import CliRunner

from sway_common.app.cli import app

# A run reaches a model only in the few cases that need one (another base, a long prompt,
# remote code, a hub id): every other case must fail before torch is even asked.


@dataclass
class Env:
    """The shared artefacts: a good model and adapter, broken copies, specs on demand."""

    root: Path
    model: Path
    adapter: Path
    made: dict[str, Path] = field(default_factory=dict)

    def spec(self, name: str, body: dict | str, *, suffix: str = ".yaml") -> Path:
        path = self.root / "specs" / f"{name}{suffix}"
        path.parent.mkdir(exist_ok=True)
        text = body if isinstance(body, str) else yaml.safe_dump(body, sort_keys=False)
        path.write_text(text, encoding="utf-8")
        return path

    def suite(self, name: str, *probes: dict, **top: object) -> Path:
        """A valid spec on the tiny model, with ``probes`` as its suite (and top-level edits)."""
        body = {
            "version": 1,
            "models": {"ft": {"base": str(self.model), "adapter": str(self.adapter)}},
            "suite": list(probes) or [NULLS, KL],
        }
        body.update(top)
        return self.spec(name, body)


NULLS = {"name": "nulls", "kind": "null_adapter", "runs": 2}
KL = {"name": "kl", "kind": "delta_kl", "prompts": ["The keeper said", "In the storm"]}
ABLATION = {"name": "abl", "kind": "adapter_ablation", "prompts": ["The keeper said"]}


def _copy_model(src: Path, dst: Path, keep: Callable[[str], bool]) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if keep(f.name):
            shutil.copy(f, dst / f.name)
    return dst


def _pickled_model(src: Path, dst: Path) -> Path:
    import torch
    from safetensors.torch import load_file

    _copy_model(src, dst, lambda n: not n.endswith(".safetensors"))
    torch.save(load_file(str(src / "model.safetensors")), dst / "pytorch_model.bin")
    return dst


def _remote_code_model(src: Path, dst: Path) -> Path:
    _copy_model(src, dst, lambda n: True)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(
        model_type="sway_custom_llama",
        architectures=["CustomForCausalLM"],
        auto_map={"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"},
    )
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _pickled_adapter(src: Path, dst: Path) -> Path:
    import torch
    from safetensors.torch import load_file

    dst.mkdir()
    shutil.copy(src / "adapter_config.json", dst)
    torch.save(load_file(str(src / "adapter_model.safetensors")), dst / "adapter_model.bin")
    return dst


def _poisoned(src: Path, dst: Path, value: float) -> Path:
    def edit(t: dict[str, np.ndarray]) -> None:
        key = sorted(k for k in t if "lora_B" in k)[0]
        t[key] = t[key].copy()
        t[key][0, 0] = value

    return edited_peft(src, dst, edit)


def _integer_factors(src: Path, dst: Path) -> Path:
    """Factors saved as integers (a quantised or mis-cast export): not a LoRA adapter."""

    def edit(t: dict[str, np.ndarray]) -> None:
        for k in [k for k in t if "lora_" in k]:
            t[k] = np.round(t[k] * 100).astype(np.int32)

    return edited_peft(src, dst, edit)


def _other_base(src: Path, dst: Path) -> Path:
    """The adapter as if trained on a model of hidden size 48: every lora_A is (4, 48)."""

    def edit(t: dict[str, np.ndarray]) -> None:
        rng = np.random.default_rng(0)
        for k in [k for k in t if "lora_A" in k]:
            t[k] = rng.normal(size=(t[k].shape[0], 48)).astype(np.float32)

    return edited_peft(src, dst, edit)


def _edited_config(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def _corrupt(src: Path, dst: Path, data: Callable[[bytes], bytes]) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "adapter_model.safetensors"
    weights.write_bytes(data(weights.read_bytes()))
    return dst


def _read_only_dir(root: Path) -> Path:
    """A directory no file can be created in, also for root (who ignores mode bits)."""
    if os.geteuid() == 0:
        return Path("/sys")  # sysfs refuses new files whoever asks
    path = root / "read-only"
    path.mkdir()
    path.chmod(0o555)
    return path


@pytest.fixture(scope="module")
def env(
    tiny_model_dir: Path, tiny_peft_adapter: Path, tmp_path_factory: pytest.TempPathFactory
) -> Env:
    root = tmp_path_factory.mktemp("bad_input")
    e = Env(root, tiny_model_dir, tiny_peft_adapter)
    m, a = tiny_model_dir, tiny_peft_adapter
    e.made.update(
        model_no_weights=_copy_model(
            m, root / "m-noweights", lambda n: not n.endswith(".safetensors")
        ),
        model_no_tokenizer=_copy_model(
            m, root / "m-notok", lambda n: not n.startswith("tokenizer")
        ),
        model_bad_config=_copy_model(m, root / "m-badcfg", lambda n: n != "config.json"),
        model_pickled=_pickled_model(m, root / "m-pickle"),
        model_remote_code=_remote_code_model(m, root / "m-remote"),
        adapter_empty=root / "a-empty",
        adapter_pickled=_pickled_adapter(a, root / "a-pickle"),
        adapter_other_tuner=_edited_config(a, root / "a-ia3", peft_type="IA3"),
        adapter_bad_rank=_edited_config(a, root / "a-rank", r="four"),
        adapter_bad_config=_edited_config(a, root / "a-badcfg"),
        adapter_garbage=_corrupt(a, root / "a-garbage", lambda b: os.urandom(len(b))),
        adapter_truncated=_corrupt(a, root / "a-trunc", lambda b: b[: len(b) // 2]),
        adapter_other_base=_other_base(a, root / "a-otherbase"),
        adapter_nan=_poisoned(a, root / "a-nan", float("nan")),
        adapter_inf=_poisoned(a, root / "a-inf", float("inf")),
        adapter_integer=_integer_factors(a, root / "a-int"),
        read_only=_read_only_dir(root),
    )
    e.made["adapter_empty"].mkdir()
    (e.made["model_bad_config"] / "config.json").write_text("{not json")
    (e.made["adapter_bad_config"] / "adapter_config.json").write_text("{not json")
    (root / "a-file").write_text("not a directory")
    (root / "prompts-empty.txt").write_text("# only a comment\n\n", encoding="utf-8")
    (root / "prompts-latin1.txt").write_bytes("Le café est prêt\n".encode("latin-1"))
    (root / "prompts-long.txt").write_text("the keeper said " * 1500 + "\n", encoding="utf-8")
    (root / "outside.txt").write_text("a secret the spec must not read\n", encoding="utf-8")
    return e


@dataclass(frozen=True)
class Case:
    id: str
    args: Callable[[Env], list[str]]
    expect: tuple[str, ...]
    """Fragments of the one line: what is wrong, and what to do about it."""
    env: dict[str, str] = field(default_factory=dict)
    code: int = 2


def quick(
    model: Callable[[Env], object] = lambda e: e.model,
    adapter: Callable[[Env], object] = lambda e: e.adapter,
    *extra: str,
    backend: str = "hf",
) -> Callable[[Env], list[str]]:
    return lambda e: [
        "eval",
        "--model",
        str(model(e)),
        "--adapter-path",
        str(adapter(e)),
        "--runs",
        "2",
        "--backend",
        backend,
        *extra,
    ]


def spec(make: Callable[[Env], Path], command: str = "eval") -> Callable[[Env], list[str]]:
    return lambda e: [command, str(make(e)), "--backend", "hf"]


def made(name: str) -> Callable[[Env], Path]:
    return lambda e: e.made[name]


CASES = [
    # ---------------------------------------------------------------- the model
    Case(
        "model-missing",
        quick(lambda e: e.root / "no" / "such-model"),
        ("does not exist", "check the path"),
    ),
    Case(
        "model-is-a-file",
        quick(lambda e: e.model / "config.json"),
        ("is a file", "point at the model directory"),
    ),
    Case(
        "model-without-config", quick(lambda e: e.root / "a-empty"), ("no config.json", "point at")
    ),
    Case(
        "model-without-weights",
        quick(made("model_no_weights")),
        ("has no weights", "download the full model"),
    ),
    Case(
        "model-without-tokenizer",
        quick(made("model_no_tokenizer")),
        ("no tokenizer", "copy the tokenizer"),
    ),
    Case("model-config-not-json", quick(made("model_bad_config")), ("config.json", "re-download")),
    Case("model-pickle-only", quick(made("model_pickled")), ("pickled weights", "--allow-pickle")),
    Case(
        "model-needs-remote-code",
        quick(made("model_remote_code")),
        ("own Python code", "--trust-remote-code"),
    ),
    Case(
        "hub-id-offline",
        quick(lambda e: "sway-test-org/never-downloaded"),
        ("not in the Hugging Face cache", "HF_HUB_OFFLINE", "download it once online"),
        env={"HF_HUB_OFFLINE": "1"},
    ),
    # -------------------------------------------------------------- the adapter
    Case(
        "adapter-missing",
        quick(adapter=lambda e: e.root / "no-adapter"),
        ("does not exist", "give an adapter"),
    ),
    Case(
        "adapter-empty-dir",
        quick(adapter=made("adapter_empty")),
        ("not a LoRA adapter", "adapter_config.json"),
    ),
    Case(
        "adapter-garbage-weights",
        quick(adapter=made("adapter_garbage")),
        ("safetensors", "adapter_model"),
    ),
    Case(
        "adapter-truncated-weights",
        quick(adapter=made("adapter_truncated")),
        ("corrupt or truncated", "re-download"),
    ),
    Case(
        "adapter-config-not-json",
        quick(adapter=made("adapter_bad_config")),
        ("cannot read", "re-save the adapter"),
    ),
    Case(
        "adapter-config-wrong-type",
        quick(adapter=made("adapter_bad_rank")),
        ("r must be an integer",),
    ),
    Case(
        "adapter-pickle-only",
        quick(adapter=made("adapter_pickled")),
        ("adapter_model.bin", "--allow-pickle"),
    ),
    Case(
        "adapter-another-tuner",
        quick(adapter=made("adapter_other_tuner")),
        ("'IA3' is not supported", "only LORA"),
    ),
    Case(
        "adapter-another-base-hf",
        quick(adapter=made("adapter_other_base")),
        (
            "model.layers.0.self_attn.q_proj",
            "A(4, 48)",
            "(64, 64)",
            "trained on another base model",
        ),
    ),
    Case(
        "adapter-another-base-mlx",
        quick(adapter=made("adapter_other_base"), backend="mlx"),
        (
            "model.layers.0.self_attn.q_proj",
            "A(4, 48)",
            "(64, 64)",
            "trained on another base model",
        ),
    ),
    Case(
        "adapter-nan",
        quick(adapter=made("adapter_nan")),
        ("NaN/Inf", "lora_B", "earlier checkpoint"),
    ),
    Case("adapter-inf", quick(adapter=made("adapter_inf")), ("NaN/Inf", "retrain")),
    Case(
        "adapter-integer-factors",
        quick(adapter=made("adapter_integer")),
        ("int32 values", "floating point", "re-save"),
    ),
    # ----------------------------------------------------------------- the spec
    Case(
        "spec-missing",
        spec(lambda e: e.root / "nope.yaml"),
        ("cannot read the file", "check the path"),
    ),
    Case("spec-is-a-directory", spec(lambda e: e.root), ("is a directory", "--help")),
    Case(
        "spec-empty",
        spec(lambda e: e.spec("empty", "")),
        ("the file is empty", "write a sway.yaml"),
    ),
    Case(
        "spec-broken-yaml",
        spec(lambda e: e.spec("broken", "version: 1\nsuite: [\n  - {name: x")),
        ("not valid YAML at line", "fix the syntax"),
    ),
    Case(
        "spec-broken-json",
        spec(lambda e: e.spec("broken", '{"version": 1,', suffix=".json")),
        ("not valid JSON at line 1", "fix the syntax"),
    ),
    Case(
        "spec-python-tag",
        spec(lambda e: e.spec("tag", "!!python/object/apply:os.system ['touch pwned']\n")),
        ("python/object/apply", "only plain YAML"),
    ),
    Case("spec-not-utf8", spec(lambda e: _latin1(e)), ("not UTF-8", "save it as UTF-8")),
    Case(
        "spec-not-a-mapping", spec(lambda e: e.spec("list", "- 1\n- 2\n")), ("must be a mapping",)
    ),
    Case(
        "spec-wrong-version",
        spec(lambda e: e.suite("v2", version=2)),
        ("version: 2 is not supported", "set version: 1"),
    ),
    Case(
        "spec-wrong-type",
        spec(lambda e: e.suite("type", {**NULLS, "runs": "three"}, KL)),
        ("runs: expected an integer",),
    ),
    Case(
        "spec-unknown-kind",
        spec(lambda e: e.suite("kind", NULLS, {**KL, "kind": "delta_kll"})),
        ("unknown probe kind 'delta_kll'", "did you mean 'delta_kl'"),
    ),
    Case(
        "spec-misspelt-field",
        spec(lambda e: e.suite("typo", {**NULLS, "rnus": 3}, KL)),
        ("rnus: unknown field", "did you mean 'runs'"),
    ),
    Case(
        "spec-duplicate-names",
        spec(lambda e: e.suite("dup", NULLS, KL, {**KL})),
        ("'kl' is used twice", "must be unique"),
    ),
    Case(
        "spec-runs-too-few",
        spec(lambda e: e.suite("runs", {**NULLS, "runs": 1}, KL)),
        ("runs: needs at least 2",),
    ),
    Case(
        "spec-top-k-zero",
        spec(lambda e: e.suite("topk", NULLS, KL, defaults={"top_k": 0})),
        ("top_k: must be >= 1",),
    ),
    Case(
        "spec-lambda-negative",
        spec(lambda e: e.suite("lam", NULLS, {**ABLATION, "lambdas": [-0.5, 0, 1]})),
        ("lambdas: must be >= 0",),
    ),
    Case(
        "spec-lambda-nan",
        spec(lambda e: e.spec("lamnan", _nan_lambdas(e))),
        ("lambdas[0]: expected a finite number",),
    ),
    Case(
        "spec-rank-multiplier-zero",
        spec(lambda e: e.suite("rank", {**NULLS, "rank_multipliers": [0]}, KL)),
        ("rank_multipliers: must be a non-empty list of numbers > 0",),
    ),
    Case(
        "spec-empty-prompt",
        spec(lambda e: e.suite("emptyprompt", NULLS, {**KL, "prompts": ["ok", "  "]})),
        ("prompts[1]: the prompt is empty", "write the text"),
    ),
    Case(
        "spec-empty-completion",
        spec(
            lambda e: e.suite(
                "emptycompletion",
                {
                    "name": "gk",
                    "kind": "calibration_drift",
                    "pack": "none",
                    "items": [["The capital of France is", " Paris"], ["Two plus two is", ""]],
                },
            )
        ),
        ("items[1]: the gold answer is an empty completion", "write the text"),
    ),
    Case(
        "spec-path-escapes",
        spec(
            lambda e: e.suite(
                "escape",
                {"name": "prose", "kind": "external_perplexity", "corpus": "../outside.txt"},
            )
        ),
        ("lies outside the spec's directory", "copy the file into it"),
    ),
    Case(
        "spec-absolute-path-escapes",
        spec(
            lambda e: e.suite(
                "absolute",
                {"name": "prose", "kind": "external_perplexity", "corpus": "/etc/passwd"},
            )
        ),
        ("'/etc/passwd' lies outside", "copy the file into it"),
    ),
    Case(
        "gate-spec-misspelt-field",
        spec(lambda e: e.suite("gatetypo", {**NULLS, "rnus": 3}, KL), "gate"),
        ("rnus: unknown field",),
    ),
    # -------------------------------------------------------------- the prompts
    Case(
        "prompts-missing",
        quick(lambda e: e.model, lambda e: e.adapter, "--prompts", "/no/prompts.txt"),
        ("cannot read the prompts file", "check the path"),
    ),
    Case(
        "prompts-empty",
        lambda e: quick()(e) + ["--prompts", str(e.root / "prompts-empty.txt")],
        ("holds no prompts", "one prompt per line"),
    ),
    Case(
        "prompts-not-utf8",
        lambda e: quick()(e) + ["--prompts", str(e.root / "prompts-latin1.txt")],
        ("not UTF-8", "save it as UTF-8"),
    ),
    Case(
        "prompt-longer-than-context",
        lambda e: quick()(e) + ["--prompts", str(e.root / "prompts-long.txt")],
        ("tokens, more than the model's context window of 256", "shorten it"),
    ),
    # ----------------------------------------------------------------- the outputs
    Case(
        "output-under-a-file",
        lambda e: quick()(e) + ["--junit", str(e.root / "a-file" / "out" / "r.xml")],
        ("is a file, not a directory", "choose another path"),
    ),
    Case(
        "output-in-read-only-dir",
        lambda e: quick()(e) + ["--junit", str(e.made["read_only"] / "sway" / "r.xml")],
        ("is not writable", "choose another one"),
    ),
    Case(
        "output-is-a-directory",
        lambda e: quick()(e) + ["--junit", str(e.root)],
        ("is a directory", "--help"),
    ),
    Case(
        "plot-dir-is-a-file",
        lambda e: quick()(e) + ["--plot", str(e.root / "a-file")],
        ("is a file", "--help"),
    ),
    # ------------------------------------------------------------ the command line
    Case(
        "spec-and-quick-eval",
        lambda e: ["eval", str(e.suite("both")), "--model", str(e.model)],
        ("give either SPEC or --model",),
    ),
    Case(
        "neither-spec-nor-model",
        lambda e: ["eval"],
        ("give a SPEC file", "--model and --adapter-path"),
    ),
]


def _latin1(e: Env) -> Path:
    path = e.root / "specs" / "latin1.yaml"
    path.write_bytes("version: 1  # café\n".encode("latin-1"))
    return path


def _nan_lambdas(e: Env) -> str:
    text = e.suite("lamnan-base", NULLS, {**ABLATION, "lambdas": [0.5, 0, 1]}).read_text()
    return text.replace("- 0.5\n", "- .nan\n", 1)


def test_the_table_holds_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_two_and_no_report(
    case: Case, env: Env, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    out = tmp_path / "reports"
    args = [*case.args(env), "--json", str(out / "r.json"), "--markdown", str(out / "r.md")]
    result = CliRunner().invoke(app, args, env=case.env)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == case.code, result.output
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: "), result.output
    for fragment in case.expect:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists(), f"a report was written: {sorted(out.rglob('*'))}"
    assert not (Path.cwd() / "pwned").exists()


# ------------------------------------------------------------------ beside the table
def test_debug_shows_the_traceback_of_a_bad_input(env: Env, tmp_path: Path) -> None:
    args = quick(adapter=made("adapter_garbage"))(env)
    quiet = CliRunner().invoke(app, args)
    loud = CliRunner().invoke(app, ["--debug", *args])
    assert quiet.exit_code == loud.exit_code == 2
    assert "Traceback" not in quiet.output
    assert "Traceback" in loud.output and "AdapterFormatError" in loud.output


def test_an_unexpected_error_is_one_line_and_debug_raises_it(tmp_path: Path, monkeypatch) -> None:
    import sway_common.app.run as run

    def broken(*a: object, **k: object) -> None:
        raise RuntimeError("something nobody foresaw\nwith a second line")

    monkeypatch.setattr(run, "run_suite", broken)
    spec = tmp_path / "dummy.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "models": {"ft": {"kind": "dummy", "base": "dummy", "adapter": "trained"}},
                "suite": [NULLS, KL],
            }
        )
    )
    quiet = CliRunner().invoke(app, ["eval", str(spec)])
    assert quiet.exit_code == 2
    assert [ln for ln in quiet.output.splitlines() if ln.strip()] == [
        "error: RuntimeError: something nobody foresaw (unexpected; rerun with --debug for the traceback)"
    ]
    loud = CliRunner().invoke(app, ["--debug", "eval", str(spec)])
    assert isinstance(loud.exception, RuntimeError)


def test_allow_pickle_reads_a_pickled_model_and_adapter(env: Env, tmp_path: Path) -> None:
    spec = env.spec(
        "pickled",
        {
            "version": 1,
            "models": {
                "ft": {
                    "base": str(env.made["model_pickled"]),
                    "adapter": str(env.made["adapter_pickled"]),
                }
            },
            "suite": [NULLS, KL],
        },
    )
    out = tmp_path / "r.json"
    refused = CliRunner().invoke(app, ["eval", str(spec), "--backend", "hf", "--json", str(out)])
    assert refused.exit_code == 2 and "--allow-pickle" in refused.output and not out.exists()
    allowed = CliRunner().invoke(
        app,
        ["eval", str(spec), "--backend", "hf", "--allow-pickle", "--no-cache", "--json", str(out)],
    )
    assert allowed.exit_code in (0, 1), allowed.output
    good = CliRunner().invoke(
        app,
        [
            "eval",
            str(env.suite("unpickled")),
            "--backend",
            "hf",
            "--no-cache",
            "--json",
            str(tmp_path / "good.json"),
        ],
    )
    assert good.exit_code in (0, 1), good.output
    # The same weights, read from pickles: the same numbers.
    from sway_common.report import load_json

    raw = [p.raw for p in load_json(out).probes]
    assert raw == [p.raw for p in load_json(tmp_path / "good.json").probes]


def test_trust_remote_code_and_allow_pickle_reach_the_backend(env: Env, monkeypatch) -> None:
    import sway_common.app.run as run

    seen: dict[str, object] = {}

    def capture(model: object, backend: str, **kw: object) -> None:
        seen.update(kw)
        raise OSError("stop here")

    monkeypatch.setattr(run, "build_backend", capture)
    args = [*quick()(env), "--trust-remote-code", "--allow-pickle"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "stop here" in result.output
    assert seen == {"allow_pickle": True, "trust_remote_code": True}
    CliRunner().invoke(app, quick()(env))
    assert seen == {"allow_pickle": False, "trust_remote_code": False}


def test_a_missing_plot_extra_names_the_extra_to_install(
    env: Env, tmp_path: Path, monkeypatch
) -> None:
    import sway_common.app.options as options

    monkeypatch.setattr(options, "installed", lambda module: module != "matplotlib")
    out = tmp_path / "r.json"
    result = CliRunner().invoke(
        app, [*quick()(env), "--plot", str(tmp_path / "plots"), "--json", str(out)]
    )
    assert result.exit_code == 2
    assert "pip install 'sway-mlx[plot]'" in result.output
    assert not out.exists() and not (tmp_path / "plots").exists()
