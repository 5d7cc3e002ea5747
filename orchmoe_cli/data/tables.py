"""Multi-task tables as a task source: JSONL / JSON / CSV / TSV / Parquet files or a Hugging Face dataset, read
with 🤗 ``datasets``, one row per instance, a column naming its task.

Rows become the same tasks the SNI reader yields (a task's instruction is its definition, it has no
demonstrations), so encoding, caching, sampling and pools are shared: the first ``max_test_instances`` rows of a
held-out task in table order are evaluated, the next ``max_pool_instances`` are its adaptation pool. Held-out
tasks come from a split column, from task-list files, or from a seeded rule stratified by category.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchmoe_cli.data.data_config import DataConfig
from orchmoe_cli.data.sni import SPLITS, Split, hash_file, pool_positions, sample_positions
from orchmoe_cli.data.sni_task import Instance, SNITask
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.paths import not_found_hint

if TYPE_CHECKING:
    import datasets

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
UNCATEGORISED = "uncategorized"


def table_files(path: Path) -> list[Path]:
    """The table files a source path names: the file itself, or those of a directory (one format)."""
    if path.is_file():
        return [path] if path.suffix.lower() in BUILDERS else []
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in BUILDERS)
    return []


def looks_like_hub_id(value: str) -> bool:
    """owner/name, not a path that exists here."""
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not Path(value).expanduser().exists() and not value.startswith(".")


@dataclass
class TableSource:
    """A table's tasks, split into training and held-out tasks; rows are read once, when first needed."""

    cfg: DataConfig
    files: list[Path]  # local files; empty for a hub dataset
    hub_id: str | None = None
    _grouped: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def description(self) -> str:
        if self.hub_id is not None:
            extra = "".join(f" {k}={v}" for k, v in (("config", self.cfg.hub_config), ("split", self.cfg.hub_split),
                                                     ("revision", self.cfg.revision)) if v)
            return f"hub dataset {self.hub_id}{extra}"
        return ", ".join(str(p.resolve()) for p in self.files)

    @property
    def origin(self) -> str:
        """What errors about the rows name."""
        return self.hub_id if self.hub_id is not None else (str(self.files[0]) if len(self.files) == 1
                                                            else str(self.files[0].parent))

    def split_origin(self, split: Split) -> str:
        return self.origin

    @property
    def tasks(self) -> dict[Split, tuple[str, ...]]:
        return self._load()["splits"]

    def manifest_source(self) -> dict[str, Any]:
        return {"description": self.description, "format": "table", "files": [str(p) for p in self.files],
                "hub_id": self.hub_id, "columns": dict(vars(self.cfg.columns)),
                "held_out_by": self._load()["held_out_by"]}

    def notes(self) -> list[str]:
        """What the reader decided that a user should hear: tasks whose rows disagree on the instruction."""
        mismatched = {name: task["mismatched"] for name, task in self._load()["tasks"].items() if task["mismatched"]}
        if not mismatched:
            return []
        shown = ", ".join(f"{name} ({n})" for name, n in list(mismatched.items())[:3])
        return [f"{len(mismatched)} task(s) have rows whose instruction differs from the task's first one, which is "
                f"used for all of them ({sum(mismatched.values())} rows): {shown}"]

    def hash_into(self, digest: Any) -> None:
        """The table settings, the bytes of every file (or the hub dataset's fingerprint) and of the task lists.
        With the seed (hashed with the encoding settings) these decide the held-out tasks, so a local table is
        keyed without reading its rows: ``train`` finds the prepared data without grouping the table again."""
        cfg = self.cfg
        settings = {"columns": vars(cfg.columns), "values": [cfg.train_value, cfg.test_value],
                    "heldout": cfg.heldout_tasks, "hub": [cfg.hub_config, cfg.hub_split, cfg.revision]}
        digest.update(json.dumps(settings, sort_keys=True, allow_nan=False).encode())
        for path in self.files:
            hash_file(digest, f"table:{path.name}", path)
        if cfg.split_dir is not None:  # used when the table has no split column; a missing list is an error then
            for split in SPLITS:
                path = _list_path(cfg, split)
                if path.is_file():
                    hash_file(digest, f"{split} list", path)
                else:
                    digest.update(f"\0{split} list: none\0".encode())
        if self.hub_id is not None:
            digest.update(f"\0hub:{self.hub_id}\0{self._load()['fingerprint']}\0".encode())

    def read_split(self, split: Split, cfg: DataConfig) -> Iterator[tuple[SNITask, list[Instance]]]:
        """The split's tasks in table order, capped as SNI tasks are, each with its adaptation pool."""
        loaded = self._load()
        for name in loaded["splits"][split]:
            n = len(loaded["tasks"][name]["rows"])  # only the kept rows become instances (most of a task's are not)
            yield (_task(loaded, name, self.origin, sample_positions(n, split, cfg)),
                   _instances(loaded, name, self.origin, pool_positions(n, split, cfg)))

    # ------------------------------------------------------------------ reading

    def _load(self) -> dict[str, Any]:
        if self._grouped is None:
            table = self._read()
            self._grouped = _group(table, self.cfg, self.origin)
            self._grouped["splits"], self._grouped["held_out_by"] = _held_out(self._grouped, self.cfg, self.origin)
            self._grouped["fingerprint"] = getattr(table, "_fingerprint", "")
        return self._grouped

    def _read(self) -> datasets.Dataset:
        import datasets

        cache = str(Path(self.cfg.cache_dir).expanduser() / "tables")
        with quiet_datasets():
            try:
                if self.hub_id is not None:
                    return datasets.load_dataset(self.hub_id, name=self.cfg.hub_config, revision=self.cfg.revision,
                                                 split=self.cfg.hub_split, cache_dir=cache)
                builders = {BUILDERS[p.suffix.lower()] for p in self.files}
                if len(builders) > 1:
                    kinds = ", ".join(sorted(builders))
                    raise OrchmoeError(f"{self.origin}: holds tables of several formats ({kinds}); keep one format "
                                       "per directory", field="data.source")
                builder = builders.pop()
                options = {"delimiter": "\t"} if all(p.suffix.lower() == ".tsv" for p in self.files) else {}
                return datasets.load_dataset(builder, data_files=[str(p) for p in self.files], split="train",
                                             cache_dir=cache, **options)
            except OrchmoeError:
                raise
            except Exception as exc:  # datasets wraps parser and network errors in many types: one line each
                cause = exc.__cause__ or exc.__context__ or exc
                text = " ".join(str(cause).split())[:300] or type(cause).__name__
                raise OrchmoeError(f"{self.origin}: cannot be read as a table ({type(cause).__name__}: {text})",
                                   field="data.source") from None


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


