"""Few-shot adaptation modes: how a trained adapter is prepared to learn one new task.

Each mode names the methods it fits and what it trains (the papers' settings, ``docs/methods.md``):

- ``poly`` / ``mhr``: a fresh routing row for the new task, U(-1e-3, 1e-3); routing and skills train.
- ``poly_z`` / ``mhr_z``: the new task's routing row only; skills frozen (MHR-z).
- ``poly_mu`` / ``mhr_mu``: the inventory collapsed to the per-head average of skills, which trains (MHR-µ).
- ``orchmoe``: no task id, ever; the skills train (``with_router`` also the classifier and allocations).
- ``hyperloader``: a new task embedding, the hypernetwork frozen (``with_router``: unfrozen).
- ``lora``: the shared multi-task LoRA trains.

The rows of the training tasks stay bit-identical: they get no gradient, and adaptation runs AdamW
without weight decay, so an untouched row is never moved (``orchmoe_cli.commands.adapt``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from orchmoe_cli.adapters.budget import group_of
from orchmoe_cli.adapters.model import AdaptedModel
from orchmoe_cli.adapters.routers import TaskRouter
from orchmoe_cli.errors import OrchmoeError


@dataclass(frozen=True)
class AdaptMode:
    methods: tuple[str, ...]  # checkpoint methods the mode applies to
    new_task: bool  # adds a routing row / task embedding for the new task
    trains: tuple[str, ...]  # parameter groups that train (adapters, routers, hypernetwork)
    average: bool = False  # collapse task routing to the average of skills first


MODES: dict[str, AdaptMode] = {
    "lora": AdaptMode(("lora",), False, ("adapters",)),
    "poly": AdaptMode(("poly", "poly_mu"), True, ("adapters", "routers")),
    "mhr": AdaptMode(("mhr", "mhr_mu"), True, ("adapters", "routers")),
    "poly_z": AdaptMode(("poly", "poly_mu"), True, ("routers",)),
    "mhr_z": AdaptMode(("mhr", "mhr_mu"), True, ("routers",)),
    "poly_mu": AdaptMode(("poly", "poly_mu"), False, ("adapters",), average=True),
    "mhr_mu": AdaptMode(("mhr", "mhr_mu"), False, ("adapters",), average=True),
    "orchmoe": AdaptMode(("orchmoe",), False, ("adapters",)),
    "hyperloader": AdaptMode(("hyperloader",), True, ("new_task_embedding",)),
}
WITH_ROUTER = {"orchmoe": ("adapters", "routers"), "hyperloader": ("new_task_embedding", "hypernetwork")}


def check_mode(mode: str, method: str, source: str) -> AdaptMode:
    """The mode, or one line saying which checkpoints it fits."""
    if mode not in MODES:
        raise OrchmoeError(f"{source}: adapt mode '{mode}' is unknown; choose from {', '.join(MODES)}, "
                           "lora_scratch or zero_shot")
    spec = MODES[mode]
    if method not in spec.methods:
        raise OrchmoeError(f"{source}: adapt mode '{mode}' needs a {' or '.join(spec.methods)} checkpoint, and "
                           f"this one is {method}")
    return spec


def _add_task_row(model: AdaptedModel, name: str) -> int:
    """Append a routing row (U(-1e-3, 1e-3), as at training start) or a task embedding for ``name``."""
    if name in model.task_names:
        raise OrchmoeError(f"task '{name}' is already one of the checkpoint's training tasks")
    with torch.no_grad():
        for router in model.modules():
            if isinstance(router, TaskRouter):
                row = torch.empty(1, router.logits.shape[1], device=router.logits.device).uniform_(-1e-3, 1e-3)
                router.logits = nn.Parameter(torch.cat([router.logits.detach(), row.to(router.logits.dtype)]))
        if model.spec.router == "hyper":
            table = model.hyper.task_embedding
            row = torch.randn(1, table.shape[1], device=table.device, dtype=table.dtype)
            model.hyper.task_embedding = nn.Parameter(torch.cat([table.detach(), row]))
    model.task_names.append(name)
    model.adapted_tasks.append(name)
    return len(model.task_names) - 1


def prepare_for_adaptation(model: AdaptedModel, mode: str, task: str, with_router: bool = False) -> None:
    """Apply ``mode`` to a loaded checkpoint in place: add the task's row, freeze what the mode keeps fixed."""
    spec = MODES[mode]
    if spec.average:
        model.to_average()
    if spec.new_task:
        new_index = _add_task_row(model, task)
    trains = WITH_ROUTER.get(mode, spec.trains) if with_router else spec.trains
    for name, param in model.named_adapter_parameters():
        group = group_of(name)
        if name == "hyper.task_embedding":
            param.requires_grad_("new_task_embedding" in trains)
        else:
            param.requires_grad_(group in trains)
    if spec.new_task and model.spec.router == "hyper" and "new_task_embedding" in trains:
        mask = torch.zeros_like(model.hyper.task_embedding)
        mask[new_index] = 1.0
        model.hyper.task_embedding.register_hook(lambda grad: grad * mask)  # the training tasks' rows stay fixed


def movable_parameter_count(model: nn.Module, mode: str) -> int:
    """Trainable parameters adaptation can move. A task table (routing logits, task embeddings) trains as one
    tensor, but in a new-task mode only the new task's row gets gradient, so only that row counts."""
    spec = MODES.get(mode)  # None for lora_scratch: a fresh LoRA, all of it trains
    tables: set[int] = set()
    if spec is not None and spec.new_task and isinstance(model, AdaptedModel):
        tables = {id(router.logits) for router in model.modules() if isinstance(router, TaskRouter)}
        if model.spec.router == "hyper":
            tables.add(id(model.hyper.task_embedding))
    return sum(p[0].numel() if id(p) in tables else p.numel() for p in model.parameters() if p.requires_grad)
