"""The `data` section of a recipe: where the task files are and how prompts are built from them."""

from __future__ import annotations

from dataclasses import dataclass

from orchmoe_cli.schema import help_field as _f


@dataclass
class DataConfig:
    source: str = _f("bundled", "'bundled' (the SNI sample shipped with orchmoe) or a directory in the upstream "
                     "layout: task files in <dir>/tasks (or <dir>), split files in <dir> or <dir>/splits/default; "
                     "~ and $VAR / ${VAR} are expanded (recipes/sni use ${ORCHMOE_SNI_DIR})")
    split_dir: str | None = _f(None, "directory holding the split files, if not found from `source` (~ and $VAR "
                               "expanded)")
    train_split: str = _f("train_tasks.txt", "file in the split directory listing training tasks, one per line")
    test_split: str = _f("test_tasks.txt", "file in the split directory listing held-out tasks, one per line")
    languages: list[str] = _f(["English"], "keep tasks whose input, output and instruction languages are all listed")
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
    max_source_length: int = _f(1024, "prompt length limit in tokens; demonstrations that do not fit are dropped", min=8)
    max_target_length: int = _f(128, "target length limit in tokens", min=1)
    cache_dir: str = _f(".orchmoe/prepared", "where prepared (encoded) datasets are cached, keyed by a content hash")