def _column(table: Any, name: str, origin: str, field_name: str, required: bool) -> list[Any] | None:
    if name in table.column_names:  # the whole column decoded at once: indexing a datasets Column per row is slow
        return table[name][:]
    if required:
        raise OrchmoeError(f"{origin}: no column '{name}' (columns: {', '.join(table.column_names)}); map yours with "
                           f"data.columns.{field_name}", field=f"data.columns.{field_name}")
    return None


def _text(value: Any, origin: str, row: int, what: str) -> str:
    """A cell that must hold text: a number is refused rather than turned into one (a CSV reader makes 0123 the
    number 123, and the answer would silently change)."""
    if not isinstance(value, str):
        kind = "empty" if value is None or (isinstance(value, float) and math.isnan(value)) else \
            f"a {type(value).__name__} ({value!r:.40})"
        raise OrchmoeError(f"{origin}: row {row}: {what} is {kind}, expected text (in a CSV, quote values that look "
                           "like numbers, or use JSONL)", field=f"data.columns.{what}")
    return value


def _references(value: Any, origin: str, row: int) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise OrchmoeError(f"{origin}: row {row}: output is an empty list", field="data.columns.output")
    return [_text(v, origin, row, "output") for v in values]


def _group(table: Any, cfg: DataConfig, origin: str) -> dict[str, Any]:
    """Rows grouped by task in table order, each row checked; task-level columns taken once per task."""
    columns = cfg.columns
    if len(table) == 0:
        raise OrchmoeError(f"{origin}: the table has no rows", field="data.source")
    names = _column(table, columns.task, origin, "task", True)
    inputs = _column(table, columns.input, origin, "input", True)
    outputs = _column(table, columns.output, origin, "output", True)
    ids = _column(table, columns.id, origin, "id", False)
    instructions = _column(table, columns.instruction, origin, "instruction", False)
    categories = _column(table, columns.category, origin, "category", False)
    splits = _column(table, columns.split, origin, "split", False)
    tasks: dict[str, dict[str, Any]] = {}
    for row, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise OrchmoeError(f"{origin}: row {row}: the task name is empty", field="data.columns.task")
        task = tasks.setdefault(name, {"rows": [], "instruction": "", "mismatched": 0, "category": None,
                                       "split": None, "ids": {}})
        position = len(task["rows"])
        text = _text(inputs[row], origin, row, "input")
        _references(outputs[row], origin, row)  # every row is checked now; instances are built when read
        identifier = (_text(ids[row], origin, row, "id") if ids is not None else
                      hashlib.sha256(f"{name}\0{text}\0{position}".encode()).hexdigest()[:16])
        if identifier in task["ids"]:
            raise OrchmoeError(f"{origin}: rows {task['ids'][identifier]} and {row}: task '{name}' has instance id "
                               f"'{identifier}' twice; ids must be unique within a task", field="data.columns.id")
        task["ids"][identifier] = row
        task["rows"].append(row)
        if instructions is not None and isinstance(instructions[row], str) and instructions[row].strip():
            if not task["instruction"]:
                task["instruction"] = instructions[row]
            elif instructions[row] != task["instruction"]:
                task["mismatched"] += 1
        if categories is not None and task["category"] is None and isinstance(categories[row], str) \
                and categories[row].strip():
            task["category"] = categories[row]
        if splits is not None:
            value = str(splits[row])
            if task["split"] is None:
                task["split"] = (value, row)
            elif task["split"][0] != value:
                raise OrchmoeError(f"{origin}: rows {task['split'][1]} and {row}: task '{name}' is in split "
                                   f"'{task['split'][0]}' and '{value}'; a task belongs to one split",
                                   field="data.columns.split")
    for task in tasks.values():  # the id of each row, in row order; the id index is not needed any more
        task["ids"] = list(task.pop("ids"))
    return {"tasks": tasks, "has_split": splits is not None, "has_categories": categories is not None,
            "inputs": inputs, "outputs": outputs}


