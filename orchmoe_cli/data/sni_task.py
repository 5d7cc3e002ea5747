"""Reading and validating one Super-NaturalInstructions task file.

Every problem in a task file is reported as one :class:`OrchmoeError` line that names the file and the JSON
field and says what to do, because users point ``data.source`` at their own copies of SNI and a traceback from
deep inside the encoder would not tell them which file is broken.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.paths import not_found_hint

LANGUAGE_FIELDS = ("Input_language", "Output_language", "Instruction_language")
FIX_TASK = "fix the task file or remove the task from the split file"
# Upstream SNI's largest task file is about 4 MB and no single text in it comes near 1M characters; the limits
# (the file one is GitHub's hard limit) stop a stray huge file or field before it costs minutes and gigabytes.
MAX_FILE_BYTES = 100 * 2**20
MAX_TEXT_CHARS = 2**20


@dataclass(frozen=True, slots=True)
class Example:
    """A positive or negative demonstration; ``explanation`` is None when the file has none."""

    input: str
    output: str
    explanation: str | None


@dataclass(frozen=True, slots=True)
class Instance:
    """One task instance; ``output`` lists every acceptable reference."""

    id: str
    input: str
    output: list[str]


@dataclass(frozen=True, slots=True)
class SNITask:
    """A validated task. ``n_available`` counts the instances in the file, before any cap."""

    name: str
    path: Path
    categories: list[str]
    definition: list[str]
    positive_examples: list[Example]
    negative_examples: list[Example]
    instances: list[Instance]
    languages: dict[str, list[str] | None]
    n_available: int

    @property
    def category(self) -> str:
        """The category used for grouped metrics (upstream: ``Categories[0]``)."""
        return self.categories[0]


def group_name(category: str) -> str:
    """Category key as the official scorer writes it: 'Title Generation' -> 'title_generation'."""
    return "_".join(category.lower().split())


def label_clash(task_categories: Iterable[tuple[str, str]]) -> str | None:
    """What keeps the official keys (``_for_<task>``, ``_for_<category key>``) from naming one group each, for
    (task, category) pairs: two categories with one key, or a task named as the key of a category that holds other
    tasks too; None when every key is one group's (a task that is its own category's only task is one group)."""
    keys: dict[str, str] = {}
    members: dict[str, set[str]] = defaultdict(set)
    for task, category in sorted(set(task_categories)):
        other = keys.setdefault(group_name(category), category)
        if other != category:
            return f"categories '{other}' and '{category}' differ only in case or spaces"
        members[group_name(category)].add(task)
    named = next((task for task in sorted({t for group in members.values() for t in group})
                  if task in members and members[task] != {task}), None)
    if named is not None:
        return f"task '{named}' has the name the category '{keys[named]}' (of other tasks too) is scored under"
    return None


def read_text(path: Path, what: str, fix: str) -> str:
    """The UTF-8 text of a task or split file (a BOM dropped), every failure one line naming the file."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise OrchmoeError(f"{path}: {what} is {size:,} bytes, more than the {MAX_FILE_BYTES:,} allowed; "
                               f"{fix}")
        data = path.read_bytes()
    except FileNotFoundError:
        raise OrchmoeError(f"{path}: {what} not found{not_found_hint(path, Path.is_file)}; {fix}") from None
    except OSError as exc:
        raise OrchmoeError(f"{path}: cannot read {what} ({exc.strerror}); {fix}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise OrchmoeError(f"{path}: line {line}: not UTF-8 text (byte {exc.start}); re-save the {what} "
                           "as UTF-8") from None


# --------------------------------------------------------------------------- tasks


