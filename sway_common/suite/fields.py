"""Checking a decoded YAML/JSON document against dataclass fields.

Each check records a problem (with its path, e.g. ``suite[2].promts``, and a did-you-mean
for a typo) instead of raising, so a spec reports every problem at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown_keys(
    data: dict[str, Any], allowed: typing.Iterable[str], path: str, problems: list[str]
) -> None:
    allowed = list(allowed)
    for key in data:
        if key not in allowed:
            problems.append(
                f"{path}.{key}: unknown field{did_you_mean(str(key), allowed)}"
                f" (allowed: {', '.join(allowed)})"
            )


def coerce(value: Any, hint: Any, path: str, problems: list[str]) -> Any:
    """Check ``value`` against a type hint; return it converted, or record a problem."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], path, problems)
    if origin is Literal:
        if value not in args:
            problems.append(
                f"{path}: {value!r} is not one of {', '.join(map(repr, args))}"
                f"{did_you_mean(str(value), map(str, args))}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            problems.append(f"{path}: expected a list, got {type(value).__name__}")
            return value
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                problems.append(f"{path}: expected {len(args)} items, got {len(value)}")
                return value
            return tuple(
                coerce(v, a, f"{path}[{i}]", problems)
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item = args[0] if args else Any
        items = [coerce(v, item, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return value
        return {k: coerce(v, args[1], f"{path}.{k}", problems) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{path}: expected a number, got {value!r}")
            return value
        if not math.isfinite(value):
            problems.append(f"{path}: expected a finite number, got {value!r}")
            return value
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {value!r}")
        return value
    return value


def build_dataclass(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a mapping, got {type(data).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown_keys(data, fields, path, problems)
    before = len(problems)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = coerce(data[name], hints[name], f"{path}.{name}", problems)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{path}.{name}: required field is missing")
    if len(problems) > before:
        return None
    return cls(**kwargs)
