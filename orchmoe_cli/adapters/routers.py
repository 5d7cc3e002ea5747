"""Per-layer routers: each turns the batch's routing state into skill weights (rows, heads, skills).

A router returns one row (shape (1, h, S)) when every sequence of the batch routes identically,
which lets the layer mix its skills once for the whole batch; otherwise one row per sequence.
"""

from __future__ import annotations

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
        return state.memo(self, "weights", lambda: self.weights_for(state))

    def weights_for(self, state: RoutingState) -> Tensor:
        ids = state.task_ids
        if state.shared and not self.training:
            ids = ids[:1]
        ids = ids.to(self.logits.device)
        logits = self.logits[ids.clamp(min=0)].view(-1, self.n_heads, self.n_skills)
        weights = normalise(relaxed_sigmoid(logits, self.temperature, self.training, self.straight_through))
        return torch.where((ids >= 0).view(-1, 1, 1), weights, self.uniform)


class AllocationRouter(nn.Module):
    """OrchMoE Task-Skill Allocation: per-layer Z (T, h, S) from abstract tasks to skills.

    w(x) = normalise_S( sum_t p(t|x) * relaxed_sigmoid(Z[t]) ), with p(t|x) computed once per batch
    by the model-level task classifier and carried in the routing state.
    """

    def __init__(self, n_abstract_tasks: int, n_heads: int, n_skills: int, temperature: float = 1.0,
                 straight_through: bool = False) -> None:
        super().__init__()
        self.temperature, self.straight_through = temperature, straight_through
        self.allocation = nn.Parameter(torch.empty(n_abstract_tasks, n_heads, n_skills))
        nn.init.uniform_(self.allocation, -1e-3, 1e-3)

    def forward(self, state: RoutingState | None) -> Tensor:
        if state is None or state.task_probs is None:
            raise OrchmoeError("orchmoe routes from the prompt: set routing with input_ids (and prompt_mask)")
        return state.memo(self, "weights", lambda: self.weights_for(state.task_probs))

    def weights_for(self, task_probs: Tensor) -> Tensor:
        probs = task_probs.to(self.allocation.dtype)
        if self.training:  # one relaxed-Bernoulli draw per sequence, as Poly draws per row
            logits = self.allocation.expand(probs.shape[0], *self.allocation.shape)
            allocation = relaxed_sigmoid(logits, self.temperature, True, self.straight_through)
            return normalise(torch.einsum("bt,bths->bhs", probs, allocation))
        allocation = relaxed_sigmoid(self.allocation, self.temperature, False, self.straight_through)
        return normalise(torch.einsum("bt,ths->bhs", probs, allocation))
