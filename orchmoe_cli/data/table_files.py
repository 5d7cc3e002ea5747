"""Reading and writing table files (JSONL / JSON / CSV / TSV / Parquet, or a hub dataset).

Local files are read one by one with the standard library's ``json`` and ``csv`` and with pyarrow's Parquet
reader, cell by cell as they are: a value's type is its own (a number in one file cannot turn another file's
answers into JSON text, as a merged schema would), CSV cells stay text (``007`` is not the number 7, ``NA`` is
not missing), every error names its file and line, and nothing is cached, so an edit is always read (a cache
keyed by modification time missed one that kept it: ``cp -p``, ``rsync -a``). A hub dataset is read with
🤗 ``datasets``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchmoe_cli.data.data_config import DataConfig
from orchmoe_cli.errors import OrchmoeError, did_you_mean, first_repeat
from orchmoe_cli.fsutil import atomic_write
from orchmoe_cli.paths import inside

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
ROLES = ("task", "input", "output", "id", "instruction", "category", "split")
REQUIRED = ("task", "input", "output")


def table_files(path: Path) -> list[Path]:
    """The table files a source path names: the file itself, or those of a directory (each read on its own)."""
    if path.is_file():
        return [path] if path.suffix.lower() in BUILDERS else []
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in BUILDERS
                      and not p.name.startswith("."))  # hidden: backups, macOS' ._ files
    return []


def table_folders_below(path: Path) -> list[Path]:
    """The folders one level below ``path`` (not hidden ones) that hold table files."""
    return inside(path, lambda child: child.is_dir() and bool(table_files(child)))


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
    lines: list[int] | None = None  # each row's line in the file (JSONL, CSV); None where rows are not lines
    fingerprint: str = ""

    def where(self, row: int) -> str:
        """``file: line N`` (JSONL, CSV) or ``file: row N`` (1-based), for messages."""
        if self.lines is None:
            return f"{self.origin}: row {row + 1}"
        return f"{self.origin}: line {self.lines[row]}"


def read_parts(cfg: DataConfig, files: list[Path], hub_id: str | None) -> list[TablePart]:
    """Every file (or the hub dataset) read, with the recipe's column map applied and checked."""
    if hub_id is not None:
        return [_hub_part(cfg, hub_id)]
    return [_file_part(path, cfg) for path in files]


def _roles(names: list[str], origin: str, cfg: DataConfig) -> dict[str, str | None]:
    """Each role's column in a table with columns ``names``: a required one, or one the recipe names, must be
    there; an optional one left at its default may be absent (None), and is when a required role reads its column
    (``task: category`` leaves no category column)."""
    defaults, found = type(cfg.columns)(), {}
    required = {getattr(cfg.columns, role) for role in REQUIRED}
    for role in ROLES:
        name = getattr(cfg.columns, role)
        default = role not in REQUIRED and name == getattr(defaults, role)
        if name is not None and name in names and not (default and name in required):
            found[role] = name
        elif name is not None and not default:
            hint = did_you_mean(name, names) or ("; the header holds ';': separate the columns with commas"
                                                 if any(";" in n for n in names) else "")
            raise OrchmoeError(f"{origin}: no column '{name}'{hint} (columns: {', '.join(names)}); map yours with "
                               f"data.columns.{role}", field=f"data.columns.{role}")
        else:
            found[role] = None
    return found


def _file_part(path: Path, cfg: DataConfig) -> TablePart:
    origin = str(path)
    try:
        if path.stat().st_size == 0:
            raise OrchmoeError(f"{origin}: the file is empty", field="data.source")
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            return _parquet_part(path, cfg)
        text = path.read_bytes().decode("utf-8-sig")  # line ends as written: a quoted CSV cell keeps its \r\n
    except UnicodeDecodeError as exc:
        raise OrchmoeError(f"{origin}: is not UTF-8 text (byte {exc.start}); save it as UTF-8",
                           field="data.source") from None
    except OSError as exc:
        raise OrchmoeError(f"{origin}: cannot be read ({exc.strerror})", field="data.source") from None
    records = _csv_records(text, origin, "\t" if suffix == ".tsv" else ",") if BUILDERS[suffix] == "csv" else \
        _json_records(text, origin)
    wanted = {getattr(cfg.columns, role) for role in ROLES} - {None}
    found: dict[str, list[Any]] = {name: [] for name in wanted}
    names: dict[str, Any] = {}
    lines: list[int] = []
    for line, record in records:  # only the columns the recipe maps are kept, row by row
        names.update(record)
        for name, values in found.items():
            values.append(record.get(name))
        lines.append(line)
    if not lines:
        raise OrchmoeError(f"{origin}: the table has no rows", field="data.source")
    roles = _roles(list(names), origin, cfg)
    columns = {role: None if name is None else found[name] for role, name in roles.items()}
    return TablePart(origin, columns, len(lines), None if lines[0] < 0 else lines)


