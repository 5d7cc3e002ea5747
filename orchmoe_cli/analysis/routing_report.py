"""`orchmoe inspect-routing`: which skills each task uses, how tasks cluster, what OrchMoE's classifier inferred.

Task-id routers (poly, mhr, *_mu) and OrchMoE's allocations are read from the adapter file alone, so
those views need no base model. OrchMoE's per-input view (``--data``: p(abstract task | prompt) and the
skill mixture every real task receives through the classifier) and HyperLoader's generated adapters run
the model, so they load the recipe's base model.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchmoe_cli.adapters.method_config import MethodConfig
from orchmoe_cli.adapters.registry import spec_of
from orchmoe_cli.adapters.skill_weights import allocation_probabilities
from orchmoe_cli.analysis import routing_stats as rs
from orchmoe_cli.errors import OrchmoeError

PROMPTS_PER_TASK = 20  # OrchMoE's per-input view: the first prompts of every task


@dataclass
class RoutingView:
    """One allocation to look at: ``probs`` (layers, rows, heads, skills), or ``vectors`` for HyperLoader."""

    rows: list[str]  # row labels: tasks or abstract tasks
    row_kind: str  # "task" or "abstract task"
    layers: list[str]
    probs: np.ndarray | None
    vectors: np.ndarray  # one routing vector per row, for similarity and clustering

    @property
    def weights(self) -> np.ndarray | None:
        return None if self.probs is None else rs.normalise(self.probs)


@dataclass
class RoutingReport:
    method: str
    checkpoint: str
    view: RoutingView
    overall: rs.AllocationStats | None
    per_layer: dict[str, rs.AllocationStats]
    similarity: np.ndarray
    order: list[int]
    linkage: np.ndarray | None
    training_rows: list[int]  # rows that are training tasks (nearest-neighbour candidates)
    adapted: set[str] = field(default_factory=set)  # rows added by `orchmoe adapt --keep-adapters`
    categories: dict[str, str] = field(default_factory=dict)  # task -> SNI category, when known
    classifier: rs.ClassifierStats | None = None
    coherence: rs.CategoryCoherence | None = None  # do tasks of one category route alike?
    abstract: RoutingView | None = None  # OrchMoE with data: the allocation Z itself
    task_abstract: np.ndarray | None = None  # OrchMoE with data: mean p(t|x) per real task (tasks, T)
    warnings: list[str] = field(default_factory=list)

    def top_skills(self, row: int, k: int = 3) -> list[tuple[int, float]]:
        """The row's heaviest skills, averaged over layers and heads."""
        if self.view.weights is None:
            return []
        mean = self.view.weights[:, row].mean(axis=(0, 1))
        best = np.argsort(-mean)[:k]
        return [(int(s), float(mean[s])) for s in best]

    @property
    def abstract_tasks_preferred_by_tasks(self) -> int | None:
        """OrchMoE with data: how many abstract tasks are the most likely one of some real task's prompts."""
        return None if self.task_abstract is None else len(set(self.task_abstract.argmax(axis=1).tolist()))

    def nearest(self, row: int, k: int = 3) -> list[tuple[str, float]]:
        return [(self.view.rows[i], s) for i, s in rs.nearest(self.similarity, row, self.training_rows, k)]

    def as_dict(self) -> dict[str, Any]:
        view = self.view
        rows = []
        for i, name in enumerate(view.rows):
            rows.append({"name": name, "category": self.categories.get(name),
                         "training": i in self.training_rows, "adapted": name in self.adapted,
                         "top_skills": [{"skill": s, "weight": w} for s, w in self.top_skills(i)],
                         "nearest_training_tasks": [{"task": t, "similarity": s} for t, s in self.nearest(i)]})
        return {
            "method": self.method, "checkpoint": self.checkpoint, "row_kind": view.row_kind,
            "layers": view.layers, "rows": rows, "cluster_order": [view.rows[i] for i in self.order],
            "statistics": {"overall": self.overall.as_dict() if self.overall else None,
                           "per_layer": {k: v.as_dict() for k, v in self.per_layer.items()}},
            "classifier": self.classifier.as_dict() if self.classifier else None,
            "abstract_tasks_preferred_by_tasks": self.abstract_tasks_preferred_by_tasks,
            "category_coherence": self.coherence.as_dict() if self.coherence else None,
            "similarity": self.similarity.round(6).tolist(),
            "similarity_definition": "cosine similarity of routing vectors (skill weights of every layer and head; "
                                     "HyperLoader: generated adapters) centred on their mean over rows",
            "task_abstract_task": None if self.task_abstract is None else self.task_abstract.round(6).tolist(),
            "warnings": self.warnings,
        }


