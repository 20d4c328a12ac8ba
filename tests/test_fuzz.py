"""Fuzzing the two readers of untrusted files: the spec loader and the adapter reader.

Whatever the bytes, only a clean error may come out: :class:`SpecError` from the spec
loader, :class:`AdapterFormatError` from the adapter reader, each with a message. Any other
exception (a KeyError, a TypeError, a numpy reshape error) is a crash a user would see
as a traceback.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sway_common.adapters import AdapterFormatError, read_adapter
from sway_common.adapters.files import load_safetensors
from sway_common.suite.spec import SpecError, load_spec, parse_spec

# No example database: a run must not leave a .hypothesis/ dir in the checkout.
FUZZ = settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)

VALID_SPEC: dict[str, Any] = {
    "version": 1,
    "models": {"ft": {"kind": "dummy", "base": "dummy", "adapter": "trained"}},
    "defaults": {"seed": 0, "top_k": 32},
    "suite": [
        {"name": "nulls", "kind": "null_adapter", "runs": 3, "rank_multipliers": [1.0]},
        {"name": "kl", "kind": "delta_kl", "prompts": ["a", "b"], "top_k": 16},
        {"name": "abl", "kind": "adapter_ablation", "prompts": ["a"], "lambdas": [0, 0.5, 1]},
        {"name": "gk", "kind": "calibration_drift", "pack": "none", "items": [["q", " a"]]},
        {
            "name": "pref",
            "kind": "preference_flip",
            "triples": [{"prompt": "p", "chosen": " c", "rejected": " r"}],
        },
        {
            "name": "para",
            "kind": "paraphrase_invariance",
            "cases": [{"prompt": "p", "gold": " g", "paraphrases": ["q"]}],
        },
        {"name": "prose", "kind": "external_perplexity", "max_chunks": 2},
        {
            "name": "collapse",
            "kind": "prompt_collapse",
            "prompts": ["a"],
            "context_lengths": [0, 8],
        },
        {"name": "clusters", "kind": "cluster_kl", "prompts": ["a", "b"]},
        {"name": "sections", "kind": "section_internalization"},
    ],
}


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a document where a value can be replaced."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


SPEC_PATHS = _paths(VALID_SPEC)[1:]


def _replaced(doc: Any, path: tuple, value: Any) -> Any:
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def _parse_cleanly(data: Any, base_dir: Path | None = None) -> None:
    try:
        parse_spec(data, source="fuzz", base_dir=base_dir)
    except SpecError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)


def test_the_valid_spec_is_valid() -> None:
    parse_spec(VALID_SPEC)


@FUZZ
@given(data=values)
def test_any_document_gives_a_spec_or_a_spec_error(data: Any) -> None:
    _parse_cleanly(data)


@FUZZ
@given(where=st.sampled_from(SPEC_PATHS), value=values)
def test_any_field_of_a_valid_spec_replaced_gives_a_spec_or_a_spec_error(
    where: tuple, value: Any, tmp_path: Path
) -> None:
    _parse_cleanly(_replaced(VALID_SPEC, where, value), base_dir=tmp_path)


@FUZZ
@given(
    text=st.one_of(
        st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))
    )
)
def test_any_yaml_text_gives_a_spec_or_a_spec_error(text: str, tmp_path: Path) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_spec(path)
    except SpecError as e:
        assert e.problems and "\n" not in e.problems[0]


@FUZZ
@given(text=st.text(max_size=200))
def test_a_valid_spec_cut_anywhere_gives_a_spec_error(text: str, tmp_path: Path) -> None:
    dumped = yaml.safe_dump(VALID_SPEC)
    path = tmp_path / "cut.yaml"
    path.write_text(
        dumped[: len(text) % len(dumped)] + text, encoding="utf-8", errors="surrogatepass"
    )
    try:
        load_spec(path)
    except SpecError as e:
        assert e.problems


# ------------------------------------------------------------------------ adapters
@pytest.fixture(scope="module")
def adapter_copy(
    tiny_peft_adapter: Path, tiny_mlx_adapter: Path, tmp_path_factory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz_adapters")
    out = {}
    for fmt, src in (("peft", tiny_peft_adapter), ("mlx", tiny_mlx_adapter)):
        dst = root / fmt
        shutil.copytree(src, dst)
        out[fmt] = dst
    return out


def _config_paths(fmt: str, adapters: dict[str, Path]) -> list[tuple]:
    cfg = json.loads((adapters[fmt] / "adapter_config.json").read_text())
    return _paths(cfg)[1:]


def _read_cleanly(path: Path) -> None:
    try:
        read_adapter(path)
    except AdapterFormatError as e:
        assert str(e).strip()


@FUZZ
@given(fmt=st.sampled_from(["peft", "mlx"]), data=st.data())
def test_any_adapter_config_field_replaced_reads_or_gives_an_adapter_error(
    fmt: str, data: st.DataObject, adapter_copy: dict[str, Path], tmp_path: Path
) -> None:
    src = adapter_copy[fmt]
    cfg = json.loads((src / "adapter_config.json").read_text())
    where = data.draw(st.sampled_from(_config_paths(fmt, adapter_copy)))
    value = data.draw(values)
    dst = tmp_path / f"{fmt}-{abs(hash((where, repr(value))))}"
    shutil.copytree(src, dst)
    text = json.dumps(_replaced(cfg, where, value), default=str)
    (dst / "adapter_config.json").write_text(text)
    _read_cleanly(dst)
    shutil.rmtree(dst)


@FUZZ
@given(data=values)
def test_any_adapter_config_document_reads_or_gives_an_adapter_error(
    data: Any, adapter_copy: dict[str, Path], tmp_path: Path
) -> None:
    dst = tmp_path / f"doc-{abs(hash(repr(data)))}"
    shutil.copytree(adapter_copy["peft"], dst)
    (dst / "adapter_config.json").write_text(json.dumps(data, default=str))
    _read_cleanly(dst)
    shutil.rmtree(dst)


@FUZZ
@given(data=st.data())
def test_any_damage_to_a_weights_file_gives_an_adapter_error_or_tensors(
    data: st.DataObject, adapter_copy: dict[str, Path], tmp_path: Path
) -> None:
    raw = (adapter_copy["peft"] / "adapter_model.safetensors").read_bytes()
    cut = data.draw(st.integers(0, len(raw)))
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=6)
    )
    damaged = bytearray(raw[:cut] + data.draw(st.binary(max_size=64)))
    for at, byte in flips:
        if at < len(damaged):
            damaged[at] = byte
    path = tmp_path / f"w-{abs(hash(bytes(damaged)))}.safetensors"
    path.write_bytes(bytes(damaged))
    try:
        load_safetensors(path)
    except AdapterFormatError as e:
        assert str(e).strip()
    path.unlink()
