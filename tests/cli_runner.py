"""Drive the real `orchmoe` command line in-process, as a user would, and return its exit code."""

from __future__ import annotations

import pytest

from orchmoe_cli.cli import main


def run_cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return int(exit_info.value.code or 0)
