"""Parameter accounting and budgets.

Shapes of every adapter tensor are found by building the method's modules on the meta device
(no memory, no base-model copy), so counts, budgets and checkpoint validation all agree with what
``attach_adapters`` builds. Groups: "adapters" (skill LoRA inventories), "routers" (task logits,
OrchMoE allocations and task classifier), "hypernetwork" (all HyperLoader weights, its task
embeddings included), "other" (base layer norms trained by the method).
A budget picks the rank for every method; the trainable count is linear in the rank.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from transformers import PreTrainedModel

from orchmoe_cli.adapters.config import MethodConfig
from orchmoe_cli.adapters.context import RoutingSlot
from orchmoe_cli.adapters.inject import build, plan
from orchmoe_cli.adapters.registry import resolve
from orchmoe_cli.errors import OrchmoeError

GROUPS = ("adapters", "routers", "hypernetwork", "other")
_NORM_CLASSES = ("LayerNorm", "RMSNorm")


def hidden_size(base: PreTrainedModel) -> int:
    return base.get_input_embeddings().embedding_dim


def layer_norm_parameters(base: nn.Module) -> dict[str, nn.Parameter]:
    """The base model's normalisation weights (LayerNorm / RMSNorm of any HF flavour), by name."""
    found = {}
    for name, module in base.named_modules():
        if type(module).__name__.endswith(_NORM_CLASSES):
            for pname, param in module.named_parameters(recurse=False):
                found[f"{name}.{pname}"] = param
    return found


def group_of(name: str) -> str:
    """The parameter group of an adapter tensor named as in ``AdaptedModel.adapter_state_dict``."""
    if name.startswith("hyper."):
        return "hypernetwork"
    if name.startswith("task_classifier.") or ".router." in name:
        return "routers"
    if name.endswith((".lora_A", ".lora_B")):
        return "adapters"
    return "other"


def adapter_shapes(base: PreTrainedModel, method: MethodConfig, n_tasks: int) -> dict[str, torch.Size]:
    """Name -> shape of every tensor ``attach_adapters`` would add or train, for a resolved ``method``."""
    sites = plan(base, method)
    with torch.device("meta"):
        wrappers, extras = build(sites, method, n_tasks, hidden_size(base), RoutingSlot(),
                                 lambda s: nn.Linear(s.d_in, s.d_out, bias=False))
    shapes = {}
    for site, wrapper in wrappers.items():
        for pname, param in wrapper.named_parameters():
            if not pname.startswith("base_layer."):
                shapes[f"base.{site}.{pname}"] = param.shape
    for key, module in extras.items():
        shapes.update({f"{key}.{pname}": param.shape for pname, param in module.named_parameters()})
    if method.train_layer_norms:
        shapes.update({f"base.{name}": param.shape for name, param in layer_norm_parameters(base).items()})
    return shapes


def count_by_group(shapes: dict[str, torch.Size]) -> dict[str, int]:
    counts = dict.fromkeys(GROUPS, 0)
    for name, shape in shapes.items():
        counts[group_of(name)] += math.prod(shape)
    return counts


def choose_rank(base: PreTrainedModel, method: MethodConfig, n_tasks: int) -> int:
    """The rank whose trainable count is nearest ``method.budget``; an error unless within 5% of it."""
    budget = method.budget_count
    assert budget is not None

    def total(rank: int) -> int:
        resolved = resolve(dataclasses.replace(method, rank=rank), hidden_size(base))
        return sum(count_by_group(adapter_shapes(base, resolved, n_tasks)).values())

    one, two = total(1), total(2)
    per_rank, fixed = two - one, 2 * one - two
    tolerance = 0.05 * budget
    if one > budget + tolerance:
        raise OrchmoeError(f"method.budget: {budget:,} parameters is too small for {method.name} at rank 1, "
                           f"which trains {one:,} with these targets and sizes")
    rank = max(1, round((budget - fixed) / per_rank))
    count = fixed + rank * per_rank
    if abs(count - budget) > tolerance:
        raise OrchmoeError(f"method.budget: no rank lands within 5% of {budget:,} parameters for {method.name}: "
                           f"rank {rank} trains {count:,} and each rank step adds {per_rank:,}")
    return rank
