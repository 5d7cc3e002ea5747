"""Multi-task tables as a task source: JSONL / JSON / CSV / TSV / Parquet files or a Hugging Face dataset, read
with 🤗 ``datasets``, one row per instance, a column naming its task.

Rows become the same tasks the SNI reader yields (a task's instruction is its definition, it has no
demonstrations), so encoding, caching, sampling and pools are shared: the first ``max_test_instances`` rows of a
held-out task in table order are evaluated, the next ``max_pool_instances`` are its adaptation pool. Held-out
tasks come from a split column, from task-list files, or from a seeded rule stratified by category.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchmoe_cli.data.data_config import DataConfig
from orchmoe_cli.data.sni import (SPLITS, Split, given_split_dir, hash_file, pool_positions, read_split_lists,
                                  sample_positions)
from orchmoe_cli.data.sni_task import Instance, SNITask, label_clash
from orchmoe_cli.data.table_files import TablePart, check_table_name, read_parts, table_folders_below, write_table
from orchmoe_cli.errors import OrchmoeError, did_you_mean
from orchmoe_cli.paths import listing

UNCATEGORISED = "uncategorized"


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
        """What the reader decided that a user should hear: tasks whose rows disagree on the instruction, tasks
        neither task list names, tables in subfolders (not read)."""
        loaded, notes = self._load(), []
        mismatched = {name: task["mismatched"] for name, task in loaded["tasks"].items() if task["mismatched"]}
        if mismatched:
            shown = ", ".join(f"{name} ({n})" for name, n in list(mismatched.items())[:3])
            notes.append(f"{len(mismatched)} task(s) have rows whose instruction differs from the task's first one, "
                         f"which is used for all of them ({sum(mismatched.values())} rows): {shown}")
        recategorised = [name for name, task in loaded["tasks"].items() if task["other_categories"]]
        if recategorised:
            notes.append(f"{len(recategorised)} task(s) have rows of another category than the task's first row, "
                         f"whose category is used: {listing(recategorised)}")
        if loaded.get("unlisted"):
            notes.append(f"{len(loaded['unlisted'])} task(s) of the table are in neither task list and are left out: "
                         f"{listing(loaded['unlisted'])}")
        source = Path(self.cfg.source)
        below = table_folders_below(source) if source.is_dir() else []
        if below:
            notes.append(f"tables in subfolders are not read: {listing(sorted(map(str, below)))}")
        return notes

    def hash_into(self, digest: Any) -> None:
        """The table settings, the bytes of every file (or the hub dataset's fingerprint) and of the task lists.
        With the seed (hashed with the encoding settings) these decide the held-out tasks, so a local table is
        keyed without reading its rows: ``train`` finds the prepared data without grouping the table again."""
        cfg = self.cfg
        settings = {"reader": 2, "columns": vars(cfg.columns), "values": [cfg.train_value, cfg.test_value],
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
                   _instances(loaded, name, pool_positions(n, split, cfg)))

    # ------------------------------------------------------------------ reading

    def _load(self) -> dict[str, Any]:
        if self._grouped is None:
            parts = read_parts(self.cfg, self.files, self.hub_id)
            self._grouped = _group(parts, self.cfg)
            clash = label_clash((name, task["category"] or UNCATEGORISED)
                                for name, task in self._grouped["tasks"].items())
            if clash:  # checked here too, before any row is encoded
                raise OrchmoeError(f"{self.origin}: {clash}; rename one", field="data.columns.task")
            self._grouped["splits"], self._grouped["held_out_by"] = _held_out(self._grouped, self.cfg, self.origin)
            self._grouped["fingerprint"] = parts[0].fingerprint
        return self._grouped


def _text(value: Any, at: _Rows, row: int, what: str) -> str:
    """A cell that must hold text, not blank: a number is refused rather than turned into one (the answer would
    change), and an empty input or answer would be scored as if it were one."""
    if not isinstance(value, str) or not value.strip():
        kind = "empty" if value is None or (isinstance(value, float) and math.isnan(value)) or \
            isinstance(value, str) else f"a {type(value).__name__} ({value!r:.40})"
        raise OrchmoeError(f"{at.where(row)}: {what} is {kind}, expected text (in JSON, write it as a string)",
                           field=f"data.columns.{what}")
    return value


def _optional_text(values: list[Any] | None, at: _Rows, row: int, what: str) -> str | None:
    """An optional cell: missing or blank is None; text, or a list of one text (SNI's ``Definition``) is used;
    anything else is refused (a number or a longer list would be dropped without a word)."""
    value = None if values is None else values[row]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, float) and math.isnan(value):  # Parquet's and JSON's missing number
        value = None
    if value is None or isinstance(value, str):
        return value if value and value.strip() else None
    return _text(value, at, row, what)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


class _Rows:
    """The parts' rows in order, one index over them; ``where`` names a row's file and line for messages."""

    def __init__(self, parts: list[TablePart]):
        self.parts = parts
        self.starts = [sum(part.n_rows for part in parts[:i]) for i in range(len(parts))]

    def where(self, row: int, *, first: int | None = None) -> str:
        """``file: line N``; with ``first``, an earlier row of the same problem: ``file: lines M and N``."""
        index = bisect.bisect_right(self.starts, row) - 1
        here = self.parts[index].where(row - self.starts[index])
        if first is None:
            return here
        there = self.where(first)
        origin, _, place = there.rpartition(": ")
        if here.startswith(f"{origin}: "):
            kind, _, number = place.partition(" ")
            return f"{origin}: {kind}s {number} and {here.rpartition(' ')[2]}"
        return f"{there} and {here}"

    def column(self, role: str) -> list[Any] | None:
        """``role``'s values over every part; None when no part has the column. A file without an instruction or
        category column has none for its rows; ids and splits decide which rows are which, so every file has them
        or none does."""
        having = [part.columns[role] is not None for part in self.parts]
        if not any(having):
            return None
        if not all(having) and role in ("id", "split"):
            lacking, other = self.parts[having.index(False)], self.parts[having.index(True)]
            raise OrchmoeError(f"{lacking.origin}: no column '{role}', which {other.origin} has; give every file of "
                               "the source the same columns", field=f"data.columns.{role}")
        return [value for part in self.parts for value in (part.columns[role] or [None] * part.n_rows)]


def _task_name(name: Any, at: _Rows, row: int, folded: dict[str, str]) -> str:
    """A task name is one label: text, not blank, no spaces around it, not another name in other case."""
    if not isinstance(name, str):
        _text(name, at, row, "task")
    if not name.strip():
        raise OrchmoeError(f"{at.where(row)}: the task name is empty", field="data.columns.task")
    if name != name.strip():
        raise OrchmoeError(f"{at.where(row)}: the task name {name!r} has spaces around it", field="data.columns.task")
    other = folded.setdefault(name.casefold(), name)
    if other != name:
        raise OrchmoeError(f"{at.where(row)}: tasks '{other}' and '{name}' differ only in case; name one task one way",
                           field="data.columns.task")
    return name


def _group(parts: list[TablePart], cfg: DataConfig) -> dict[str, Any]:
    """Rows of every part grouped by task in table order, each row checked; task-level columns taken once per
    task. Row indices run over the parts in order."""
    at = _Rows(parts)
    names, inputs, outputs, ids, instructions, categories, splits = (
        at.column(role) for role in ("task", "input", "output", "id", "instruction", "category", "split"))
    tasks: dict[str, dict[str, Any]] = {}
    folded: dict[str, str] = {}
    for row, name in enumerate(names or []):
        if not (isinstance(name, str) and name in tasks):
            _task_name(name, at, row, folded)
        task = tasks.setdefault(name, {"rows": [], "instruction": "", "mismatched": 0, "category": None,
                                       "other_categories": 0, "split": None, "ids": {}})
        position = len(task["rows"])
        text = _text(inputs[row], at, row, "input")  # type: ignore[index]
        references = _as_list(outputs[row])  # type: ignore[index]
        if not references:
            raise OrchmoeError(f"{at.where(row)}: output is an empty list", field="data.columns.output")
        for reference in references:  # every row is checked now; instances are built when read
            _text(reference, at, row, "output")
        if ids is None:
            identifier = hashlib.sha256(f"{name}\0{text}\0{position}".encode()).hexdigest()[:16]
        else:
            identifier = _text(ids[row], at, row, "id")
        if identifier in task["ids"]:
            raise OrchmoeError(f"{at.where(row, first=task['ids'][identifier])}: task '{name}' has instance "
                               f"id '{identifier}' twice; ids must be unique within a task", field="data.columns.id")
        task["ids"][identifier] = row
        task["rows"].append(row)
        instruction = _optional_text(instructions, at, row, "instruction")
        if instruction:
            if not task["instruction"]:
                task["instruction"] = instruction
            elif instruction != task["instruction"]:
                task["mismatched"] += 1
        category = _optional_text(categories, at, row, "category")
        if category and task["category"] is None:
            task["category"] = category
        elif category and category != task["category"]:
            task["other_categories"] += 1
        if splits is not None:  # an integer or a boolean names a split as well as text does (Parquet's 0 / 1)
            value = str(splits[row]) if isinstance(splits[row], int) else _text(splits[row], at, row, "split")
            if task["split"] is None:
                task["split"] = (value, row)
            elif task["split"][0] != value:
                raise OrchmoeError(f"{at.where(row, first=task['split'][1])}: task '{name}' is in split "
                                   f"'{task['split'][0]}' and '{value}'; a task belongs to one split",
                                   field="data.columns.split")
    for task in tasks.values():  # the id of each row, in row order; the id index is not needed any more
        task["ids"] = list(task.pop("ids"))
    return {"tasks": tasks, "has_split": splits is not None, "has_categories": categories is not None,
            "inputs": inputs, "outputs": outputs}


def _instances(loaded: dict[str, Any], name: str, positions: Iterable[int]) -> list[Instance]:
    """The instances at ``positions`` among task ``name``'s rows (checked when the rows were grouped)."""
    task, inputs, outputs = loaded["tasks"][name], loaded["inputs"], loaded["outputs"]
    rows, ids = task["rows"], task["ids"]
    return [Instance(ids[i], inputs[rows[i]], list(_as_list(outputs[rows[i]]))) for i in positions]


def _task(loaded: dict[str, Any], name: str, origin: str, positions: Iterable[int]) -> SNITask:
    """Task ``name`` with the instances at ``positions``; ``n_available`` counts all its rows."""
    task = loaded["tasks"][name]
    return SNITask(name=name, path=Path(origin), categories=[task["category"] or UNCATEGORISED],
                   definition=[task["instruction"]] if task["instruction"] else [], positive_examples=[],
                   negative_examples=[], instances=_instances(loaded, name, positions), languages={},
                   n_available=len(task["rows"]))


def _held_out(loaded: dict[str, Any], cfg: DataConfig, origin: str) -> tuple[dict[Split, tuple[str, ...]], str]:
    """(training and held-out task names in table order, how they were chosen)."""
    tasks: dict[str, dict[str, Any]] = loaded["tasks"]
    names = list(tasks)
    if loaded["has_split"]:
        given = "data.split_dir" if cfg.split_dir is not None else \
            "data.heldout_tasks" if cfg.heldout_tasks is not None else None
        if given is not None:  # two answers to which tasks are held out: one would be ignored without a word
            raise OrchmoeError(f"{origin}: the split column '{cfg.columns.split}' already says which tasks are held "
                               f"out; remove {given}, or the column", field=given)
        values = {cfg.train_value: "train", cfg.test_value: "test"}
        unknown = sorted({t["split"][0] for t in tasks.values()} - set(values))
        if unknown:
            raise OrchmoeError(f"{origin}: split value(s) {', '.join(map(repr, unknown))} are neither "
                               f"'{cfg.train_value}' nor '{cfg.test_value}'; set data.train_value / data.test_value",
                               field="data.columns.split")
        chosen = {split: tuple(n for n in names if values[tasks[n]["split"][0]] == split) for split in SPLITS}
        how = f"split column '{cfg.columns.split}'"
    elif cfg.split_dir is not None:
        if cfg.heldout_tasks is not None:
            raise OrchmoeError(f"task lists in {cfg.split_dir} already say which tasks are held out; remove "
                               "data.heldout_tasks, or data.split_dir", field="data.heldout_tasks")
        chosen, how = _listed(cfg, names), f"task lists in {cfg.split_dir}"
        unlisted = [n for n in names if n not in chosen["train"] and n not in chosen["test"]]
        if unlisted:  # said, not dropped in silence
            loaded["unlisted"] = unlisted
    elif cfg.heldout_tasks is not None:
        chosen, how = _stratified(tasks, cfg, origin), f"data.heldout_tasks {cfg.heldout_tasks:g} (seed {cfg.seed})"
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


def _listed(cfg: DataConfig, names: list[str]) -> dict[Split, tuple[str, ...]]:
    """The tasks the lists under ``data.split_dir`` name, in table order, checked as SNI's split files are."""
    given_split_dir(cfg)
    present = set(names)
    listed = read_split_lists({split: _list_path(cfg, split) for split in SPLITS},
                              lambda name: None if name in present else
                              f"has no rows in the table{did_you_mean(name, names)}; fix the name")
    return {split: tuple(n for n in names if n in set(listed[split])) for split in SPLITS}


def _stratified(tasks: dict[str, dict[str, Any]], cfg: DataConfig, origin: str) -> dict[Split, tuple[str, ...]]:
    """Hold out a share (or count) of the tasks, spread over categories in proportion, with ``cfg.seed``."""
    by_category: dict[str, list[str]] = {}
    for name, task in tasks.items():
        by_category.setdefault(task["category"] or UNCATEGORISED, []).append(name)
    share = cfg.heldout_tasks or 0.0
    if share >= len(tasks):
        raise OrchmoeError(f"{origin}: holds out {share:g} tasks of the table's {len(tasks)}; at most "
                           f"{len(tasks) - 1} (or a share below 1)", field="data.heldout_tasks")
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
    from orchmoe_cli.data.sni_task import read_task

    check_table_name(path)
    rows = []
    for split in SPLITS:
        for name in layout.tasks[split]:
            task = read_task(layout.task_path(name))
            definition = task.definition[0] if task.definition else ""
            rows += [{"task": name, "id": i.id, "instruction": definition, "category": task.category, "split": split,
                      "input": i.input, "output": list(i.output)} for i in task.instances]
    write_table(rows, path)
    return len(rows)
