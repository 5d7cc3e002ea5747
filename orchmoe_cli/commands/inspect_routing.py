"""`orchmoe inspect-routing`: load a checkpoint's routing (and, where it needs one, its base model), build the
report and write routing.json, routing.csv and the figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchmoe_cli.adapters import load_adapted
from orchmoe_cli.adapters.loading import read_checkpoint
from orchmoe_cli.adapters.registry import spec_of
from orchmoe_cli.analysis import routing_stats as rs
from orchmoe_cli.analysis.routing_plots import plot_all
from orchmoe_cli.analysis.routing_report import (
    PROMPTS_PER_TASK,
    RoutingReport,
    RoutingView,
    allocation_view,
    build_report,
    classifier_view,
    first_prompts,
    to_csv,
)
from orchmoe_cli.commands.common import saved_recipe
from orchmoe_cli.core.base_models import load_model
from orchmoe_cli.core.recipe_data import prepare_data
from orchmoe_cli.data.collate import pad_token_id
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.fsutil import atomic_write_json, atomic_write_text
from orchmoe_cli.recipe import Recipe


def write_report(report: RoutingReport, out_dir: Path) -> list[Path]:
    """routing.json, routing.csv and the PNG figures; returns every file written."""
    paths = [out_dir / "routing.json", out_dir / "routing.csv"]
    atomic_write_json(paths[0], report.as_dict())
    atomic_write_text(paths[1], to_csv(report))
    return paths + plot_all(report, out_dir)


def default_out_dir(checkpoint: Path) -> Path:
    """``<run>/routing-<step>`` for a training checkpoint, ``<checkpoint>-routing`` beside any other."""
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / f"routing-{checkpoint.name}"
    return checkpoint.with_name(f"{checkpoint.name}-routing")


def _model_recipe(checkpoint: Path, recipe: Recipe | None, why: str) -> Recipe:
    """The recipe whose base model the checkpoint runs on: ``--data``'s, else the one saved with it."""
    return recipe if recipe is not None else saved_recipe(checkpoint, f"{why} needs it: pass --data RECIPE")


def inspect_checkpoint(checkpoint: Path, recipe: Recipe | None, console: Any,
                       tasks: list[str] | None = None, layers: list[str] | None = None,
                       prompts_per_task: int = PROMPTS_PER_TASK) -> RoutingReport:
    """Build the routing report of ``checkpoint``; ``recipe`` (``--data``) adds categories and, for OrchMoE,
    the classifier's view of every real task."""
    saved = read_checkpoint(checkpoint)
    method, task_names, tensors, averaged = saved.method, saved.tasks, saved.tensors, saved.averaged
    family = spec_of(method.name).family
    if (family.allocation_tensor is None and not family.inspects_generated_adapters) or averaged:
        raise OrchmoeError(f"{checkpoint}: a {method.name}{' (averaged)' if averaged else ''} checkpoint routes "
                           "every input the same way: there is no routing to inspect")
    categories: dict[str, str] = {}
    prepared = None
    if recipe is not None:
        prepared = prepare_data(recipe, console)
        categories = {t["name"]: t["category"] for t in prepared.manifest["tasks"]}
    adapted = set(saved.adapted_tasks)
    training = set(task_names) - adapted  # rows `orchmoe adapt` added are no nearest-neighbour candidates
    if family.inspects_generated_adapters:
        model, _ = _load_adapted(checkpoint, _model_recipe(checkpoint, recipe, f"{method.name}'s generated adapters"))
        ids = torch.arange(len(task_names))
        vectors = model.generated_adapters(ids).numpy().astype(np.float64)
        view = RoutingView(list(task_names), "task", [], None, vectors)
        return build_report(method, checkpoint, view, training, categories, tasks, adapted)
    view = allocation_view(method, task_names, tensors, layers, checkpoint)
    if not family.classifies_prompts or prepared is None:
        return build_report(method, checkpoint, view, training, categories, tasks, adapted)
    model, pad_id = _load_adapted(checkpoint, recipe)  # type: ignore[arg-type]
    prompts, categories = first_prompts(prepared, prompts_per_task)
    task_view, task_abstract, per_prompt, owners = classifier_view(model, view, prompts, pad_id)
    report = build_report(method, checkpoint, task_view, training, categories, tasks, adapted)
    report.abstract = view
    report.task_abstract = task_abstract[[task_view.rows.index(r) for r in report.view.rows]]
    report.classifier = rs.classifier_stats(per_prompt, [categories[o] for o in owners])
    report.warnings += report.classifier.warnings
    return report


def _load_adapted(checkpoint: Path, recipe: Recipe) -> tuple[Any, int]:
    loaded = load_model(recipe.model)
    model = load_adapted(loaded.model, checkpoint)
    model.eval()
    return model, pad_token_id(loaded.tokenizer)
