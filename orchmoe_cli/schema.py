"""Strict construction of config dataclasses from YAML/JSON data, with errors that name the field.

Used by recipes and by checkpoint loading (a saved ``method`` section is checked as strictly as a
recipe's). Torch-free, so reading a recipe stays instant. Field metadata understood here: ``help``
(str), ``min`` / ``max`` (numbers), ``min_exclusive`` (bool: the minimum itself is not allowed), ``path``
(a path kind of :mod:`orchmoe_cli.paths`: the value goes through its resolver).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from collections.abc import Sequence
from dataclasses import field
from typing import Any, Literal

from orchmoe_cli.errors import FieldError, OrchmoeError, did_you_mean, first_repeat, recipe_source
from orchmoe_cli.paths import PATH_KINDS, directory_path, user_path


def help_field(default: Any, help: str, **checks: Any) -> Any:
    """A dataclass field with help text and optional range checks (lists and dicts get a fresh copy each);
    ``path=`` one of :data:`paths.PATH_KINDS` marks a path the loader resolves, ``non_empty=True`` a list that
    must name something."""
    if checks.get("path", PATH_KINDS[0]) not in PATH_KINDS:
        raise ValueError(f"path kind must be one of {PATH_KINDS}, got {checks['path']!r}")
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **checks})
    return field(default=default, metadata={"help": help, **checks})


def build(cls: type, raw: Any, source: str, overrides: Sequence[str] = (), prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, strictly; errors name the dotted field and where its value came
    from: ``source`` (the file read), or the command line for a field one of ``overrides`` set."""
    with recipe_source(source, overrides):
        return _build(cls, raw, prefix)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "recipe"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise OrchmoeError(f"expected a mapping, got {_describe(raw)}", field=where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise OrchmoeError(f"unknown key{_suggest(str(key), fields)}", field=f"{prefix}{key}")
        dotted = f"{prefix}{key}"
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, dotted + ".")
        else:
            kwargs[key] = _check_value(_coerce(value, hint, dotted), fields[key], dotted)
    try:
        built = cls(**kwargs)
    except FieldError as exc:
        raise OrchmoeError(exc.message, field=f"{prefix}{exc.field}") from None
    _resolve_paths(built, prefix)
    return built


def _resolve_paths(config: Any, prefix: str) -> None:
    """Every path field (``path`` metadata), given or default, through the one resolver: ``~`` and ``$VAR``
    expanded, bad forms refused, a file where a directory is needed refused, before anything is loaded."""
    for spec in dataclasses.fields(config):
        kind, value = spec.metadata.get("path"), getattr(config, spec.name)
        if kind is None or value is None:
            continue
        dotted = f"{prefix}{spec.name}"
        resolved = directory_path(value, dotted) if kind == "dir" else user_path(value, dotted)
        setattr(config, spec.name, str(resolved))


def _suggest(word: str, options: Any) -> str:
    return f"{did_you_mean(word, options)}; valid keys: {', '.join(options)}"


def _describe(value: Any) -> str:
    """The value's type and the start of its repr, never the whole of a huge value (a YAML null says so)."""
    if value is None:
        return "null (nothing)"
    short = reprlib.Repr()
    short.maxstring = short.maxother = 40
    short.maxlist = short.maxdict = 4
    short.maxlevel = 2
    text = short.repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def _coerce(value: Any, hint: Any, dotted: str) -> Any:
    """Check ``value`` against a type hint, converting only where YAML is known to be ambiguous."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], dotted)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint_text = f" (did you mean '{close[0]}'?)" if close else ""
            given = "empty (null)" if value is None else f"'{value}'"
            raise OrchmoeError(f"{given} is not one of {', '.join(map(str, args))}{hint_text}", field=dotted)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise OrchmoeError(f"expected a list, got {_describe(value)}", field=dotted)
        return [_coerce(v, args[0], f"{dotted}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise OrchmoeError(f"expected true or false, got {_describe(value)}", field=dotted)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise OrchmoeError(f"expected an integer, got {_describe(value)}", field=dotted)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise OrchmoeError(f"expected a number, got {_describe(value)}", field=dotted)
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        quote = f" (YAML reads it as a boolean: quote it, '{value}')" if isinstance(value, bool) else ""
        raise OrchmoeError(f"expected a string, got {_describe(value)}{quote}", field=dotted)
    raise TypeError(f"unsupported recipe field type {hint!r} at {dotted}")


def _check_value(value: Any, spec: dataclasses.Field, dotted: str) -> Any:
    """Finite numbers within the field's range; lists with no item twice (every list names a set: tasks, steps,
    seeds, modules) and, where the field says ``non_empty``, at least one item."""
    meta = spec.metadata
    if isinstance(value, list):
        if meta.get("non_empty") and not value:
            raise OrchmoeError("is empty; name at least one (or leave the field out)", field=dotted)
        twice = first_repeat(value)
        if twice is not None:
            raise OrchmoeError(f"{twice!r} is listed twice; name each once", field=dotted)
    if isinstance(value, float) and not math.isfinite(value):
        raise OrchmoeError(f"must be a finite number, got {value}", field=dotted)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high = meta.get("min"), meta.get("max")
        if low is not None and (value < low or (meta.get("min_exclusive") and value == low)):
            bound = f"> {low}" if meta.get("min_exclusive") else f">= {low}"
            raise OrchmoeError(f"must be {bound}, got {value}", field=dotted)
        if high is not None and value > high:
            raise OrchmoeError(f"must be <= {high}, got {value}", field=dotted)
    return value


def fields_help(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, help) for every field, for documentation and `--help` output."""
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        hint = hints[spec.name]
        if dataclasses.is_dataclass(hint):
            rows.extend(fields_help(hint, f"{prefix}{spec.name}."))
            continue
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()  # type: ignore[misc]
        rows.append((f"{prefix}{spec.name}", repr(default), spec.metadata.get("help", "")))
    return rows
