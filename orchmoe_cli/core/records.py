"""Records that accumulate run after run (JSON Lines that grow a line per finished unit of work, and the JSON
object that says what they hold): one validating reader, and what every such record is bound to.

A damaged record is one line naming the file and line. The one exception is a final line cut short, what a
kill or a full disk leaves halfway through an append: it is dropped with a warning, so the unit of work it
would have recorded runs again, and :meth:`JsonLines.repair` removes it before the next line is appended.
A record is bound to everything its numbers depend on (the base model, the checkpoint); a continuation
compares the binding and names the first field that differs (:func:`first_difference`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.fsutil import disk_error, read_json
from orchmoe_cli.recipe import ModelConfig

Check = Callable[[dict[str, Any]], str | None]  # a record -> what is wrong with it, or None


@dataclass(frozen=True)
class JsonLines:
    """The records of a JSON Lines file, and what :meth:`repair` needs."""

    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)  # each record's line number, for errors found later
    cut: int | None = None  # the final line's number when it was cut short (dropped)
    whole: int = 0  # bytes up to the end of the last whole line
    unterminated: bool = False  # the final line is a whole record without its newline

    @property
    def warning(self) -> str | None:
        if self.cut is None:
            return None
        return (f"{self.path}: line {self.cut} was cut short (no newline at its end, not JSON), as a killed run "
                "leaves it; it is dropped and what it recorded runs again")

    def repair(self) -> None:
        """End the file after its last whole line, with a newline, so a line appended next stands on its own."""
        if self.cut is None and not self.unterminated:
            return
        try:
            with self.path.open("r+b") as handle:
                handle.truncate(self.whole)
                if self.unterminated:
                    handle.seek(0, 2)
                    handle.write(b"\n")
        except OSError as exc:
            raise disk_error(self.path, exc) from None


def _record(raw: bytes, check: Check | None) -> dict[str, Any] | str:
    """The line's record, or what is wrong with it; raises ``ValueError`` when it does not parse
    (``UnicodeDecodeError`` when it is not UTF-8)."""
    value = json.loads(raw.decode("utf-8"))
    if not isinstance(value, dict):
        return f"expected a JSON object, got {type(value).__name__}"
    problem = check(value) if check is not None else None
    return value if problem is None else problem


def read_jsonl(path: Path, check: Check | None = None, *, cut_ok: bool = False, fix: str = "") -> JsonLines:
    """Every record of ``path`` (none when it does not exist), each a JSON object that ``check`` accepts; blank
    lines are skipped. Any other line is one error naming the file and line (``fix`` ends it), except, with
    ``cut_ok``, a final line without its newline that does not parse: dropped (``JsonLines.cut``)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return JsonLines(path)
    except IsADirectoryError:
        raise OrchmoeError(f"{path}: is a directory, expected a JSON Lines file") from None
    except OSError as exc:
        raise disk_error(path, exc) from None
    *lines, tail = data.split(b"\n")  # tail: what follows the last newline (empty when the file ends with one)
    records, numbers = [], []
    for number, raw in enumerate([*lines, tail], start=1):
        if not raw.strip():
            continue
        try:
            found = _record(raw, check)
        except (ValueError, RecursionError) as exc:  # also too deep nesting and too long integers
            if number > len(lines) and cut_ok:  # the final line, unterminated; a cut can split a character too
                return JsonLines(path, records, numbers, cut=number, whole=len(data) - len(tail))
            found = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else f"not valid JSON ({exc})"
        if isinstance(found, str):
            raise OrchmoeError(f"{path}: line {number}: {found}{fix}")
        records.append(found)
        numbers.append(number)
    return JsonLines(path, records, numbers, whole=len(data), unterminated=bool(tail.strip()))


def read_json_object(path: Path, what: str, fix: str = "") -> dict[str, Any]:
    """The JSON object in ``path`` (``what`` it should hold names it in the error when it is anything else)."""
    value = read_json(path, damaged=fix)
    if not isinstance(value, dict):
        raise OrchmoeError(f"{path}: expected a JSON object ({what}), got {type(value).__name__}{fix}")
    return value


def base_identity(model: Any, cfg: ModelConfig) -> dict[str, Any]:
    """What a base model's numbers depend on: its name (and for a built-in tiny model the settings that make its
    weights), architecture, sizes, parameter count, dtype and quantisation (a record made on another base is not
    comparable, whatever its name)."""
    from orchmoe_cli.core.base_models import TINY_MODELS  # torch: only where a model is already loaded

    config = model.config
    return {"name": cfg.name, "revision": cfg.revision, "architecture": type(model).__name__,
            "hidden_size": getattr(config, "hidden_size", None),
            "intermediate_size": getattr(config, "intermediate_size", getattr(config, "d_ff", None)),
            "layers": getattr(config, "num_hidden_layers", None),
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(model.dtype).removeprefix("torch."), "quantization": cfg.quantization,
            "tiny": dataclasses.asdict(cfg.tiny) if cfg.name in TINY_MODELS else None}


NOT_RECORDED = "<not recorded>"


def first_difference(recorded: Mapping[str, Any], current: Mapping[str, Any],
                     prefix: str = "") -> tuple[str, Any, Any] | None:
    """(dotted field, recorded value, current value) of the first field of ``current`` that ``recorded`` holds
    otherwise (a field it lacks reads as :data:`NOT_RECORDED`); nested mappings are compared field by field."""
    for name, value in current.items():
        old = recorded.get(name, NOT_RECORDED)
        if isinstance(value, Mapping):
            found = first_difference(old if isinstance(old, Mapping) else {}, value, f"{prefix}{name}.")
            if found is not None:
                return found
        elif old != value:
            return f"{prefix}{name}", old, value
    return None


def shown(value: Any) -> str:
    """A recorded or current value as a message shows it."""
    return "nothing (not recorded)" if value == NOT_RECORDED else repr(value)
