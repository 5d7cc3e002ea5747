"""Which reader a recipe's ``data.source`` needs: SNI task files (``sni.py``) or a table (``tables.py``).

Both give the same things to the prepared-data cache: the training and held-out task names, each task's rows
(capped and with its adaptation pool), what to hash, and what the manifest records. Resolving reads no rows, so
the command line can check a source before anything heavy is imported.
"""

from __future__ import annotations

from pathlib import Path

from orchmoe_cli.data.data_config import DataConfig
from orchmoe_cli.data.sni import SourceLayout, given_split_dir, refuse_part_of_sni, resolve_source
from orchmoe_cli.data.table_files import BUILDERS, looks_like_hub_id, table_files, table_folders_below
from orchmoe_cli.data.tables import TableSource
from orchmoe_cli.errors import OrchmoeError, did_you_mean
from orchmoe_cli.paths import listing, not_found_hint

TaskSource = SourceLayout | TableSource


def resolve(cfg: DataConfig) -> TaskSource:
    """The source ``cfg`` names, of the format it says or that its location shows."""
    if cfg.source == "bundled" and cfg.format == "table":
        raise OrchmoeError("'bundled' is the SNI sample, not a table; leave data.format at auto (or sni), or export "
                           "it as one: orchmoe prepare RECIPE --export-table tasks.parquet", field="data.format")
    if cfg.source == "bundled" or cfg.format == "sni":
        return resolve_source(cfg)
    path = Path(cfg.source)  # resolved when the recipe was read (paths.user_path)
    if cfg.format == "auto":
        refuse_part_of_sni(path, cfg)
    files = table_files(path)
    if not path.exists() and _table_suffix(path):  # a table file, by its name, that is not there
        raise OrchmoeError(f"table file '{path}' not found{not_found_hint(path, _is_table_file)}", field="data.source")
    if cfg.format == "auto" and not files and not looks_like_hub_id(cfg.source):
        if path.is_file():
            raise OrchmoeError(f"'{path}' is not a table this reader knows (.jsonl, .json, .csv, .tsv, .parquet) "
                               "nor an SNI directory", field="data.source")
        if path.is_dir() and not _is_sni(path, cfg):
            _refuse_tables_below(path)
        return resolve_source(cfg)  # an SNI directory, or its one-line error
    if cfg.format == "auto" and path.is_dir() and _is_sni(path, cfg):
        return resolve_source(cfg)
    if files:
        if cfg.split_dir is not None:  # checked now, before anything heavy is imported
            given_split_dir(cfg)
        return TableSource(cfg, files)
    if path.exists():
        _refuse_tables_below(path)
        raise OrchmoeError(f"'{path}' holds no table file (.jsonl, .json, .csv, .tsv, .parquet)", field="data.source")
    if not looks_like_hub_id(cfg.source):
        raise OrchmoeError(f"'{path}' not found{not_found_hint(path)}; name a table file, a directory of them, or a "
                           "hub dataset id (owner/name)", field="data.source")
    return TableSource(cfg, [], hub_id=cfg.source)


def _is_sni(path: Path, cfg: DataConfig) -> bool:
    """An SNI directory has its task files in tasks/ or its split files beside them."""
    return (path / "tasks").is_dir() or (path / cfg.train_split).is_file() or (path / "splits").is_dir()


def _is_table_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in BUILDERS


def _refuse_tables_below(path: Path) -> None:
    """A directory without table files whose subdirectories have some: the source is one level down."""
    below = table_folders_below(path)
    if below:
        raise OrchmoeError(f"'{path}' holds no table file, but {listing(below)} do(es): did you mean "
                           f"data.source={below[0]}?", field="data.source")


def _table_suffix(path: Path) -> bool:
    """A table file's suffix, or one misspelled (``.jsnol``): a missing file, not a missing SNI directory."""
    suffix = path.suffix.lower()
    return suffix in BUILDERS or bool(suffix and did_you_mean(suffix, BUILDERS))