def allocation_view(method: MethodConfig, tasks: list[str], tensors: dict[str, torch.Tensor],
                    layers: list[str] | None, checkpoint: str | Path) -> RoutingView:
    """The learned allocation of a task-id router (rows = tasks) or of OrchMoE (rows = abstract tasks), read
    from ``checkpoint``'s tensors (the file its errors name)."""
    family = spec_of(method.name).family
    assert family.allocation_tensor is not None, f"{method.name} learns no allocation"
    found = allocation_probabilities(tensors, family.allocation_tensor, method.n_heads or 1, method.n_skills,
                                     method.straight_through)
    if not found:
        raise OrchmoeError(f"{checkpoint}: {method.name} checkpoint holds no routing tensors; is the file damaged?")
    chosen = _select_layers(list(found), layers, checkpoint)
    probs = np.stack([found[name].numpy() for name in chosen]).astype(np.float64)
    by_task = family.allocation_rows == "task"
    rows = list(tasks) if by_task else [f"{family.allocation_rows.split()[0]}-{t}" for t in range(probs.shape[1])]
    if probs.shape[1] != len(rows):
        raise OrchmoeError(f"{checkpoint}: routing has {probs.shape[1]} task rows but tasks.json names {len(rows)}")
    return RoutingView(rows, family.allocation_rows, chosen, probs,
                       rs.normalise(probs).transpose(1, 0, 2, 3).reshape(probs.shape[1], -1))


def _select_layers(available: list[str], wanted: list[str] | None, checkpoint: str | Path) -> list[str]:
    """Layers named exactly, or by any part of their name (``--layer 3`` matches ``layers.3.``)."""
    if not wanted:
        return available
    chosen = [name for name in available
              if any(w == name or f".{w}." in f".{name}." or w in name.split(".") for w in wanted)]
    if not chosen:
        raise OrchmoeError(f"{checkpoint}: --layer {', '.join(wanted)} matches none of the {len(available)} routed "
                           f"layers (e.g. {available[0]})")
    return chosen


def _select_rows(view: RoutingView, wanted: list[str] | None, checkpoint: str | Path) -> list[int]:
    if not wanted:
        return list(range(len(view.rows)))
    missing = [w for w in wanted if w not in view.rows]
    if missing:
        raise OrchmoeError(f"{checkpoint}: --task {missing[0]} is not a {view.row_kind} of this checkpoint "
                           f"({len(view.rows)} known, e.g. {view.rows[0]})")
    return [view.rows.index(w) for w in wanted]


def _subset(view: RoutingView, rows: list[int]) -> RoutingView:
    probs = None if view.probs is None else view.probs[:, rows]
    return RoutingView([view.rows[i] for i in rows], view.row_kind, view.layers, probs, view.vectors[rows])