def read_task(path: Path) -> SNITask:
    """Parse and validate one upstream task file; the task name is the file name without ``.json``."""
    text = read_text(path, "task file", FIX_TASK)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OrchmoeError(f"{path}: line {exc.lineno} column {exc.colno}: invalid JSON ({exc.msg}); "
                           f"{FIX_TASK}") from None
    except RecursionError:
        raise OrchmoeError(f"{path}: invalid JSON (nested too deeply to read); {FIX_TASK}") from None
    except ValueError:  # an integer literal longer than Python converts
        raise OrchmoeError(f"{path}: invalid JSON (a number with too many digits); {FIX_TASK}") from None
    if not isinstance(raw, dict):
        _bad(path, "top level", f"expected a JSON object, got {_kind(raw)}")
    for key in ("Definition", "Categories", "Positive Examples", "Instances"):
        if key not in raw:
            _bad(path, key, "missing required field")
    items = _non_empty_list(path, "Instances", raw["Instances"])
    instances = [_instance(path, f"Instances[{i}]", item) for i, item in enumerate(items)]
    first: dict[str, int] = {}
    for i, instance in enumerate(instances):
        if instance.id in first:
            _bad(path, f"Instances[{i}].id", f"'{instance.id}' is also the id of Instances[{first[instance.id]}]; "
                 "instance ids must be unique")
        first[instance.id] = i
    return SNITask(
        name=path.stem,
        path=path,
        categories=_strings(path, "Categories", raw["Categories"], non_empty=True),
        definition=_strings(path, "Definition", raw["Definition"], non_empty=True),
        positive_examples=_examples(path, "Positive Examples", raw["Positive Examples"]),
        negative_examples=_examples(path, "Negative Examples", raw.get("Negative Examples", [])),
        instances=instances,
        languages={key: _strings(path, key, raw[key]) if key in raw else None for key in LANGUAGE_FIELDS},
        n_available=len(instances),
    )


# --------------------------------------------------------------------------- validation helpers


def _bad(path: Path, where: str, problem: str) -> NoReturn:
    raise OrchmoeError(f"{path}: {where}: {problem}; {FIX_TASK}")


def _kind(value: Any) -> str:
    """A JSON-flavoured description of a value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an empty list" if not value else "a list"
    return "an object"


def _non_empty_list(path: Path, where: str, value: Any) -> list[Any]:
    if not isinstance(value, list) or not value:
        _bad(path, where, f"expected a non-empty list, got {_kind(value)}")
    return value


def _string(path: Path, where: str, value: Any) -> str:
    """A string of at most :data:`MAX_TEXT_CHARS` characters that UTF-8 can encode (no lone surrogates)."""
    if not isinstance(value, str):
        _bad(path, where, f"expected a string, got {_kind(value)}")
    if len(value) > MAX_TEXT_CHARS:
        _bad(path, where, f"{len(value):,} characters, more than the {MAX_TEXT_CHARS:,} allowed in one text")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            _bad(path, where, f"character {exc.start} is a lone surrogate ({value[exc.start]!a}), "
                 "which is not valid Unicode text")
    return value


def _strings(path: Path, where: str, value: Any, non_empty: bool = False) -> list[str]:
    if not isinstance(value, list) or (non_empty and not value):
        _bad(path, where, f"expected a {'non-empty ' if non_empty else ''}list of strings, got {_kind(value)}")
    return [_string(path, f"{where}[{i}]", item) for i, item in enumerate(value)]


def _object(path: Path, where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        _bad(path, where, f"expected an object, got {_kind(value)}")
    return value


def _examples(path: Path, where: str, value: Any) -> list[Example]:
    if not isinstance(value, list):
        _bad(path, where, f"expected a list of examples, got {_kind(value)}")
    examples = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        item = _object(path, at, item)
        for key in ("input", "output"):
            if key not in item:
                _bad(path, f"{at}.{key}", "missing required field")
        explanation = item.get("explanation")
        examples.append(Example(
            input=_string(path, f"{at}.input", item["input"]),
            output=_string(path, f"{at}.output", item["output"]),
            explanation=None if explanation is None else _string(path, f"{at}.explanation", explanation),
        ))
    return examples


def _instance(path: Path, where: str, value: Any) -> Instance:
    item = _object(path, where, value)
    for key in ("id", "input", "output"):
        if key not in item:
            _bad(path, f"{where}.{key}", "missing required field")
    output = item["output"]
    if not isinstance(output, list) or not output:
        _bad(path, f"{where}.output", f"expected a non-empty list of reference strings, got {_kind(output)}")
    return Instance(
        id=_string(path, f"{where}.id", item["id"]),
        input=_string(path, f"{where}.input", item["input"]),
        output=[_string(path, f"{where}.output[{i}]", ref) for i, ref in enumerate(output)],
    )
