"""`orchmoe eval`: the base model and/or a trained adapter generate on the recipe's split and are scored."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from rich.console import Console

from orchmoe_cli.core.base_models import load_model, on_device
from orchmoe_cli.core.checkpoint import find_checkpoint
from orchmoe_cli.core.evaluation import EvalOutcome, eval_output_dir, run_evaluation
from orchmoe_cli.core.recipe_data import prepare_data
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.paths import claim_directory
from orchmoe_cli.recipe import Recipe


def resolve_checkpoint(recipe: Recipe, recipe_path: str = "RECIPE") -> Path | None:
    """``eval.checkpoint``: none (the base model), ``latest`` (newest checkpoint of ``output.dir``),
    an adapter directory, or a run directory (its newest complete checkpoint). Verified when it has a manifest.
    ``recipe_path`` (the recipe's file) goes into the "orchmoe train" hint when there is none."""
    value = recipe.eval.checkpoint
    if value is None or value.strip().lower() in ("none", "null", ""):
        return None
    path = Path(recipe.output.dir) if value == "latest" else Path(value)
    return find_checkpoint(path, "eval.checkpoint", f"orchmoe train {recipe_path}")


def _load_checkpoint(base: Any, checkpoint: Path, recipe: Recipe, recipe_path: str,
                     attempts: int = 3) -> tuple[Any, Path]:
    """Load the adapter; when ``eval.checkpoint`` names a run that a training run is pruning meanwhile, the
    checkpoint found a moment ago may be gone: look for the newest one again instead of failing."""
    from orchmoe_cli.adapters import load_adapted

    for _ in range(attempts - 1):
        try:
            return load_adapted(base, checkpoint), checkpoint
        except OrchmoeError:
            if checkpoint.is_dir():
                raise
            newer = resolve_checkpoint(recipe, recipe_path)
            if newer is None or newer == checkpoint:
                raise
            checkpoint = newer
    return load_adapted(base, checkpoint), checkpoint


def evaluate(recipe: Recipe, recipe_path: str, console: Console, with_base: bool = False) -> list[EvalOutcome]:
    """Evaluate the base model and/or the adapter named by ``eval.checkpoint`` on the recipe's split.

    With ``with_base`` the base model is evaluated first (its results are reused when an identical
    evaluation already exists), then the adapter is attached to the same loaded model. Under
    ``accelerate launch`` each process generates its share and the main process writes the results.
    ``recipe_path`` is the recipe's file, named where a command line is suggested.
    """
    checkpoint = resolve_checkpoint(recipe, recipe_path)
    if with_base and checkpoint is None:
        raise OrchmoeError(f"{recipe_path}: --with-base compares the base model with an adapter: set eval.checkpoint "
                           "(e.g. eval.checkpoint=latest)")
    runs = [None, checkpoint] if with_base and checkpoint is not None else [checkpoint]
    for run in runs:  # each result directory is eval's own (new, or an earlier evaluation), checked before loading
        named = dataclasses.replace(recipe, eval=dataclasses.replace(recipe.eval, checkpoint=run and str(run)))
        claim_directory(eval_output_dir(named), "eval.output_dir", "eval")
    state = PartialState(cpu=not torch.cuda.is_available())  # under accelerate launch: one shard per process
    if not state.is_main_process:
        console = Console(quiet=True)
    with state.main_process_first():
        prepared = prepare_data(recipe, console)
    loaded = load_model(recipe.model)
    device = state.device
    model = on_device(loaded.model, device)
    split = prepared.dataset[recipe.eval.split]
    outcomes = []
    for run in runs:
        run_recipe = dataclasses.replace(recipe, eval=dataclasses.replace(recipe.eval, checkpoint=run and str(run)))
        task_index = None
        if run is not None:
            model, run = _load_checkpoint(loaded.model, run, recipe, recipe_path)
            model = on_device(model, device)
            run_recipe = dataclasses.replace(run_recipe, eval=dataclasses.replace(recipe.eval, checkpoint=str(run)))
            task_index = model.task_index
            if recipe.method.name not in ("none", model.method.name):
                console.print(f"[yellow]warning:[/yellow] {run} holds a {model.method.name} adapter; the recipe's "
                              f"method section ({recipe.method.name}) is not used and its results record "
                              f"{model.method.name}", highlight=False)
            run_recipe = dataclasses.replace(run_recipe, method=model.method)
        model.eval()
        outcomes.append(run_evaluation(run_recipe, model, loaded.tokenizer, loaded.is_encoder_decoder, split,
                                       prepared.manifest["content_hash"], console, task_index))
    return outcomes if state.is_main_process else []  # only the main process reports
