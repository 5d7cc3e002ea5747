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
from orchmoe_cli.fsutil import atomic_directory, atomic_write_json, atomic_write_text
from orchmoe_cli.recipe import Recipe


def write_report(report: RoutingReport, out_dir: Path) -> list[Path]:
    """routing.json, routing.csv and the PNG figures, built aside and renamed into ``out_dir`` at once (an
    interrupted run never leaves two reports mixed); returns every file written."""
    with atomic_directory(out_dir) as staging:
        atomic_write_json(staging / "routing.json", report.as_dict())
        atomic_write_text(staging / "routing.csv", to_csv(report))
        figures = plot_all(report, staging)
    return [out_dir / "routing.json", out_dir / "routing.csv", *(out_dir / figure.name for figure in figures)]


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
    method, task_names, averaged = saved.method, saved.tasks, saved.averaged
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
    overlap = _shared_training_tasks(prepared, training) if prepared is not None else None
    report = _routing(checkpoint, recipe, saved, family, prepared, training, categories, tasks, layers,
                      prompts_per_task)
    if overlap:
        report.warnings.append(overlap)
    return report


def _routing(checkpoint: Path, recipe: Recipe | None, saved: Any, family: Any, prepared: Any, training: set[str],
             categories: dict[str, str], tasks: list[str] | None, layers: list[str] | None,
             prompts_per_task: int) -> RoutingReport:
    """The report of the routing the family stores: generated adapters, or allocations (with, for a classifier
    and ``--data``, its view of every real task)."""
    method, task_names, adapted = saved.method, saved.tasks, set(saved.adapted_tasks)
    if family.inspects_generated_adapters:
        model, _ = _load_adapted(checkpoint, _model_recipe(checkpoint, recipe, f"{method.name}'s generated adapters"))
        ids = torch.arange(len(task_names))
        vectors = model.generated_adapters(ids).detach().cpu().numpy().astype(np.float64)  # a quantised base: GPU
        view = RoutingView(list(task_names), "task", [], None, vectors)
        return build_report(method, checkpoint, view, training, categories, tasks, adapted)
    view = allocation_view(method, task_names, saved.tensors, layers, checkpoint)
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


def _shared_training_tasks(prepared: Any, training: set[str]) -> str | None:
    """``--data`` must describe the checkpoint's own tasks: sharing none of its training tasks is refused (the
    categories and the classifier's view would describe another task set); sharing fewer than half, a warning."""
    mine = {t["name"] for t in prepared.manifest["tasks"] if t["split"] == "train"}
    shared = len(mine & training)
    if training and shared == 0:
        raise OrchmoeError(f"shares none of the checkpoint's {len(training)} training tasks; pass the recipe it was "
                           "trained with", field="data")
    if 2 * shared < len(training):
        return (f"--data shares only {shared} of the checkpoint's {len(training)} training tasks: categories and "
                "the classifier's view describe those only")
    return None


def _load_adapted(checkpoint: Path, recipe: Recipe) -> tuple[Any, int]:
    loaded = load_model(recipe.model)
    model = load_adapted(loaded.model, checkpoint)
    model.eval()
    return model, pad_token_id(loaded.tokenizer)
