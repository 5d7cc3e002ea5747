"""Parameter accounting and budgets.

Shapes of every adapter tensor are found by building the method's modules on the meta device
(no memory, no base-model copy), so counts, budgets and checkpoint validation all agree with what
``attach_adapters`` builds. Groups: "adapters" (skill LoRA inventories), "routers" (the layers' routers
and model-level routing modules such as OrchMoE's task classifier), "hypernetwork" (all HyperLoader
weights, its task embeddings included), "other" (base layer norms trained by the method). A model-level
module names its group in a ``parameter_group`` attribute.
A budget picks the rank for every method; the trainable count is linear in the rank.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn
from transformers import PreTrainedModel

from orchmoe_cli.adapters.context import RoutingSlot
from orchmoe_cli.adapters.method_config import MethodConfig
from orchmoe_cli.adapters.registry import spec_of
from orchmoe_cli.errors import OrchmoeError

GROUPS = ("adapters", "routers", "hypernetwork", "other")
_NORM_CLASSES = ("LayerNorm", "RMSNorm")


def hidden_size(base: PreTrainedModel) -> int:
    return base.get_input_embeddings().embedding_dim


def norm_modules(base: nn.Module) -> dict[str, nn.Module]:
    """The base model's normalisation layers (LayerNorm / RMSNorm of any HF flavour), by name."""
    return {name: module for name, module in base.named_modules() if type(module).__name__.endswith(_NORM_CLASSES)}


def layer_norm_parameters(base: nn.Module) -> dict[str, nn.Parameter]:
    """The base model's normalisation weights, by name."""
    return {f"{name}.{pname}": param for name, module in norm_modules(base).items()
            for pname, param in module.named_parameters(recurse=False)}


def adapter_tensors(wrappers: Iterable[tuple[str, nn.Module]], extras: Mapping[str, nn.Module], base: nn.Module,
                    train_layer_norms: bool) -> Iterator[tuple[str, nn.Parameter, str]]:
    """(checkpoint name, tensor, group) of every tensor a method adds or trains: the wrappers' own tensors
    (``wrappers`` yields them with their checkpoint name prefix), the model-level modules' (grouped by their
    ``parameter_group``) and, when the method trains them, the base model's layer norms."""
    for prefix, wrapper in wrappers:
        for pname, param in wrapper.named_parameters():
            if not pname.startswith("base_layer."):
                yield f"{prefix}.{pname}", param, "routers" if pname.startswith("router.") else "adapters"
    for key, module in extras.items():
        group = getattr(module, "parameter_group", "routers")
        for pname, param in module.named_parameters():
            yield f"{key}.{pname}", param, group
    if train_layer_norms:
        for name, param in layer_norm_parameters(base).items():
            yield f"base.{name}", param, "other"


def adapter_layout(base: PreTrainedModel, method: MethodConfig, n_tasks: int) -> dict[str, tuple[torch.Size, str]]:
    """Name -> (shape, group) of every tensor ``attach_adapters`` would add or train, for a resolved ``method``."""
    spec = spec_of(method.name)
    family = spec.family(spec)
    sites = family.plan(base, method)
    with torch.device("meta"):
        wrappers, extras = family.build(sites, method, n_tasks, hidden_size(base), RoutingSlot(),
                                        lambda s: nn.Linear(s.d_in, s.d_out, bias=False))
    named = ((f"base.{site}", wrapper) for site, wrapper in wrappers.items())
    return {name: (param.shape, group) for name, param, group in
            adapter_tensors(named, extras, base, bool(method.train_layer_norms))}


def count_by_group(layout: dict[str, tuple[torch.Size, str]]) -> dict[str, int]:
    counts = dict.fromkeys(GROUPS, 0)
    for shape, group in layout.values():
        counts[group] += math.prod(shape)
    return counts


def resolve(method: MethodConfig, hidden: int) -> MethodConfig:
    """``method`` with its family's defaults filled in."""
    spec = spec_of(method.name)
    return spec.family(spec).resolve(method, hidden)


def choose_rank(base: PreTrainedModel, method: MethodConfig, n_tasks: int) -> int:
    """The rank whose trainable count is nearest ``method.budget``; an error unless within 5% of it."""
    budget = method.budget_count
    assert budget is not None

    def total(rank: int) -> int:
        resolved = resolve(dataclasses.replace(method, rank=rank), hidden_size(base))
        return sum(count_by_group(adapter_layout(base, resolved, n_tasks)).values())

    one, two = total(1), total(2)
    per_rank, fixed = two - one, 2 * one - two
    tolerance = 0.05 * budget
    if one > budget + tolerance:
        raise OrchmoeError(f"{budget:,} parameters is too small for {method.name} at rank 1, "
                           f"which trains {one:,} with these targets and sizes", field="method.budget")
    rank = max(1, round((budget - fixed) / per_rank))
    count = fixed + rank * per_rank
    if abs(count - budget) > tolerance:
        raise OrchmoeError(f"no rank lands within 5% of {budget:,} parameters for {method.name}: "
                           f"rank {rank} trains {count:,} and each rank step adds {per_rank:,}", field="method.budget")
    return rank
