"""The one user-facing error type.

Anything the user can fix (a recipe field, a data file, a checkpoint, an option) raises
:class:`OrchmoeError` with a single line that names the file and/or field and says what to do.
The CLI prints it in red and exits with code 2; ``--debug`` shows the traceback instead.

A problem with a recipe field is raised as ``OrchmoeError(text, field="eval.tasks")`` wherever it is found;
the command wraps its work in :func:`recipe_source`, which names the recipe file once, so no function
needs the file name only to put it in its messages. Errors about other files (checkpoints, data files)
name their own file in their text and carry no field.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class OrchmoeError(Exception):
    """A problem with user input, reported as one line and exit code 2.

    ``field`` is the dotted recipe field at fault (``eval.tasks``) and ``source`` the file it was read from,
    usually filled in later by :func:`recipe_source`. The line reads ``source: field: text``, leaving out
    the parts that are None.
    """

    def __init__(self, message: str, *, field: str | None = None, source: str | None = None) -> None:
        super().__init__(message)
        self.text = message
        self.field = field
        self.source = source
        self.overridden = False  # the field's value came from the command line, over the recipe file

    def __str__(self) -> str:
        field = f"{self.field} (set on the command line)" if self.field is not None and self.overridden else self.field
        parts = [part for part in (self.source, field, self.text) if part is not None]
        return " ".join(": ".join(parts).split())  # always a single line

    @property
    def message(self) -> str:
        return str(self)


@contextlib.contextmanager
def recipe_source(path: str | Path, overrides: Iterable[str] = ()) -> Iterator[None]:
    """Name the recipe file ``path`` in every recipe-field error raised inside the block, and say so when one of
    ``overrides`` (``section.field=value``) set that field on the command line, over the file.

    An :class:`OrchmoeError` with a ``field`` and no ``source`` yet gets ``source = str(path)`` and goes on
    its way; errors about other files, or already attributed to a file, pass unchanged."""
    given = {item.partition("=")[0].strip() for item in overrides if "=" in item}
    try:
        yield
    except OrchmoeError as exc:
        if exc.field is not None and exc.source is None:
            exc.source = str(path)
            exc.overridden = any(exc.field == key or exc.field.startswith(f"{key}.") or key.startswith(f"{exc.field}.")
                                 for key in given)  # the field, inside it, or a section the override named
        raise


class FieldError(ValueError):
    """Raised by config dataclasses in ``__post_init__``; the loader adds the dotted path and file."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def first_repeat(items: Sequence[Any]) -> Any | None:
    """The first item given a second time (None when every item is given once): every label is one thing's."""
    return next((item for i, item in enumerate(items) if item in items[:i]), None)


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options``, or nothing."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
