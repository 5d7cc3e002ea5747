"""The one user-facing error type.

Anything the user can fix (a recipe field, a data file, a checkpoint, an option) raises
:class:`OrchmoeError` with a single line that names the file and/or field and says what to do.
The CLI prints it in red and exits with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class OrchmoeError(Exception):
    """A problem with user input, reported as one line and exit code 2."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # always a single line

    @property
    def message(self) -> str:
        return str(self)


class FieldError(ValueError):
    """Raised by config dataclasses in ``__post_init__``; the loader adds the dotted path and file."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
