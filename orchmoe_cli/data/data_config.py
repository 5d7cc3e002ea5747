"""The `data` section of a recipe: where the tasks are (SNI task files or a table) and how prompts are built."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Literal

from orchmoe_cli.errors import FieldError
from orchmoe_cli.schema import help_field as _f

TEMPLATE_FIELDS = ("instruction", "input", "task", "category")


@dataclass
class ColumnMap:
    """Which columns of a table hold what (table sources only)."""

    task: str = _f("task", "column naming each row's task (required)")
    input: str = _f("input", "column with the instance input (required)")
    output: str = _f("output", "column with the reference answer: a string or a list of acceptable references "
                     "(required)")
    instruction: str | None = _f("instruction", "column with the task's instruction (the SNI definition), per row or "
                                 "per task: the first non-empty one of a task is used; optional (null: none)")
    category: str | None = _f("category", "column with the task's category (grouped metrics, inspect-routing); "
                              "optional (null: none)")
    id: str | None = _f("id", "column with an instance id, unique within its task; optional (a stable id is made from "
                        "task, input and position; null: always made)")
    split: str | None = _f("split", "column saying whether a row's task is held out (see train_value / test_value); "
                           "optional (null: held-out tasks from task lists or heldout_tasks)")

    def __post_init__(self) -> None:
        """The task, the input and the output are three columns: one named twice would feed the answer back as the
        input, or the like. (An optional role may read a required one's column: a category that is the task.)"""
        seen: dict[str, str] = {}
        for role, column in vars(self).items():
            if column is not None and not column.strip():
                raise FieldError(role, "names no column (null: none)")
            if column in seen and (role in ("input", "output") or column != getattr(ColumnMap, role)):
                raise FieldError(role, f"column '{column}' is already data.columns.{seen[column]}; the task, input "
                                       "and output are three columns, and an optional role reads another")
            if role in ("task", "input", "output"):
                seen[column] = role


@dataclass
class DataConfig:
    source: str = _f("bundled", "'bundled' (the SNI sample shipped with orchmoe); a directory in the upstream SNI "
                     "layout (task files in <dir>/tasks or <dir>, split files in <dir> or <dir>/splits/default); a "
                     "table: a .jsonl / .json / .csv / .tsv / .parquet file, a directory of them, or a Hugging Face "
                     "dataset id (owner/name); ~ and $VAR / ${VAR} are expanded", path="location")
    format: Literal["auto", "sni", "table"] = _f("auto", "sni or table; auto: a directory with tasks/*.json or split "
                                                 "files is SNI, table files or a hub id are a table")
    columns: ColumnMap = field(default_factory=ColumnMap, metadata={"help": "table sources: the column map"})
    train_value: str = _f("train", "table with a split column: the value of training tasks' rows")
    test_value: str = _f("test", "table with a split column: the value of held-out tasks' rows")
    heldout_tasks: float | None = _f(None, "table without a split column or task lists: hold out this share of "
                                     "the tasks (below 1) or this many (1 or more), chosen with `seed` within each "
                                     "category", min=0, min_exclusive=True)
    hub_config: str | None = _f(None, "hub table: the dataset configuration (name) to load")
    hub_split: str = _f("train", "hub table: the split to read rows from")
    revision: str | None = _f(None, "hub table: the revision (branch, tag or commit) to load")
    split_dir: str | None = _f(None, "directory holding the split files, if not found from `source` (~ and $VAR "
                               "expanded)", path="input")
    train_split: str = _f("train_tasks.txt", "file in the split directory listing training tasks, one per line",
                          path="input")
    test_split: str = _f("test_tasks.txt", "file in the split directory listing held-out tasks, one per line",
                         path="input")
    languages: list[str] = _f(["English"], "SNI sources: keep tasks whose input, output and instruction languages "
                              "are all listed (a table's rows carry no languages)")
    max_train_instances: int = _f(100, "training instances per task (random sample with `seed`, as Tk-Instruct)", min=1)
    max_test_instances: int = _f(100, "test instances per task: the first N, as the official evaluation", min=1)
    max_pool_instances: int = _f(300, "held-out tasks: instances after the evaluation ones kept as an adaptation "
                                 "pool for few-shot training and validation, never mixed with evaluation rows "
                                 "(0 = none)", min=0)
    seed: int = _f(42, "seed of the training-instance sample", min=0)
    add_task_name: bool = _f(False, "prefix the prompt with the task name (Tk-Instruct: off)")
    add_definition: bool = _f(True, "include the task definition in the prompt")
    num_pos_examples: int = _f(2, "positive demonstrations in the prompt (official setting: 2)", min=0)
    num_neg_examples: int = _f(0, "negative demonstrations in the prompt", min=0)
    add_explanation: bool = _f(False, "include the demonstrations' explanations")
    template: str | None = _f(None, "a prompt of your own instead of the Tk-Instruct encoding: a format string over "
                              "{instruction}, {input}, {task} and {category}, e.g. '{instruction}\\n\\n{input}\\n"
                              "Answer: ' (no demonstrations; too long prompts lose their start)")
    chat_template: bool = _f(False, "decoder-only instruct models: wrap each prompt as a user message in the "
                             "tokenizer's chat template, the answer following its assistant turn")
    max_source_length: int = _f(1024, "prompt length limit in tokens; demonstrations that do not fit are dropped", min=8)
    max_target_length: int = _f(128, "target length limit in tokens", min=1)
    cache_dir: str = _f(".orchmoe/prepared", "where prepared (encoded) datasets are cached, keyed by a content hash",
                        path="dir")

    def __post_init__(self) -> None:
        if self.template is not None:
            try:
                names = {name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None}
            except ValueError as exc:
                raise FieldError("template", f"not a format string ({exc})") from None
            unknown = sorted(names - set(TEMPLATE_FIELDS))
            if unknown:
                raise FieldError("template", f"{{{unknown[0]}}} is not one of {', '.join(TEMPLATE_FIELDS)}")
        share = self.heldout_tasks
        if share is not None and share >= 1 and share != int(share):
            raise FieldError("heldout_tasks", f"a count of tasks must be whole, got {self.heldout_tasks}")
