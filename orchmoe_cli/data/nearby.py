"""Where a thing the user named may be when it is not where they said: one level up and one level down.

Every "not found" (a recipe file, ``data.source``, a checkpoint) looks there before it gives up, because the
usual slip is a command run one folder off: ``r.yaml`` typed in a subfolder (``../r.yaml`` exists) or in the
folder above (``probe/r.yaml`` exists), a close spelling (``r.yml`` for ``r.yaml``), or a folder given instead of
the file in it. What is found goes into the one-line error as a suggestion; a file the user did not name is never
used in silence. Torch-free and only a directory listing deep, so it costs nothing before anything heavy runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from orchmoe_cli.errors import did_you_mean

SHOWN = 3  # names listed in one message before "..."


def listing(names: Sequence[object]) -> str:
    """``a, b, c, ...``: the first :data:`SHOWN` names, so the message stays one short line."""
    return ", ".join(map(str, names[:SHOWN])) + (", ..." if len(names) > SHOWN else "")


def inside(directory: Path, accept: Callable[[Path], bool]) -> list[Path]:
    """The entries of ``directory`` (not hidden ones) that ``accept`` takes, sorted by name: one level down."""
    try:
        entries = sorted(entry for entry in directory.iterdir() if not entry.name.startswith("."))
    except OSError:  # not a directory, unreadable, gone meanwhile
        return []
    return [entry for entry in entries if _accepts(accept, entry)]


def _accepts(accept: Callable[[Path], bool], path: Path) -> bool:
    try:
        return accept(path)
    except OSError:
        return False


def same_name_nearby(path: Path, accept: Callable[[Path], bool] = Path.exists) -> list[Path]:
    """Paths named like the missing ``path`` that ``accept`` takes: in the folder above its folder (``../r.yaml``),
    then in the folders beside it (``probe/r.yaml``), written as relative as ``path`` was."""
    folder = path.parent
    above = Path(os.path.normpath(folder / os.pardir / path.name))
    found = [above] if above != path and _accepts(accept, above) else []
    return found + [child / path.name for child in inside(folder, Path.is_dir) if _accepts(accept, child / path.name)]


def not_found_hint(path: Path, accept: Callable[[Path], bool] = Path.exists) -> str:
    """What to add to "``path`` not found": a close spelling in its own folder (`` (did you mean 'r.yaml'?)``),
    else the same name one level up or down (``; ../r.yaml exists: did you mean it?``); empty when nothing is near."""
    close = did_you_mean(path.name, [entry.name for entry in inside(path.parent, accept)])
    if close:
        return close
    found = same_name_nearby(path, accept)
    if len(found) == 1:
        return f"; {found[0]} exists: did you mean it?"
    if found:
        return f"; {listing(found)} exist: did you mean one of them?"
    return ""