def build_report(method: MethodConfig, checkpoint: Path, view: RoutingView, training: set[str],
                 categories: dict[str, str], tasks: list[str] | None,
                 adapted: set[str] | None = None) -> RoutingReport:
    """Statistics, similarity and clustering of ``view`` (restricted to ``tasks`` when given)."""
    view = _subset(view, _select_rows(view, tasks, checkpoint))
    similarity = rs.cosine_similarity(rs.centred(view.vectors))
    order, tree = rs.cluster_order(rs.centred(view.vectors))
    overall, per_layer, warnings = None, {}, []
    if view.probs is not None:
        overall = rs.allocation_stats(view.probs)
        per_layer = {name: rs.allocation_stats(view.probs[i]) for i, name in enumerate(view.layers)}
        warnings += rs.allocation_warnings(overall, "all layers")
    training_rows = [i for i, name in enumerate(view.rows) if name in training]
    known = [i for i, name in enumerate(view.rows) if name in categories]
    coherence = (rs.category_coherence(similarity[np.ix_(known, known)], [categories[view.rows[i]] for i in known])
                 if len(known) > 2 else None)
    return RoutingReport(method.name, str(checkpoint), view, overall, per_layer, similarity, order, tree,
                         training_rows, adapted or set(), categories, coherence=coherence, warnings=warnings)


def classifier_view(model: Any, abstract: RoutingView, prompts: dict[str, list[list[int]]],
                    pad_id: int) -> tuple[RoutingView, np.ndarray, np.ndarray, list[str]]:
    """OrchMoE through its classifier: (per real task view of its mean skill weights, mean p(t|x) per task,
    p(t|x) per prompt, each prompt's task)."""
    per_prompt, owners = [], []
    for task, rows in prompts.items():
        for start in range(0, len(rows), 8):
            batch = rows[start : start + 8]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(batch):
                ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
            per_prompt.append(model.task_distribution(ids, mask).float().cpu().numpy())
            owners += [task] * len(batch)
    probs = np.concatenate(per_prompt).astype(np.float64)
    assert abstract.probs is not None
    mixed = rs.normalise(np.einsum("bt,lths->lbhs", probs, abstract.probs))  # each prompt's skill weights
    names = list(prompts)
    index = np.array([names.index(o) for o in owners])
    weights = np.stack([mixed[:, index == i].mean(axis=1) for i in range(len(names))], axis=1)
    task_abstract = np.stack([probs[index == i].mean(axis=0) for i in range(len(names))])
    view = RoutingView(names, "task", abstract.layers, weights, weights.transpose(1, 0, 2, 3).reshape(len(names), -1))
    return view, task_abstract, probs, owners


def to_csv(report: RoutingReport) -> str:
    """Long format: one line per (layer, row, head, skill), or the similarity matrix for HyperLoader."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    view = report.view
    if view.probs is None:
        writer.writerow(["task", *view.rows])
        for name, row in zip(view.rows, report.similarity):
            writer.writerow([name, *(f"{v:.6f}" for v in row)])
        return out.getvalue()
    writer.writerow(["layer", view.row_kind.replace(" ", "_"), "category", "head", "skill", "probability", "weight"])
    weights = view.weights
    assert weights is not None
    for li, layer in enumerate(view.layers):
        for ri, name in enumerate(view.rows):
            for h in range(view.probs.shape[2]):
                for s in range(view.probs.shape[3]):
                    writer.writerow([layer, name, report.categories.get(name, ""), h, s,
                                     f"{view.probs[li, ri, h, s]:.6f}", f"{weights[li, ri, h, s]:.6f}"])
    return out.getvalue()


def first_prompts(prepared: Any, per_task: int) -> tuple[dict[str, list[list[int]]], dict[str, str]]:
    """The first ``per_task`` prompts of every task of both splits, and each task's category."""
    prompts: dict[str, list[list[int]]] = {}
    categories: dict[str, str] = {}
    for split in ("train", "test"):
        for row in prepared.dataset[split].select_columns(["task", "category", "prompt_ids"]):
            rows = prompts.setdefault(row["task"], [])
            categories[row["task"]] = row["category"]
            if len(rows) < per_task:
                rows.append(row["prompt_ids"])
    return prompts, categories