def _instances(loaded: dict[str, Any], name: str, origin: str, positions: Iterable[int]) -> list[Instance]:
    """The instances at ``positions`` among task ``name``'s rows."""
    task, inputs, outputs = loaded["tasks"][name], loaded["inputs"], loaded["outputs"]
    rows, ids = task["rows"], task["ids"]
    return [Instance(ids[i], inputs[rows[i]], _references(outputs[rows[i]], origin, rows[i])) for i in positions]


def _task(loaded: dict[str, Any], name: str, origin: str, positions: Iterable[int]) -> SNITask:
    """Task ``name`` with the instances at ``positions``; ``n_available`` counts all its rows."""
    task = loaded["tasks"][name]
    return SNITask(name=name, path=Path(origin), categories=[task["category"] or UNCATEGORISED],
                   definition=[task["instruction"]] if task["instruction"] else [], positive_examples=[],
                   negative_examples=[], instances=_instances(loaded, name, origin, positions), languages={},
                   n_available=len(task["rows"]))


def _held_out(loaded: dict[str, Any], cfg: DataConfig, origin: str) -> tuple[dict[Split, tuple[str, ...]], str]:
    """(training and held-out task names in table order, how they were chosen)."""
    tasks: dict[str, dict[str, Any]] = loaded["tasks"]
    names = list(tasks)
    if loaded["has_split"]:
        values = {cfg.train_value: "train", cfg.test_value: "test"}
        unknown = sorted({t["split"][0] for t in tasks.values()} - set(values))
        if unknown:
            raise OrchmoeError(f"{origin}: split value(s) {', '.join(map(repr, unknown))} are neither "
                               f"'{cfg.train_value}' nor '{cfg.test_value}'; set data.train_value / data.test_value",
                               field="data.columns.split")
        chosen = {split: tuple(n for n in names if values[tasks[n]["split"][0]] == split) for split in SPLITS}
        how = f"split column '{cfg.columns.split}'"
    elif cfg.split_dir is not None:
        chosen = {split: _listed(cfg, split, names) for split in SPLITS}
        how = f"task lists in {cfg.split_dir}"
    elif cfg.heldout_tasks is not None:
        chosen, how = _stratified(tasks, cfg), f"data.heldout_tasks {cfg.heldout_tasks:g} (seed {cfg.seed})"
    else:
        raise OrchmoeError("a table needs held-out tasks: a split column (data.columns.split), task lists "
                           "(data.split_dir with data.train_split / data.test_split), or data.heldout_tasks",
                           field="data.heldout_tasks")
    for split in SPLITS:
        if not chosen[split]:
            raise OrchmoeError(f"{origin}: no {'training' if split == 'train' else 'held-out'} task ({how})",
                               field="data.heldout_tasks")
    return chosen, how


