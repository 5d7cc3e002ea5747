"""Skill weights shared by the skill-LoRA families: the relaxed-Bernoulli selection of Poly and OrchMoE, the
average-of-skills router, and a learned allocation read back from saved tensors (no model needed)."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from orchmoe_cli.adapters.context import RoutingState

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


def allocation_probabilities(tensors: Mapping[str, Tensor], allocation_tensor: str, n_heads: int, n_skills: int,
                             straight_through: bool = False) -> dict[str, Tensor]:
    """Eval-mode allocation probabilities per routed layer, read from adapter tensors alone (no model):
    {layer: (rows, heads, skills)}; ``allocation_tensor`` names the routers' tensor (the family's).
    The layers mix their skills with these normalised over skills."""
    found = {}
    suffix = f".router.{allocation_tensor}"
    for name, tensor in tensors.items():
        if name.endswith(suffix):
            layer = name[: -len(suffix)].removeprefix("base.")
            logits = tensor.detach().float().reshape(tensor.shape[0], n_heads, n_skills)
            found[layer] = relaxed_sigmoid(logits, 1.0, False, straight_through)
    return {layer: found[layer] for layer in sorted(found, key=_natural_key)}


def _natural_key(name: str) -> list[int | str]:
    """'layers.10.q' after 'layers.9.q': numbers compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
