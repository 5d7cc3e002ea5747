"""Task routing (Polytropon, Poly-S / MHR and their µ variants): every layer looks its skill weights up in a
learned task-skill table by the batch's task ids.

A task not seen in training (id -1) gets the uniform average over skills, so held-out tasks evaluate zero-shot.
The µ variants learn routing in training and use the average of skills at evaluation. Exports one peft LoRA per
task (exact: a fixed mixture of rank-r pairs is a rank-r pair) and peft's Poly format.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from orchmoe_cli.adapters.context import RoutingInputs, RoutingState
from orchmoe_cli.adapters.family import (
    AdaptMode,
    FixedRouting,
    Routing,
    RoutingFamily,
    append_row,
    checked_task_ids,
    task_routings,
)
from orchmoe_cli.adapters.skill_weights import AverageRouter, normalise, relaxed_sigmoid
from orchmoe_cli.errors import OrchmoeError

if TYPE_CHECKING:
    from orchmoe_cli.adapters.method_config import MethodConfig
    from orchmoe_cli.adapters.model import AdaptedModel


class TaskRouter(nn.Module):
    """Poly / MHR: learned per-layer task-skill logits (n_tasks, h*S), looked up by task id.

    Task id -1 (a task not seen in training) gets the uniform average over skills, so held-out
    tasks can be evaluated zero-shot. ``average_at_eval`` is the µ variants' switch: routing is
    learned in training and replaced by the average at evaluation.
    """

    def __init__(self, n_tasks: int, n_heads: int, n_skills: int, temperature: float = 1.0,
                 straight_through: bool = False, average_at_eval: bool = False) -> None:
        super().__init__()
        self.n_heads, self.n_skills = n_heads, n_skills
        self.temperature, self.straight_through = temperature, straight_through
        self.average_at_eval = average_at_eval
        self.logits = nn.Parameter(torch.empty(n_tasks, n_heads * n_skills))
        nn.init.uniform_(self.logits, -1e-3, 1e-3)
        self.register_buffer("uniform", torch.full((1, n_heads, n_skills), 1.0 / n_skills), persistent=False)

    @property
    def routes(self) -> bool:
        """False while the µ variants evaluate (they use the average of skills then)."""
        return self.training or not self.average_at_eval

    def forward(self, state: RoutingState | None) -> Tensor:
        if not self.routes:
            return self.uniform
        if state is None or state.task_ids is None:
            raise OrchmoeError("this method routes by task id: set routing with task_ids (-1 for an unseen task)")
        found = state.weights.get(self)
        return found if found is not None else route_tasks([self], state)[0]


def route_tasks(routers: list[TaskRouter], state: RoutingState) -> Tensor:
    """Weights (layers, 1 or batch, h, S) of several task routers at once: one chain of small ops for
    the whole model instead of one per layer (the routers must share sizes, mode and settings)."""
    first = routers[0]
    logits = first.logits.unsqueeze(0) if len(routers) == 1 else torch.stack([r.logits for r in routers])
    assert state.task_ids is not None
    ids = state.task_ids[:1] if not first.training and state.shared else state.task_ids  # training: no check
    ids = ids.to(logits.device)
    picked = logits[:, ids.clamp(min=0)].view(len(routers), -1, first.n_heads, first.n_skills)
    weights = normalise(relaxed_sigmoid(picked, first.temperature, first.training, first.straight_through))
    if state.has_unseen_tasks:
        weights = torch.where((ids >= 0).view(1, -1, 1, 1), weights, first.uniform)
    return weights


def _routers(model: AdaptedModel) -> list[TaskRouter]:
    return [layer.router for layer in model.layers if isinstance(layer.router, TaskRouter)]


class TaskRouting(RoutingFamily):
    """poly, mhr, poly_mu, mhr_mu."""

    needs_task_ids: ClassVar[bool] = True
    allocation_tensor: ClassVar[str | None] = "logits"
    allocation_rows: ClassVar[str] = "task"
    adapt_modes: ClassVar[dict[str, AdaptMode]] = {
        # a fresh routing row for the new task, U(-1e-3, 1e-3); routing and skills train
        "poly": AdaptMode(("poly", "poly_mu"), ("adapters", "routers"), new_task=True),
        "mhr": AdaptMode(("mhr", "mhr_mu"), ("adapters", "routers"), new_task=True),
        # the new task's routing row only; skills frozen (MHR-z)
        "poly_z": AdaptMode(("poly", "poly_mu"), ("routers",), new_task=True),
        "mhr_z": AdaptMode(("mhr", "mhr_mu"), ("routers",), new_task=True),
        # the inventory collapsed to the per-head average of skills, which trains (MHR-µ)
        "poly_mu": AdaptMode(("poly", "poly_mu"), ("adapters",), average=True),
        "mhr_mu": AdaptMode(("mhr", "mhr_mu"), ("adapters",), average=True),
    }

    def make_router(self, method: MethodConfig, n_tasks: int) -> nn.Module:
        return TaskRouter(n_tasks, method.n_heads or 1, method.n_skills, method.router_temperature,
                          method.straight_through, self.spec.average_at_eval)

    def route(self, model: AdaptedModel, inputs: RoutingInputs) -> Routing:
        if model.averaged or (inputs.task_ids is None and self.spec.average_at_eval and not model.training):
            return Routing(None)
        state = checked_task_ids(model, inputs.task_ids)
        for training in (True, False):  # routers in one mode share one batched computation
            routers = [r for r in _routers(model) if r.routes and r.training == training]
            if routers:
                state.weights.update(zip(routers, route_tasks(routers, state).unbind(0), strict=True))
        return Routing(state)

    def add_task(self, model: AdaptedModel) -> list[nn.Parameter]:
        """A routing row U(-1e-3, 1e-3) per layer, as at training start."""
        tables = []
        with torch.no_grad():
            for router in _routers(model):
                row = torch.empty(1, router.logits.shape[1], device=router.logits.device).uniform_(-1e-3, 1e-3)
                router.logits = append_row(router.logits, row)
                tables.append(router.logits)
        return tables

    def average(self, model: AdaptedModel) -> None:
        heads, skills = model.method.n_heads or 1, model.method.n_skills
        for layer in model.layers:
            layer.router = AverageRouter(heads, skills).to(model.device)
        model.averaged = True

    def _averages(self, model: AdaptedModel) -> bool:
        """Every task is evaluated with the average of skills (the µ variants, or an averaged checkpoint)."""
        return model.averaged or self.spec.average_at_eval

    def fixed_routings(self, model: AdaptedModel, tasks: list[str] | None) -> list[FixedRouting]:
        """One LoRA per task, (sum_s w_ts A_s)(sum_s w_ts B_s) per head block: exact for that task's rows; the µ
        variants evaluate every task with the average of skills, so they export that one LoRA."""
        if not self._averages(model):
            return task_routings(model, tasks)
        if tasks:
            raise OrchmoeError(f"{model.method.name}{' (averaged)' if model.averaged else ''} evaluates every task "
                               "with the average of skills: export takes no --task")
        unseen = torch.tensor([-1])
        return [FixedRouting("average", "the average of skills", RoutingState(1, task_ids=unseen,
                                                                             host_task_ids=unseen), "every input")]

    def export_extras(self, model: AdaptedModel, directory: Path) -> dict[str, Any]:
        """peft's own Poly format too, which keeps every task's routing in one adapter (learned routing only)."""
        if self._averages(model) or model.method.straight_through:
            return {}
        self.export_peft(model, directory / "peft-poly")
        return {"peft_poly": "peft-poly"}

    def describe_routing(self, model: AdaptedModel, state: RoutingState | None, rows: int,
                         task: str | None) -> list[dict[str, Any]]:
        if self._averages(model):
            return [{"routing": "the average of skills"} for _ in range(rows)]
        how = f"task {task}" if task else "the average of skills (no --task: as for a task unseen in training)"
        return [{"task": task, "routing": how} for _ in range(rows)]

    def export_peft(self, model: AdaptedModel, directory: Path) -> None:
        if self.spec.average_at_eval:
            super().export_peft(model, directory)
        from orchmoe_cli.adapters.peft_interop import export_poly  # peft is imported only when exporting

        export_poly(model, directory)