def _list_path(cfg: DataConfig, split: Split) -> Path:
    """The task-list file of ``split`` under ``data.split_dir``."""
    return Path(cfg.split_dir or ".") / (cfg.train_split if split == "train" else cfg.test_split)


def _listed(cfg: DataConfig, split: Split, names: list[str]) -> tuple[str, ...]:
    path = _list_path(cfg, split)
    if not path.is_file():
        raise OrchmoeError(f"'{path}' not found{not_found_hint(path, Path.is_file)}; list the {split} tasks there, one "
                           "per line", field="data.split_dir")
    listed = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    missing = [name for name in listed if name not in names]
    if missing:
        raise OrchmoeError(f"{path}: task '{missing[0]}' has no rows in the table ({len(missing)} listed task(s) "
                           "missing)")
    return tuple(n for n in names if n in set(listed))


def _stratified(tasks: dict[str, dict[str, Any]], cfg: DataConfig) -> dict[Split, tuple[str, ...]]:
    """Hold out a share (or count) of the tasks, spread over categories in proportion, with ``cfg.seed``."""
    by_category: dict[str, list[str]] = {}
    for name, task in tasks.items():
        by_category.setdefault(task["category"] or UNCATEGORISED, []).append(name)
    share = cfg.heldout_tasks or 0.0
    total = round(share * len(tasks)) if share < 1 else int(share)
    total = min(max(total, 1), len(tasks) - 1)
    rng = random.Random(cfg.seed)
    # largest-remainder apportionment of the held-out count over categories
    quotas = {c: total * len(members) / len(tasks) for c, members in sorted(by_category.items())}
    counts = {c: int(q) for c, q in quotas.items()}
    for c in sorted(quotas, key=lambda c: (counts[c] - quotas[c], c))[: total - sum(counts.values())]:
        counts[c] += 1
    held = set()
    for category, members in sorted(by_category.items()):
        held.update(rng.sample(sorted(members), counts[category]))
    return {"train": tuple(n for n in tasks if n not in held), "test": tuple(n for n in tasks if n in held)}


def export_table(layout: Any, path: Path) -> int:
    """Write an SNI source's tasks as one table (``.jsonl`` or ``.parquet``): a row per instance, every instance in
    file order, with task, id, instruction (the definition), category, split, input and output (the references).
    Returns the number of rows. Demonstrations are not part of a table; prompts built from it equal the SNI
    ones without demonstrations (``data.num_pos_examples: 0``)."""
    import datasets

    from orchmoe_cli.data.sni_task import read_task

    if path.suffix.lower() not in (".jsonl", ".parquet"):
        raise OrchmoeError(f"{path}: the table is written as .jsonl or .parquet")
    rows = []
    for split in SPLITS:
        for name in layout.tasks[split]:
            task = read_task(layout.task_path(name))
            definition = task.definition[0] if task.definition else ""
            rows += [{"task": name, "id": i.id, "instruction": definition, "category": task.category, "split": split,
                      "input": i.input, "output": list(i.output)} for i in task.instances]
    path.parent.mkdir(parents=True, exist_ok=True)
    table = datasets.Dataset.from_list(rows)
    with quiet_datasets():
        if path.suffix.lower() == ".parquet":
            table.to_parquet(str(path))
        else:
            table.to_json(str(path), lines=True, force_ascii=False)
    return len(rows)
