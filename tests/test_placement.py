"""--device-map / --max-memory / --dtype (and a spec's models.ft.device_map / max_memory).

On this CPU a device map can only place everything on the CPU, so these tests check
what a spread must not change: the same views, λ and nulls, the same numbers, bit for
bit; and that bad values and the MLX backend are refused with one line, exit 2. The
spread over two GPUs is checked on the GPU machine (benchmarks/sweep.py --split).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sway_common.app.cli import app
from sway_common.suite.placement import accelerate_max_memory, parse_max_memory
from sway_common.suite.spec import SpecError, parse_spec

PROMPTS = ["The keeper said", "In the storm the lamp", "A ledger entry"]


def test_max_memory_is_read_as_accelerate_wants_it() -> None:
    parsed = parse_max_memory("0=20GiB, 1=20GiB,CPU=64GB")
    assert parsed == {"0": "20GiB", "1": "20GiB", "cpu": "64GB"}
    assert accelerate_max_memory(parsed) == {0: "20GiB", 1: "20GiB", "cpu": "64GB"}
    for bad, why in [
        ("0:20GiB", "has no '='"),
        ("gpu0=20GiB", "is not a device"),
        ("0=twenty", "is not a size"),
        ("0=0GiB", "is not a size"),
        ("", "is empty"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_max_memory(bad)


def _spec(ft: dict) -> dict:
    return {
        "version": 1,
        "models": {"ft": {"base": "m", "adapter": "a", **ft}},
        "suite": [{"name": "d", "kind": "delta_kl"}],
    }


def test_the_spec_model_block_takes_a_placement_and_checks_it() -> None:
    spec = parse_spec(_spec({"kind": "hf", "device_map": "balanced", "max_memory": {0: "9GiB"}}))
    assert spec.model.device_map == "balanced" and spec.model.max_memory == {0: "9GiB"}
    with pytest.raises(SpecError) as e:
        parse_spec(_spec({"device_map": "balance", "max_memory": {"gpu": "1GiB", 1: "lots"}}))
    problems = "\n".join(e.value.problems)
    assert "did you mean 'balanced'" in problems
    assert "'gpu' is not a device" in problems and "'lots' is not a size" in problems
    with pytest.raises(SpecError, match="mlx.launch"):
        parse_spec(_spec({"kind": "mlx", "device_map": "auto"}))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--backend", "mlx", "--device-map", "auto"], "mlx.launch"),
        (["--backend", "hf", "--max-memory", "0=lots"], "is not a size"),
        (["--backend", "hf", "--device-map", "everywhere"], "everywhere"),
    ],
)
def test_a_placement_that_cannot_be_is_refused_in_one_line(
    flags, message, tiny_model_dir: Path, tiny_peft_adapter: Path
) -> None:
    args = ["eval", "--model", str(tiny_model_dir), "--adapter-path", str(tiny_peft_adapter)]
    result = CliRunner().invoke(app, [*args, *flags])
    assert result.exit_code == 2, result.output
    # One error line (eval may say first which prompts it picked).
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output


@pytest.mark.hf
def test_a_device_map_changes_no_number(
    tiny_model_dir, tiny_peft_adapter, tmp_path, monkeypatch
) -> None:
    """The same quick eval with the model placed by accelerate (device_map auto, and a
    memory cap, which implies it) gives the report of a plain load, number for number."""
    import sway_hf.backend as hf_backend

    asked = []  # what transformers was asked for: the flags must reach it
    real = hf_backend.AutoModelForCausalLM.from_pretrained

    def spy(*a, **kw):
        memory = kw.get("max_memory")  # copied: transformers turns its sizes into bytes
        asked.append((kw.get("device_map"), dict(memory) if memory else None))
        return real(*a, **kw)

    monkeypatch.setattr(hf_backend.AutoModelForCausalLM, "from_pretrained", spy)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS))
    base = ["eval", "--model", str(tiny_model_dir), "--adapter-path", str(tiny_peft_adapter)]
    base += ["--prompts", str(prompts), "--runs", "3", "--backend", "hf", "--no-cache"]
    reports = []
    for i, extra in enumerate([[], ["--device-map", "auto"], ["--max-memory", "cpu=8GiB"]]):
        out = tmp_path / f"r{i}.json"
        result = CliRunner().invoke(app, [*base, *extra, "--json", str(out)])
        assert result.exit_code in (0, 1), result.output
        reports.append(json.loads(out.read_text()))
    assert asked == [(None, None), ("auto", None), ("auto", {"cpu": "8GiB"})]
    plain = reports[0]
    for placed in reports[1:]:
        assert [p["verdict"] for p in placed["probes"]] == [p["verdict"] for p in plain["probes"]]
        for p, q in zip(plain["probes"], placed["probes"], strict=True):
            assert (p["raw"], p["z"], p["effect_ratio"]) == (q["raw"], q["z"], q["effect_ratio"])
            assert p.get("null") == q.get("null")


@pytest.mark.hf
def test_every_op_of_a_placed_model_matches_a_plain_one(tiny_model_dir, tiny_peft_adapter) -> None:
    """Views, λ, nulls, per-token scoring, hidden states and generation, with the model
    placed by an explicit device map: the very same numbers and tokens."""
    from sway_hf.backend import HFDifferentialBackend

    def measure(**placement) -> list:
        b = HFDifferentialBackend(tiny_model_dir, tiny_peft_adapter, device="auto", **placement)
        out = []
        try:
            for view in (b.as_base, b.as_finetuned, lambda: b.as_scaled_adapter(0.5)):
                with view() as v:
                    out += [d.logprobs for d in v.next_token_dist_batch(PROMPTS, top_k=16)]
                    out += [v.logprob_of_batch(["The keeper"], [" said the storm"])]
            with b.as_null_adapter(3, mode="norm_matched") as v:
                out += [d.logprobs for d in v.next_token_dist_batch(PROMPTS, top_k=16)]
            with b.as_finetuned() as v:
                out += [np.asarray(v.generate_batch(PROMPTS, max_new_tokens=6), dtype=object)]
            out += [b.runtime.mean_hidden([b.runtime.encode(p)[0] for p in PROMPTS])]
        finally:
            b.close()
        return out

    plain = measure()
    for placement in ({"device_map": {"": "cpu"}}, {"max_memory": {"cpu": "8GiB"}}):
        for x, y in zip(plain, measure(**placement), strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("backend", ["hf", "mlx"])
def test_dtype_reaches_the_model_and_the_report(
    backend, tiny_model_dir, tiny_peft_adapter, tiny_mlx_adapter, tmp_path
) -> None:
    """--dtype overrides the spec's precision; the report records the one the model ran in."""
    adapter = tiny_peft_adapter if backend == "hf" else tiny_mlx_adapter
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS))
    args = ["eval", "--model", str(tiny_model_dir), "--adapter-path", str(adapter)]
    args += ["--prompts", str(prompts), "--runs", "2", "--backend", backend, "--no-cache"]
    for dtype in ("bfloat16", "float32"):
        out = tmp_path / f"{dtype}.json"
        result = CliRunner().invoke(app, [*args, "--dtype", dtype, "--json", str(out)])
        assert result.exit_code in (0, 1), result.output
        assert json.loads(out.read_text())["meta"]["dtype"] == dtype
    result = CliRunner().invoke(app, [*args, "--dtype", "fp8"])
    assert result.exit_code == 2 and "fp8" in result.output
