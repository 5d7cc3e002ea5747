"""Reading and writing table files (JSONL / JSON / CSV / TSV / Parquet, or a hub dataset) with 🤗 ``datasets``.

Each file is read on its own, so a column's type is inferred per file (a number in one file cannot turn another
file's answers into JSON text when the schemas are merged), every error names its file and line, and CSV cells
stay text (``007`` is not the number 7, ``NA`` is not missing). ``datasets`` caches a file by path and
modification time; the cache here is also keyed by the file's bytes, so an edit that keeps the time (``cp -p``,
``rsync -a``, an unpacked archive) is read again.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchmoe_cli.data.data_config import DataConfig
from orchmoe_cli.data.sni import hash_file
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.fsutil import atomic_write

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
ROLES = ("task", "input", "output", "id", "instruction", "category", "split")
REQUIRED = ("task", "input", "output")
FIRST_LINE = {".jsonl": 1, ".csv": 2, ".tsv": 2}  # the line of a file's first row; other formats count rows


def table_files(path: Path) -> list[Path]:
    """The table files a source path names: the file itself, or those of a directory (each read on its own)."""
    if path.is_file():
        return [path] if path.suffix.lower() in BUILDERS else []
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in BUILDERS)
    return []


def looks_like_hub_id(value: str) -> bool:
    """owner/name, and not a local path: nothing by that name here, no folder named like the owner, no table
    suffix (``data/tasks.jsonl`` misspelled is a missing file, not a dataset to ask the hub for)."""
    parts = value.split("/")
    return (len(parts) == 2 and all(parts) and not value.startswith((".", "~")) and not Path(value).exists()
            and not Path(parts[0]).is_dir() and Path(parts[1]).suffix.lower() not in BUILDERS)


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Hide `datasets`' progress bars and info logs: our own progress bar and messages cover the work."""
    import datasets

    verbosity, bars = datasets.utils.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.utils.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


@dataclass
class TablePart:
    """One file's rows (or the hub dataset's): each role's column as a list, None for an absent optional one."""

    origin: str
    columns: dict[str, list[Any] | None]
    n_rows: int
    first_line: int | None  # the file line of row 0; None where rows are not lines
    fingerprint: str = ""

    def where(self, row: int) -> str:
        """``file: line N`` (JSONL, CSV) or ``file: row N`` (1-based), for messages."""
        if self.first_line is None:
            return f"{self.origin}: row {row + 1}"
        return f"{self.origin}: line {row + self.first_line}"


def read_parts(cfg: DataConfig, files: list[Path], hub_id: str | None) -> list[TablePart]:
    """Every file (or the hub dataset) read, with the recipe's column map applied and checked."""
    cache = Path(cfg.cache_dir).expanduser() / "tables"
    if hub_id is not None:
        return [_part(hub_id, lambda: _load_hub(cfg, hub_id, cache), cfg, None)]
    return [_part(str(path), lambda path=path: _load_file(path, cache), cfg, FIRST_LINE.get(path.suffix.lower()))
            for path in files]


def _part(origin: str, load: Any, cfg: DataConfig, first_line: int | None) -> TablePart:
    with quiet_datasets():
        try:
            table = load()
            names = list(table.column_names)
            columns = {role: _column(table, names, origin, cfg, role) for role in ROLES}
        except OrchmoeError:
            raise
        except Exception as exc:  # datasets wraps parser and network errors in many types: one line each
            raise _read_error(origin, exc) from None
    if not len(table):
        raise OrchmoeError(f"{origin}: the table has no rows", field="data.source")
    return TablePart(origin, columns, len(table), first_line, getattr(table, "_fingerprint", ""))


def _column(table: Any, names: list[str], origin: str, cfg: DataConfig, role: str) -> list[Any] | None:
    name = getattr(cfg.columns, role)
    if name in names:  # the whole column decoded at once: indexing a datasets Column per row is slow
        return table[name][:]
    if role in REQUIRED or name != getattr(type(cfg.columns)(), role):  # required, or named in the recipe
        raise OrchmoeError(f"{origin}: no column '{name}' (columns: {', '.join(names)}); map yours with "
                           f"data.columns.{role}", field=f"data.columns.{role}")
    return None


def _read_error(origin: str, exc: BaseException) -> OrchmoeError:
    chain, cause = [], exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for cause in chain:
        if isinstance(cause, UnicodeDecodeError):
            return OrchmoeError(f"{origin}: is not UTF-8 text (byte {cause.start}); save it as UTF-8",
                                field="data.source")
        if isinstance(cause, StopIteration) or "corresponds to no data" in str(cause):
            return OrchmoeError(f"{origin}: the table has no rows", field="data.source")
    cause = chain[-1]
    text = " ".join(str(cause).split())[:300] or type(cause).__name__
    hint = "; a column mixes types (e.g. text and lists, or text and numbers)" if "cast" in text.lower() else ""
    return OrchmoeError(f"{origin}: cannot be read as a table ({type(cause).__name__}: {text}){hint}",
                        field="data.source")


def _load_hub(cfg: DataConfig, hub_id: str, cache: Path) -> Any:
    import datasets

    return datasets.load_dataset(hub_id, name=cfg.hub_config, revision=cfg.revision, split=cfg.hub_split,
                                 cache_dir=str(cache))


def _load_file(path: Path, cache: Path) -> Any:
    import datasets

    if path.stat().st_size == 0:
        raise OrchmoeError(f"{path}: the file is empty", field="data.source")
    digest = hashlib.sha256()
    hash_file(digest, "table", path)
    options: dict[str, Any] = {}
    if BUILDERS[path.suffix.lower()] == "csv":  # every cell read as text, nothing read as missing
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        header = _csv_header(path, delimiter)
        options = {"delimiter": delimiter, "keep_default_na": False, "na_filter": False,
                   "features": datasets.Features({name: datasets.Value("string") for name in header})}
    return datasets.load_dataset(BUILDERS[path.suffix.lower()], data_files=[str(path)], split="train",
                                 cache_dir=str(cache / digest.hexdigest()[:24]), **options)


def _csv_header(path: Path, delimiter: str) -> list[str]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        header = next(csv.reader(handle, delimiter=delimiter), [])
    if not header:
        raise OrchmoeError(f"{path}: the first line names no columns", field="data.source")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise OrchmoeError(f"{path}: line 1: column '{repeated[0]}' is named twice; column names are unique",
                           field="data.source")
    return header


def check_table_name(path: Path) -> Path:
    """A table is written as ``.jsonl`` or ``.parquet``."""
    if path.suffix.lower() not in (".jsonl", ".parquet"):
        raise OrchmoeError(f"{path}: the table is written as .jsonl or .parquet")
    return path


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    """``rows`` as one ``.jsonl`` or ``.parquet`` file, written whole or not at all (a full disk leaves nothing)."""
    import datasets

    table = datasets.Dataset.from_list(rows)
    with quiet_datasets():
        if path.suffix.lower() == ".parquet":
            atomic_write(path, lambda tmp: table.to_parquet(str(tmp)))
        else:
            atomic_write(path, lambda tmp: table.to_json(str(tmp), lines=True, force_ascii=False))
