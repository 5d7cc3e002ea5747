"""Crash-safe file writing and safe reading: the one place files are written and checkpoints parsed.

Writers never leave a half-written file: content goes to a temporary file in the same directory,
is flushed to disk, renamed over the target, and the directory entry is flushed too. Readers only
ever parse JSON and safetensors (never pickles) and turn every problem into one line naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from orchmoe_cli.errors import OrchmoeError


def distinct(labels: list[str], separator: str = "#") -> list[str]:
    """``labels`` with repeats told apart: a repeated ``x`` becomes ``x#2`` (``x#3`` ...), never a label that is
    already in the list, so every label names one thing (results keyed by label never overwrite each other)."""
    given, taken, out = set(labels), set(), []
    for label in labels:
        name, n = label, 1
        while name in taken or (name != label and name in given):
            n += 1
            name = f"{label}{separator}{n}"
        taken.add(name)
        out.append(name)
    return out


def unique_names(labels: list[str]) -> list[str]:
    """File-safe names for ``labels``: characters other than letters, digits, ``-`` and ``_`` become ``_`` (at most
    100 kept), and names that repeat are told apart by :func:`distinct` (``-2``, ``-3`` ...)."""
    return distinct([re.sub(r"[^A-Za-z0-9_-]", "_", label)[:100].strip("_") or "unnamed" for label in labels], "-")


def disk_error(target: Path, exc: OSError) -> OrchmoeError | OSError:
    """The one-line error for a full disk or an unwritable place; any other OSError is returned as is."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OrchmoeError(f"{target}: no space left on the device; free some space and run the command again")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OrchmoeError(f"{target}: cannot write here ({exc.strerror}); choose another output directory")
    return exc


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename inside it survives a power loss)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _as_disk_error(target: Path, exc: Exception) -> Exception:
    """OSError and safetensors' own "os error 28" (a full disk) become one-line errors where they can."""
    if isinstance(exc, OSError):
        return disk_error(target, exc)
    if "os error 28" in str(exc):
        return disk_error(target, OSError(errno.ENOSPC, str(exc)))
    return exc


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, fsync it, rename it over ``path``, fsync the folder.
    On failure the temporary file and any folder made for it are removed."""
    target = Path(path)
    tmp: Path | None = None
    made = [folder for folder in (target.parent, *target.parent.parents) if not folder.exists()]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException as exc:
        if tmp is not None and tmp.exists():
            tmp.unlink()
        for folder in made:  # the folders this write made, deepest first: a failed write leaves nothing
            with contextlib.suppress(OSError):
                folder.rmdir()
        mapped = _as_disk_error(target, exc) if isinstance(exc, Exception) else exc
        if mapped is exc:
            raise
        raise mapped from None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def json_text(value: Any, target: str | Path, **options: Any) -> str:
    """``value`` as JSON text for ``target`` (a file, or where the text goes). NaN and infinities are not JSON (most
    readers refuse them) and never a result worth keeping, so one is refused: one line naming ``target`` and the
    key path where the number sits."""
    try:
        return json.dumps(value, allow_nan=False, **options)
    except ValueError:
        found = _non_finite(value, "")
        if found is None:  # another problem (a circular reference): not the user's to fix
            raise
        where, number = found
        raise OrchmoeError(f"{target}: {where or 'the value'} is {number}, a number that cannot be right and that "
                           "JSON cannot hold; refused rather than written") from None


def _non_finite(value: Any, path: str) -> tuple[str, float] | None:
    """(key path such as ``scores.rougeL`` or ``rows[3]``, number) of the first NaN or infinity in ``value``."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, value)
    if isinstance(value, dict):
        inner = ((f"{path}.{key}" if path else str(key), item) for key, item in value.items())
    elif isinstance(value, (list, tuple)):
        inner = ((f"{path}[{i}]", item) for i, item in enumerate(value))
    else:
        return None
    return next((found for where, item in inner if (found := _non_finite(item, where)) is not None), None)


def atomic_write_json(path: str | Path, value: Any) -> None:
    atomic_write_text(path, json_text(value, path, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces ``path`` in one rename.

    On any exception the temporary directory is removed and ``path`` is left as it was.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp creates 0700; directories get the umask like files
    except OSError as exc:
        raise disk_error(target, exc) from None
    try:
        yield staging
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
        fsync_dir(target.parent)
    except OSError as exc:
        raise disk_error(target, exc) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_files(directory: str | Path, files: dict[str, str]) -> None:
    """Write ``files`` (name -> text) into a hidden staging folder inside ``directory``, then rename each into
    place in the given order (put the file that vouches for the others last). Other files in ``directory``
    are left alone; a full disk while writing replaces nothing."""
    target = Path(directory)
    try:
        target.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target))
    except OSError as exc:
        raise disk_error(target, exc) from None
    try:
        for name, text in files.items():
            atomic_write_text(staging / name, text)
        for name in files:
            os.replace(staging / name, target / name)
        fsync_dir(target)
    except OSError as exc:
        raise disk_error(target, exc) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_json(path: str | Path, missing: str = "file not found", damaged: str = "") -> Any:
    """Parse a JSON file; ``missing`` / ``damaged`` finish the one-line error when it is absent or unreadable."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OrchmoeError(f"{path}: {missing}") from None
    except IsADirectoryError:
        raise OrchmoeError(f"{path}: is a directory, expected a JSON file") from None
    except (ValueError, RecursionError) as exc:  # also bad UTF-8, too deep nesting and too long integers
        raise OrchmoeError(f"{path}: not valid JSON ({exc}){damaged}") from None


def read_safetensors(path: str | Path, header_only: bool = False, missing: str = "file not found",
                     damaged: str = "") -> dict[str, Any]:
    """Load the tensors of a safetensors file (or, with ``header_only``, only check its header covers the file)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load

    path = Path(path)
    try:
        if header_only:
            with safe_open(path, "pt"):
                return {}
        return load(path.read_bytes())
    except FileNotFoundError:
        raise OrchmoeError(f"{path}: {missing}") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise OrchmoeError(f"{path}: not a readable safetensors file ({exc}){damaged}") from None
