"""Every path a user gives goes through one resolver, and every directory a command writes through one claim.

:func:`user_path` is the only place ``~`` and ``$VAR`` / ``${VAR}`` are expanded and a path's form is checked
(empty, NUL bytes, over-long names); recipe fields carry ``path`` metadata (see :data:`PATH_KINDS`) and the schema
resolves them all when a recipe is loaded, command-line options call it directly. :func:`claim_directory` is the
only place that decides whether a command may write into a directory: never inside a saved checkpoint, never into
another command's output, never into a directory holding files orchmoe did not write (a user's recipe, say).
:func:`not_found_hint` is where every "not found" looks one level up and down. Torch-free, so all of it runs
before anything heavy is imported.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from orchmoe_cli.errors import OrchmoeError, did_you_mean

# what a path field holds: "dir" a directory orchmoe writes or caches into (a file there is refused at once),
# "input" a file or directory it reads, "location" a path or a name (a hub id, 'bundled', 'latest', 'none')
PATH_KINDS = ("dir", "input", "location")
MAX_NAME_BYTES = 255  # one path component, as common file systems allow
MAX_PATH_BYTES = 4096
CHECKPOINT_MANIFEST = "manifest.json"  # written last into every saved checkpoint
# commands that replace their output directory whole (built aside, renamed into place): the files they write, so
# a rerun never takes a user's file with it
REPLACED_WHOLE: dict[str, tuple[str, ...]] = {"inspect-routing": ("routing.json", "routing.csv", "*.png")}
BOOKKEEPING = (".lock",)  # what any command leaves while it runs (or after a kill): never a user's file
_ENV_REFERENCE = re.compile(r"\$\{(\w+)\}|\$(\w+)")

# the files (glob patterns) that mark a directory as one command's output, including outputs of earlier versions
OUTPUT_MARKS: dict[str, tuple[str, ...]] = {
    "train": ("checkpoints/step-*", "train_summary.json"),  # stopped before its first checkpoint: see output_of
    "adapt": ("sweep.json", "adapt_results.jsonl"),
    "eval": ("results.json", "predictions.jsonl", ".predictions.partial*.jsonl"),
    "inspect-routing": ("routing.json",),
    "export": ("orchmoe_export.json",),
    "prepare": ("*/manifest.json", "tables/*/default-*"),  # a data.cache_dir: a folder per content hash, tables
}


def _error(field: str, text: str, option: bool) -> OrchmoeError:
    return OrchmoeError(f"{field}: {text}") if option else OrchmoeError(text, field=field)


def user_path(value: str | Path, field: str, option: bool = False) -> Path:
    """``value`` with ``~`` and environment variables expanded, refused in one line naming ``field`` (a recipe field,
    or with ``option`` a command-line option) when a variable is unset, or it is empty, holds a NUL byte or a name
    no file system accepts."""
    text = str(value)
    if not text.strip():
        raise _error(field, "is empty; give a path", option)
    if "\x00" in text:
        raise _error(field, "contains a NUL byte, which no path can hold", option)

    def lookup(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in os.environ:
            raise _error(field, f"environment variable {name} is not set; export {name}=... or give the path "
                                "without it", option)
        return os.environ[name]

    path = Path(_ENV_REFERENCE.sub(lookup, text)).expanduser()
    long_name = next((part for part in path.parts if len(part.encode()) > MAX_NAME_BYTES), None)
    if long_name is not None:
        raise _error(field, f"the name '{long_name[:40]}...' is {len(long_name.encode())} bytes long; file systems "
                            f"allow {MAX_NAME_BYTES}", option)
    if len(str(path).encode()) > MAX_PATH_BYTES:
        raise _error(field, f"the path is longer than {MAX_PATH_BYTES} bytes", option)
    return path


def directory_path(value: str | Path, field: str, option: bool = False) -> Path:
    """A directory to write or cache into, resolved: refused when it, or the nearest existing folder above it, is a
    file (checked before any data or model is loaded)."""
    path = user_path(value, field, option)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise _error(field, f"{path} {where}; choose a directory", option)
    return path


def checkpoint_above(path: Path) -> Path | None:
    """The saved checkpoint that ``path`` is, or lies inside (its folder holds the checkpoint manifest beside an
    adapter config), wherever it was saved or copied to."""
    for folder in (path, *path.parents):
        if (folder / CHECKPOINT_MANIFEST).is_file() and (folder / "adapter_config.json").is_file():
            return folder
    return None


TRAIN_REWRITES = ("recipe.yaml", "train_summary.json", "loss_curve.png")  # written when a run ends
# marks that are files a user may also name so: they count only when they hold these keys
MARK_KEYS: dict[str, tuple[str, ...]] = {"train_summary.json": ("step", "adapter_checksums")}


def _is_mark(found: Path) -> bool:
    keys = MARK_KEYS.get(found.name)
    if keys is None:
        return True
    try:
        value = json.loads(found.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(value, dict) and all(key in value for key in keys)


def output_of(path: Path) -> str | None:
    """The command whose output ``path`` holds, judged by the files it writes; None when it holds none of them."""
    if not path.is_dir():
        return None
    for command, marks in OUTPUT_MARKS.items():
        if any(next((found for found in path.glob(mark) if _is_mark(found)), None) is not None for mark in marks):
            return command
    if (path / "metrics.jsonl").is_file() and not any((path / name).exists() for name in TRAIN_REWRITES):
        return "train"  # a run stopped before it ended (which writes these files) and before its first checkpoint
    return None


def claim_parent(value: str | Path, field: str, option: bool = False) -> Path:
    """A directory a command writes into, resolved and checked before any heavy work: a directory (not a file),
    never a saved checkpoint or inside one, and writable where it starts. Enough for a directory the command only
    adds its own named subdirectory to (``eval-<name>/``)."""
    path = directory_path(value, field, option)
    checkpoint = checkpoint_above(path.absolute())
    if checkpoint is not None:
        raise _error(field, f"{path} is inside the saved checkpoint {checkpoint}; writing there would change it "
                            "(choose another directory)", option)
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _error(field, f"cannot write in {existing} (permission denied or a read-only file system); choose "
                            "another directory", option)
    return path


def claim_directory(value: str | Path, field: str, command: str, option: bool = False) -> Path:
    """The directory ``command`` will create or fill (:func:`claim_parent`'s checks too): not another command's
    output, and either new, empty, or this command's own earlier output. Nothing a user made is written over."""
    path = claim_parent(value, field, option)
    owner = output_of(path)
    if owner is not None and owner != command:
        raise _error(field, f"{path} holds the output of `orchmoe {owner}`; choose another directory for "
                            f"`orchmoe {command}` (nothing there is replaced)", option)
    if owner == command and command in REPLACED_WHOLE:
        own = REPLACED_WHOLE[command]
        foreign = sorted(e.name for e in path.iterdir() if not any(fnmatch.fnmatch(e.name, p) for p in own))
        if foreign:
            raise _error(field, f"{path} holds files `orchmoe {command}` did not write ({', '.join(foreign[:3])}), and "
                                "a new report replaces the folder whole: move them or choose another directory", option)
    if owner is None and path.is_dir():  # outputs nested in a run directory (eval-*/, routing-*/) are not foreign
        foreign = sorted(entry.name for entry in path.iterdir() if entry.name not in BOOKKEEPING
                         and output_of(entry) is None)
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise _error(field, f"{path} holds files orchmoe did not write ({shown}); choose a new or empty "
                                "directory (nothing there is replaced)", option)
    return path


def claim_file(value: str | Path, field: str, option: bool = False) -> Path:
    """A new file a command writes (``--output``, ``--plot``, ``--export-table``): resolved, not there yet (an
    existing file may be the user's, or the command's own input), and its folder passes :func:`claim_parent`
    (never inside a saved checkpoint)."""
    path = user_path(value, field, option)
    if path.is_dir():
        raise _error(field, f"{path} is a directory; give a file name", option)
    if path.exists() or path.is_symlink():
        raise _error(field, f"{path} already exists; choose another file (nothing is overwritten)", option)
    claim_parent(path.parent, field, option)
    return path


def claim_new_directory(value: str | Path, field: str, option: bool = False) -> Path:
    """A directory a command creates whole (``export --out``): :func:`claim_parent`'s checks, and it must not exist
    yet or be empty."""
    path = claim_parent(value, field, option)
    if path.exists() and any(path.iterdir()):
        raise _error(field, f"{path} already exists and is not empty; choose a new directory (nothing there is "
                            "replaced)", option)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Where a thing the user named may be when it is not where they said: every "not found" (a recipe file,
# data.source, a checkpoint) looks one level up and one level down, because the usual slip is a command run one
# folder off (``../r.yaml`` or ``runs/r.yaml`` exists), a close spelling (``r.yml``), or a folder given instead of
# the file in it. What is found goes into the one-line error as a suggestion; a file the user did not name is never
# used in silence.

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
    then in the folders beside it (``runs/r.yaml``), written as relative as ``path`` was."""
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