def _json_records(text: str, origin: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, object) of JSON Lines (blank lines skipped), or (-1, object) of a JSON list of objects (a ``.json``
    file holding one JSON value, or any file starting with ``[``)."""
    whole: Any = None
    if text.lstrip().startswith("[") or origin.lower().endswith(".json"):
        try:
            whole = json.loads(text)
        except ValueError as exc:
            if text.lstrip().startswith("["):
                raise OrchmoeError(f"{origin}: not valid JSON ({exc})", field="data.source") from None
    if whole is not None:
        if isinstance(whole, dict) and not any(isinstance(v, dict) for v in whole.values()):
            whole = [whole]  # one object: one row (a column-oriented table holds objects per column)
        if not isinstance(whole, list):
            raise OrchmoeError(f"{origin}: expected a JSON list of objects (pandas: orient='records') or JSON Lines, "
                               f"got a {type(whole).__name__} of columns", field="data.source")
        for row, record in enumerate(whole):
            if not isinstance(record, dict):
                raise OrchmoeError(f"{origin}: row {row + 1}: expected a JSON object per row", field="data.source")
            yield -1, record
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise OrchmoeError(f"{origin}: line {number}: not valid JSON ({exc}); JSON Lines hold one object per "
                               "line", field="data.source") from None
        if not isinstance(record, dict):
            raise OrchmoeError(f"{origin}: line {number}: expected a JSON object, got {type(record).__name__}",
                               field="data.source")
        yield number, record


def _csv_records(text: str, origin: str, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, row) with every cell as text, quoted as pandas, ``csv`` and spreadsheets write it (TSV too); a column
    without a name (pandas' index, a trailing comma) is left out. A row's line is where it starts (a quoted cell may
    span lines)."""
    csv.field_size_limit(sys.maxsize)  # a long input is a cell like any other
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)  # a stray quote: refused
    try:
        header = next((cells for cells in reader if any(cell.strip() for cell in cells)), [])
        named = [(i, name) for i, name in enumerate(header) if name.strip()]
        names = [name for _, name in named]
        repeated = first_repeat(names)
        if not names or repeated is not None:
            problem = f"column '{repeated}' is named twice" if names else "the first line names no columns"
            raise OrchmoeError(f"{origin}: line 1: {problem}; column names are unique", field="data.source")
        start = reader.line_num + 1
        for cells in reader:
            if len(cells) > len(header) and any(cell.strip() for cell in cells[len(header):]):
                raise OrchmoeError(f"{origin}: line {start}: {len(cells)} cells under {len(header)} column names",
                                   field="data.source")
            if any(cell.strip() for cell in cells):
                yield start, {name: cells[i] if i < len(cells) else "" for i, name in named}
            start = reader.line_num + 1
    except csv.Error as exc:
        raise OrchmoeError(f"{origin}: line {reader.line_num}: not valid CSV ({exc})", field="data.source") from None


def _parquet_part(path: Path, cfg: DataConfig) -> TablePart:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        roles = _roles(list(schema.names), str(path), cfg)
        table = pq.read_table(path, columns=sorted({name for name in roles.values() if name is not None}))
    except OrchmoeError:
        raise
    except Exception as exc:  # pyarrow's errors for a damaged or foreign file: one line
        raise _read_error(str(path), exc) from None
    if not table.num_rows:
        raise OrchmoeError(f"{path}: the table has no rows", field="data.source")
    columns = {role: None if name is None else table.column(name).to_pylist() for role, name in roles.items()}
    return TablePart(str(path), columns, table.num_rows)


def _hub_part(cfg: DataConfig, hub_id: str) -> TablePart:
    import datasets

    cache = Path(cfg.cache_dir).expanduser() / "tables"
    with quiet_datasets():
        try:
            table = datasets.load_dataset(hub_id, name=cfg.hub_config, revision=cfg.revision, split=cfg.hub_split,
                                          cache_dir=str(cache))
            roles = _roles(list(table.column_names), hub_id, cfg)
            columns = {role: None if name is None else table[name][:] for role, name in roles.items()}
        except OrchmoeError:
            raise
        except Exception as exc:  # datasets wraps parser and network errors in many types: one line each
            raise _read_error(hub_id, exc) from None
    if not len(table):
        raise OrchmoeError(f"{hub_id}: the table has no rows", field="data.source")
    return TablePart(hub_id, columns, len(table), None, getattr(table, "_fingerprint", ""))


def _read_error(origin: str, exc: BaseException) -> OrchmoeError:
    chain, cause = [], exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    cause = chain[-1]
    text = " ".join(str(cause).split())[:300] or type(cause).__name__
    return OrchmoeError(f"{origin}: cannot be read as a table ({type(cause).__name__}: {text})", field="data.source")


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
