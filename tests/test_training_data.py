"""Training data as the quick eval's workload: `eval --adapter-path DIR` with nothing else.

Tiny JSONL files in each of mlx-lm's four formats, the choice of rows, where a recorded
path is looked for, the fallbacks; and one run of the CLI on a real mlx-lm adapter dir.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sway_common.app.cli import app
from sway_common.app.zero_config import QuickEval, quick_spec
from sway_common.probes.base import DEFAULT_PROMPTS
from sway_common.report import load_json
from sway_common.suite.data_splits import (
    MissingPackageError,
    TrainingDataError,
    read_run_record,
    resolve_recorded_path,
)
from sway_common.suite.training_data import (
    DOC_EXAMPLES,
    MAX_PROMPTS,
    Conversation,
    load_workload,
    render_prompts,
    training_suite,
)

# ChatML, with the tools (when given) as a system turn: what a real template does with them.
TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DOC_PROBES = ("leakage", "section_internalization", "style_fingerprint")
KEEPER = "The keeper lit the lamp at dusk. Then he wound the clockwork and slept until four."


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_row(i: int) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": "Answer as the harbour keeper."},
            {"role": "user", "content": f"When is lamp {i} lit?"},
            {"role": "assistant", "content": f"Lamp {i} is lit at dusk."},
            {"role": "user", "content": f"And who winds lamp {i}?"},
            {"role": "assistant", "content": f"The keeper's son winds lamp {i}."},
        ]
    }


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tokenizer.chat_template = TEMPLATE
    return tokenizer


# ------------------------------------------------------------------ the four formats
def test_text_rows_give_their_first_sentence_or_sixteen_words(tmp_path: Path) -> None:
    long = " ".join(f"word{i}" for i in range(30))
    write_jsonl(tmp_path / "valid.jsonl", [{"text": KEEPER}, {"text": long}])
    write_jsonl(tmp_path / "train.jsonl", [{"text": "Trained text, in full."}])
    w = load_workload(tmp_path)
    assert w.fmt == "text"
    assert w.prompts == ["The keeper lit the lamp at dusk.", " ".join(long.split()[:16])]
    assert w.doc == "Trained text, in full."


def test_completions_prompt_is_rendered_as_the_user_turn(
    tmp_path: Path, chat_tokenizer: Any
) -> None:
    rows = [{"prompt": f"Who keeps lamp {i}?", "completion": f"Keeper {i}."} for i in range(3)]
    write_jsonl(tmp_path / "valid.jsonl", rows)
    write_jsonl(tmp_path / "train.jsonl", rows)
    w = load_workload(tmp_path)
    assert w.fmt == "completions"
    rendered = render_prompts(w.prompts, chat_tokenizer)
    assert rendered[0] == "<|im_start|>user\nWho keeps lamp 0?<|im_end|>\n<|im_start|>assistant\n"
    # Without a template, the prompt field as it is.
    assert render_prompts(w.prompts) == [r["prompt"] for r in rows]
    assert w.doc.split("\n\n") == ["Keeper 0.", "Keeper 1.", "Keeper 2."]


def test_chat_prompt_is_the_conversation_up_to_the_last_answer(
    tmp_path: Path, chat_tokenizer: Any
) -> None:
    write_jsonl(tmp_path / "valid.jsonl", [chat_row(7)])
    write_jsonl(tmp_path / "train.jsonl", [chat_row(1)])
    w = load_workload(tmp_path)
    assert w.fmt == "chat"
    (rendered,) = render_prompts(w.prompts, chat_tokenizer)
    assert rendered.startswith("<|im_start|>system\nAnswer as the harbour keeper.<|im_end|>\n")
    assert "Lamp 7 is lit at dusk." in rendered and "And who winds lamp 7?" in rendered
    assert "The keeper's son winds lamp 7." not in rendered
    assert rendered.endswith("<|im_start|>assistant\n")
    # The doc is what the run taught the model to write: the assistant turns of train.
    assert w.doc == "Lamp 1 is lit at dusk.\nThe keeper's son winds lamp 1."


def test_tools_go_through_the_template_with_the_conversation(
    tmp_path: Path, chat_tokenizer: Any
) -> None:
    tools = [{"type": "function", "function": {"name": "light_lamp", "parameters": {}}}]
    row = {
        "messages": [
            {"role": "user", "content": "Light the pier lamp."},
            {"role": "assistant", "content": "Calling light_lamp."},
        ],
        "tools": tools,
    }
    write_jsonl(tmp_path / "test.jsonl", [row])
    write_jsonl(tmp_path / "train.jsonl", [row])
    w = load_workload(tmp_path)
    assert w.fmt == "tools" and w.source.endswith("test.jsonl")
    (prompt,) = w.prompts
    assert isinstance(prompt, Conversation) and prompt.tools == tools
    (rendered,) = render_prompts(w.prompts, chat_tokenizer)
    assert "light_lamp" in rendered and "Light the pier lamp." in rendered
    assert "Calling light_lamp." not in rendered


def test_feature_keys_recorded_by_the_run_are_used(tmp_path: Path) -> None:
    adapter = tmp_path / "adapters"
    adapter.mkdir()
    config = {"model": "base-m", "data": "d", "prompt_feature": "q", "completion_feature": "a"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    write_jsonl(tmp_path / "d" / "valid.jsonl", [{"q": "Why?", "a": "Because."}])
    record = read_run_record(adapter / "0000010_adapters.safetensors")  # a checkpoint file
    assert record.base == "base-m" and record.adapter_dir == adapter
    w = load_workload(tmp_path / "d", record.features)
    assert w.fmt == "completions" and render_prompts(w.prompts) == ["Why?"]


def test_a_row_in_no_format_and_a_broken_line_name_the_file(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a" / "valid.jsonl", [{"question": "x"}])
    with pytest.raises(TrainingDataError, match=r"valid.jsonl:1: a row with keys question"):
        load_workload(tmp_path / "a")
    bad = tmp_path / "b" / "valid.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"text": "fine."}\n{"text": \n')
    with pytest.raises(TrainingDataError, match=r"valid.jsonl:2: not valid JSON"):
        load_workload(tmp_path / "b", seed=3)


# ------------------------------------------------------------------ which rows
def test_held_out_split_first_then_test_then_the_end_of_train(tmp_path: Path) -> None:
    rows = [{"text": f"Row {i} of the set."} for i in range(40)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    w = load_workload(tmp_path)
    # No valid or test: the last tenth of train, said to be possibly trained on.
    assert w.prompts == [f"Row {i} of the set." for i in range(36, 40)]
    assert "last 4 rows" in w.source and "may have trained on them" in w.source
    assert all(f"Row {i} " not in w.doc for i in range(36, 40))
    write_jsonl(tmp_path / "test.jsonl", [{"text": "A test row."}])
    assert load_workload(tmp_path).prompts == ["A test row."]
    write_jsonl(tmp_path / "valid.jsonl", [{"text": "A valid row."}])
    w = load_workload(tmp_path)
    assert w.prompts == ["A valid row."] and w.source == str(tmp_path / "valid.jsonl")
    # The doc: a seeded choice of training rows, the held-out ones never among them.
    paragraphs = w.doc.split("\n\n")
    assert len(paragraphs) == DOC_EXAMPLES and set(paragraphs) <= {r["text"] for r in rows}


def test_seeded_choice_is_stable_in_file_order_and_seed_dependent(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "valid.jsonl", [{"text": f"Prompt number {i}."} for i in range(100)])
    write_jsonl(tmp_path / "train.jsonl", [{"text": "t."}])
    a, again, other = (load_workload(tmp_path, seed=s).prompts for s in (0, 0, 1))
    assert len(a) == MAX_PROMPTS and a == again and a != other
    numbers = [int(str(p).split()[-1].rstrip(".")) for p in a]
    assert numbers == sorted(numbers) and len(set(numbers)) == MAX_PROMPTS


def test_a_jsonl_file_serves_as_prompts_and_doc(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mine.jsonl", [{"text": "Only one. Row."}])
    w = load_workload(path)
    assert w.prompts == ["Only one."] and w.doc == "Only one. Row."


def test_relative_data_path_from_the_current_dir_then_the_runs_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "adapters").mkdir()
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_recorded_path("data", run / "adapters") == run / "data"
    monkeypatch.chdir(elsewhere)
    assert resolve_recorded_path("data", run / "adapters") == Path("data").absolute()
    assert resolve_recorded_path("gone", run / "adapters") is None
    assert resolve_recorded_path(str(run / "data"), tmp_path) == run / "data"


def test_a_saved_dataset_without_the_datasets_package_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "dataset_dict.json").write_text('{"splits": ["train"]}')
    monkeypatch.setitem(sys.modules, "datasets", None)  # as where it is not installed
    with pytest.raises(MissingPackageError, match="pip install datasets"):
        load_workload(tmp_path)


def test_a_saved_dataset_is_read_by_split(tmp_path: Path) -> None:
    import datasets

    rows = {"text": ["A saved row. More."]}
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(rows), "validation": datasets.Dataset.from_dict(rows)}
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    w = load_workload(tmp_path / "ds")
    assert w.prompts == ["A saved row."] and "[validation]" in w.source


# ------------------------------------------------------------------ the quick suite
def test_doc_probes_report_but_neither_gate_nor_score() -> None:
    spec = training_suite(["A prompt."], "/d.txt")
    doc = [p for p in spec.probes if p.kind in DOC_PROBES]
    assert [p.kind for p in doc] == list(DOC_PROBES)
    assert all(p.gate is False and p.weight == 0.0 for p in doc)
    assert all(getattr(p, "doc", None) == "/d.txt" for p in doc)
    assert all(p.gate is None for p in spec.probes if p.kind not in DOC_PROBES)


def _adapter(tmp_path: Path, config: dict[str, Any]) -> Path:
    adapter = tmp_path / "run" / "adapters"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter


def _quick(adapter: Path, **kw: Any) -> QuickEval:
    args = {"model": None, "prompts_file": None, "data": None, "runs": 2, "seed": 0, **kw}
    return QuickEval(adapter_paths=(str(adapter),), **args)


def test_missing_data_falls_back_to_generic_prompts_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    adapter = _adapter(tmp_path, {"model": "base-m", "data": "data"})
    spec, prepare = quick_spec(_quick(adapter))
    assert capsys.readouterr().err == "", "nothing is said before the inputs are checked"
    assert prepare(spec, None) is None
    err = capsys.readouterr().err
    assert spec.model is not None and spec.model.base == "base-m"
    assert getattr(spec.probes[1], "prompts", None) == list(DEFAULT_PROMPTS)
    assert not [p for p in spec.probes if p.kind in DOC_PROBES]
    line = next(ln for ln in err.splitlines() if ln.startswith("prompts:"))
    assert "8 generic" in line and "'data'" in line and "--data" in line
    # Unreadable data: the same, with why.
    write_jsonl(tmp_path / "run" / "data" / "valid.jsonl", [{"nothing": 1}])
    spec, prepare = quick_spec(_quick(adapter))
    prepare(spec, None)
    assert "unreadable" in capsys.readouterr().err
    # mlx-lm's default data, a Hub dataset id, is not fetched either.
    (adapter / "adapter_config.json").write_text('{"model": "m", "data": "mlx-community/WikiSQL"}')
    spec, prepare = quick_spec(_quick(adapter))
    prepare(spec, None)
    assert "'mlx-community/WikiSQL' is in neither" in capsys.readouterr().err


def test_prompts_file_overrides_the_recorded_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_jsonl(tmp_path / "run" / "data" / "valid.jsonl", [{"text": "From data."}])
    adapter = _adapter(tmp_path, {"model": "base-m", "data": str(tmp_path / "run" / "data")})
    prompts = tmp_path / "p.txt"
    prompts.write_text("Mine.\n")
    spec, prepare = quick_spec(_quick(adapter, prompts_file=str(prompts)))
    prepare(spec, None)
    assert [p.kind for p in spec.probes if p.kind in DOC_PROBES] == []
    assert getattr(spec.probes[1], "prompts", None) == ["Mine."]
    assert "prompts: 1 from" in capsys.readouterr().err


def test_bad_explicit_data_exits_two(tmp_path: Path) -> None:
    adapter = _adapter(tmp_path, {"base_model_name_or_path": "base-m"})
    args = ["eval", "--adapter-path", str(adapter), "--data", str(tmp_path / "nope")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "does not exist" in result.output
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "dataset_dict.json").write_text("{}")
    result = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "hf")])
    assert result.exit_code == 2
    if "datasets" not in sys.modules:
        assert "pip install datasets" in result.output


# ------------------------------------------------------------------ end to end
@pytest.mark.mlx
def test_eval_with_only_the_adapter_path_runs_on_the_runs_own_data(
    tiny_model_dir: Path,
    tiny_mlx_adapter: Path,
    chat_tokenizer: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An mlx-lm run dir as `mlx_lm.lora` leaves it: adapters/ beside data/, the adapter
    config naming the base and the data by relative paths; evaluated from elsewhere."""
    model = tmp_path / "run" / "base"
    shutil.copytree(tiny_model_dir, model)
    chat_tokenizer.save_pretrained(str(model))  # the tiny model, with a chat template
    adapter = tmp_path / "run" / "adapters"
    shutil.copytree(tiny_mlx_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(model="base", data="data")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    write_jsonl(tmp_path / "run" / "data" / "train.jsonl", [chat_row(i) for i in range(8)])
    long = {"messages": [{"role": "user", "content": "lamp " * 400}, {"role": "assistant"}]}
    held = [chat_row(i) for i in range(8, 14)] + [long]
    write_jsonl(tmp_path / "run" / "data" / "valid.jsonl", held)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    args = ["eval", "--adapter-path", str(adapter), "--backend", "mlx", "--json", "r.json"]
    result = CliRunner().invoke(app, [*args, "--runs", "2"])
    assert result.exit_code in (0, 1), result.output
    assert f"model: {model} (from" in result.output
    assert f"7 from {tmp_path / 'run' / 'data' / 'valid.jsonl'} (chat format)" in result.output
    assert "1 held-out prompts longer than the context window: left out" in result.output
    report = load_json(Path("r.json"))
    by_kind = {p.kind: p for p in report.probes}
    assert report.meta["spec"] == "quick suite on the training data"
    for kind in DOC_PROBES:
        assert by_kind[kind].gating is False, kind
    assert by_kind["delta_kl"].gating is True
    # Measured on the rendered conversations: the template's assistant turn is open.
    prompts = json.dumps(by_kind["delta_kl"].evidence)
    assert "<|im_start|>assistant" in prompts and "And who winds lamp 8?" in prompts
    assert len(by_kind["delta_kl"].evidence["prompts"]) == 6 and "lamp lamp" not in prompts
