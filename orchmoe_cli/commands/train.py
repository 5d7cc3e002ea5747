"""`orchmoe train`: multi-task adapter training on the recipe's training tasks.

Prepare the data, build the adapted model, hand both to :func:`orchmoe_cli.core.fit.fit` (the loop shared
with few-shot adaptation). The model's task names are the training tasks in split order; they are
saved with every checkpoint and are the only map from task name to routing index.
"""

from __future__ import annotations

from itertools import zip_longest
from pathlib import Path
from typing import Any

from rich.console import Console

from orchmoe_cli.adapters import AdaptedModel, attach_adapters, load_adapted
from orchmoe_cli.adapters.registry import SPECS, spec_of
from orchmoe_cli.core.base_models import load_model
from orchmoe_cli.core.checkpoint import find_checkpoint
from orchmoe_cli.core.fit import FitOutcome, fit, make_accelerator, preflight
from orchmoe_cli.core.recipe_data import prepare_data
from orchmoe_cli.data.collate import pad_token_id
from orchmoe_cli.data.rows import TaskRows
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.recipe import Recipe, dump_recipe


def training_rows(rows: TaskRows, val_instances: int) -> tuple[TaskRows, TaskRows | None]:
    """(training rows, validation rows): the first ``train.val_instances`` rows of every task are held out."""
    if val_instances == 0:
        return rows, None
    train_rows, val_rows = rows.hold_out_first(val_instances)
    counts = rows.task_counts()
    emptied = [task for task, n in counts.items() if n <= val_instances]
    if emptied:
        raise OrchmoeError(f"{val_instances} held out per task leaves no training rows for {len(emptied)} task(s), "
                           f"e.g. {emptied[0]} ({counts[emptied[0]]} instances); use a value below "
                           f"{min(counts.values())}", field="train.val_instances")
    return train_rows, val_rows


def _start_from(base: Any, recipe: Recipe, task_names: list[str]) -> AdaptedModel:
    """``train.init_from``: the checkpoint's adapters (its rank and routing), averaged for the µ variants."""
    field = "train.init_from"
    model = load_adapted(base, find_checkpoint(Path(recipe.train.init_from), field))
    wanted, saved = recipe.method.name, model.method.name
    averages = spec_of(wanted).average_of == saved  # e.g. mhr_mu starting from a trained mhr
    if saved != wanted and not averages:
        variants = [name for name, spec in SPECS.items() if spec.average_of == saved]
        also = f" (or {' / '.join(variants)} to average the {saved} checkpoint first)" if variants else ""
        raise OrchmoeError(f"the checkpoint is {saved}, method.name is {wanted}; use {saved}{also}",
                           field=field)
    if model.task_names != task_names:
        first = next((a, b) for a, b in zip_longest(model.task_names, task_names) if a != b)
        raise OrchmoeError(f"the checkpoint was trained on other tasks (first difference: {first[0]} against "
                           f"{first[1]} of the prepared data)", field=field)
    if wanted != saved and not model.averaged:
        model.to_average()
    return model


def train(recipe: Recipe, console: Console, resume: bool = False) -> FitOutcome:
    cfg = recipe.train
    if recipe.method.name == "none":
        raise OrchmoeError("'none' has nothing to train; pick lora, poly, mhr, orchmoe, ...", field="method.name")
    preflight(cfg, Path(recipe.output.dir), resume)  # before data, model or any file
    accelerator = make_accelerator(cfg, spec_of(recipe.method.name), Path(recipe.output.dir),
                                   half_base=recipe.model.dtype == "float16")
    console = console if accelerator.is_main_process else Console(quiet=True)
    with accelerator.main_process_first():
        prepared = prepare_data(recipe, console)
    task_names = [t["name"] for t in prepared.manifest["tasks"] if t["split"] == "train"]
    train_rows, val_rows = training_rows(TaskRows(prepared.dataset["train"]), cfg.val_instances)

    loaded = load_model(recipe.model)
    if cfg.init_from is None:
        model = attach_adapters(loaded.model, recipe.method, task_names)
    else:
        model = _start_from(loaded.model, recipe, task_names)
    counts = model.count_parameters()
    console.print(
        f"[bold]{recipe.method.name}[/bold] on {recipe.model.name}: {counts['total_trainable']:,} trainable "
        f"({', '.join(f'{k} {v:,}' for k, v in counts.items() if k not in ('total_trainable', 'base') and v)}; "
        f"rank {model.method.rank}, scale alpha/r {model.lora_scale:g}), "
        f"{len(model.task_names)} tasks, {len(train_rows)} training rows, {accelerator.num_processes} process(es) "
        f"on {accelerator.device}"
    )
    return fit(model, train_rows, cfg, Path(recipe.output.dir), accelerator, pad_id=pad_token_id(loaded.tokenizer),
               causal=not loaded.is_encoder_decoder, recipe_yaml=dump_recipe(recipe), console=console,
               val_rows=val_rows, resume=resume)
