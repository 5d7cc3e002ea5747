"""Per-layer routers: each turns the batch's routing state into skill weights (rows, heads, skills).

A router returns one row (shape (1, h, S)) when every sequence of the batch routes identically,
which lets the layer mix its skills once for the whole batch; otherwise one row per sequence.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from orchmoe_cli.adapters.context import RoutingState
from orchmoe_cli.errors import OrchmoeError

EPS = 1e-12  # normaliser guard, as Polytropon / peft


def relaxed_sigmoid(logits: Tensor, temperature: float, training: bool, straight_through: bool) -> Tensor:
    """Gumbel-sigmoid (relaxed Bernoulli) sample in training, plain sigmoid at eval.

    With ``straight_through`` the forward value is rounded to {0, 1} while gradients flow through
    the soft value, as mttl's optional straight-through selector.
    """
    if training:
        tiny = torch.finfo(logits.dtype).eps
        u = torch.rand_like(logits).clamp(tiny, 1 - tiny)
        soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)
    else:
        soft = torch.sigmoid(logits)
    if straight_through:
        return (soft > 0.5).to(soft.dtype) + soft - soft.detach()
    return soft


def normalise(weights: Tensor) -> Tensor:
    """Make the skill weights of each head sum to one."""
    return weights / (weights.sum(dim=-1, keepdim=True) + EPS)


class AverageRouter(nn.Module):
    """Uniform weights 1/S (Poly-µ / MHR-µ's average selector; with S = 1 it is plain LoRA)."""

    def __init__(self, n_heads: int, n_skills: int) -> None:
        super().__init__()
        self.register_buffer("uniform", torch.full((1, n_heads, n_skills), 1.0 / n_skills), persistent=False)

    def forward(self, state: RoutingState | None) -> Tensor:
        return self.uniform


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

    def forward(self, state: RoutingState | None) -> Tensor:
        if self.average_at_eval and not self.training:
            return self.uniform
        if state is None or state.task_ids is None:
            raise OrchmoeError("this method routes by task id: set routing with task_ids (-1 for an unseen task)")
        found = state.computed.get(id(self))
        return found if found is not None else route_tasks([self], state)[0]


def route_tasks(routers: list[TaskRouter], state: RoutingState) -> Tensor:
    """Weights (layers, 1 or batch, h, S) of several task routers at once: one chain of small ops for
    the whole model instead of one per layer (the routers must share sizes, mode and settings)."""
    first = routers[0]
    logits = first.logits.unsqueeze(0) if len(routers) == 1 else torch.stack([r.logits for r in routers])
    assert state.task_ids is not None
    ids = state.task_ids[:1] if state.shared and not first.training else state.task_ids
    ids = ids.to(logits.device)
    picked = logits[:, ids.clamp(min=0)].view(len(routers), -1, first.n_heads, first.n_skills)
    weights = normalise(relaxed_sigmoid(picked, first.temperature, first.training, first.straight_through))
    if state.has_unseen_tasks:
        weights = torch.where((ids >= 0).view(1, -1, 1, 1), weights, first.uniform)
    return weights


class AllocationRouter(nn.Module):
    """OrchMoE Task-Skill Allocation: per-layer Z (T, h, S) from abstract tasks to skills.

    w(x) = normalise_S( sum_t p(t|x) * relaxed_sigmoid(Z[t]) ), with p(t|x) computed once per batch
    by the model-level task classifier and carried in the routing state.
    """

    def __init__(self, n_abstract_tasks: int, n_heads: int, n_skills: int, temperature: float = 1.0,
                 straight_through: bool = False, init_spread: float = 1e-3) -> None:
        super().__init__()
        self.temperature, self.straight_through = temperature, straight_through
        self.allocation = nn.Parameter(torch.empty(n_abstract_tasks, n_heads, n_skills))
        # U(-a, a): Poly's 1e-3 leaves the abstract tasks' rows nearly equal, a symmetric start the
        # classifier gets no gradient to leave; a larger spread gives each abstract task its own mixture
        nn.init.uniform_(self.allocation, -init_spread, init_spread)

    def forward(self, state: RoutingState | None) -> Tensor:
        if state is None or state.task_probs is None:
            raise OrchmoeError("orchmoe routes from the prompt: set routing with input_ids (and prompt_mask)")
        found = state.computed.get(id(self))
        return found if found is not None else route_allocations([self], state.task_probs)[0]


def route_allocations(routers: list[AllocationRouter], task_probs: Tensor) -> Tensor:
    """Weights (layers, batch, h, S) of several allocation routers at once."""
    first = routers[0]
    allocation = (first.allocation.unsqueeze(0) if len(routers) == 1
                  else torch.stack([r.allocation for r in routers]))
    probs = task_probs.to(allocation.dtype)
    if first.training:  # one relaxed-Bernoulli draw per sequence, as Poly draws per row
        logits = allocation.unsqueeze(1).expand(-1, probs.shape[0], -1, -1, -1)
        sampled = relaxed_sigmoid(logits, first.temperature, True, first.straight_through)
        return normalise(torch.einsum("bt,lbths->lbhs", probs, sampled))
    soft = relaxed_sigmoid(allocation, first.temperature, False, first.straight_through)
    return normalise(torch.einsum("bt,lths->lbhs", probs, soft))


def route_layers(routers: list[nn.Module], state: RoutingState) -> None:
    """Fill ``state.computed`` for every router that learns its routing, grouped by mode."""
    groups: dict[tuple[type, bool], list[nn.Module]] = {}
    for router in routers:
        if isinstance(router, (TaskRouter, AllocationRouter)):
            groups.setdefault((type(router), router.training), []).append(router)
    for (kind, training), members in groups.items():
        if kind is TaskRouter:
            tasks = [r for r in members if isinstance(r, TaskRouter) and (training or not r.average_at_eval)]
            if tasks and state.task_ids is not None:
                state.computed.update(zip(map(id, tasks), route_tasks(tasks, state).unbind(0), strict=True))
        elif state.task_probs is not None:
            allocs = [r for r in members if isinstance(r, AllocationRouter)]
            weights = route_allocations(allocs, state.task_probs).unbind(0)
            state.computed.update(zip(map(id, allocs), weights, strict=True))


ROUTER_TENSORS = (".router.logits", ".router.allocation")  # Poly/MHR task-skill logits, OrchMoE's Z


def allocation_probabilities(tensors: Mapping[str, Tensor], n_heads: int, n_skills: int,
                             straight_through: bool = False) -> dict[str, Tensor]:
    """Eval-mode allocation probabilities per routed layer, read from adapter tensors alone (no model):
    {layer: (rows, heads, skills)}, rows being training tasks (Poly/MHR) or abstract tasks (OrchMoE).
    The layers mix their skills with these normalised over skills."""
    found = {}
    for name, tensor in tensors.items():
        for suffix in ROUTER_TENSORS:
            if name.endswith(suffix):
                layer = name[: -len(suffix)].removeprefix("base.")
                logits = tensor.detach().float().reshape(tensor.shape[0], n_heads, n_skills)
                found[layer] = relaxed_sigmoid(logits, 1.0, False, straight_through)
    return {layer: found[layer] for layer in sorted(found, key=_natural_key)}


def _natural_key(name: str) -> list[int | str]:
    """'layers.10.q' after 'layers.9.q': numbers compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
