"""Where adapters go in a base model, and building the wrappers that put them there.

Targets default per architecture family (attention and feed-forward linears) and can be
overridden by ``method.target_modules``: a pattern matches a module whose full name equals it or
ends with ``.pattern``, with shell-style globs (``wi*``). HyperLoader places generated LoRA on its
LoRA targets (q and v, self- and cross-attention) and generated bottleneck adapters on the output
projection of each self-attention and feed-forward sublayer, so each adapter transforms the
sublayer output before the block's residual add (T5 ``SelfAttention.o`` / ``DenseReluDense.wo``,
Llama ``self_attn.o_proj`` / ``mlp.down_proj``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

from torch import nn
from transformers import PreTrainedModel

from orchmoe_cli.adapters.config import MethodConfig
from orchmoe_cli.adapters.context import RoutingSlot
from orchmoe_cli.adapters.hyper import HyperAdapterLinear, HyperLoader, HyperLoRALinear, StackHyperNetwork
from orchmoe_cli.adapters.layer import SkillLoRALinear
from orchmoe_cli.adapters.orchmoe import TaskClassifier
from orchmoe_cli.adapters.registry import MethodSpec, spec_of
from orchmoe_cli.adapters.routers import AllocationRouter, AverageRouter, TaskRouter
from orchmoe_cli.errors import OrchmoeError


@dataclass(frozen=True)
class Family:
    """Module names of one architecture family."""

    targets: tuple[str, ...]  # default skill-LoRA targets
    hyper_lora: tuple[str, ...]  # HyperLoader's default LoRA targets
    hyper_adapters: tuple[str, str]  # output projections of (self-attention, feed-forward)


_T5 = Family(("q", "k", "v", "o", "wi*", "wo"), ("SelfAttention.q", "SelfAttention.v", "EncDecAttention.q",
                                                "EncDecAttention.v"), ("SelfAttention.o", "DenseReluDense.wo"))
_LLAMA = Family(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                ("self_attn.q_proj", "self_attn.v_proj"), ("self_attn.o_proj", "mlp.down_proj"))
FAMILIES: dict[str, Family] = {
    **dict.fromkeys(("t5", "mt5", "umt5"), _T5),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite"), _LLAMA),
}


@dataclass(frozen=True)
class Site:
    """One linear layer to wrap."""

    name: str
    d_in: int
    d_out: int
    kind: Literal["skill", "hyper_lora", "hyper_adapter"] = "skill"
    stack: str = ""
    layer: int = 0
    position: int = 0


def matches(name: str, pattern: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


def linear_layers(base: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in base.named_modules() if type(m) is nn.Linear}


def _family(base: PreTrainedModel, what: str) -> Family:
    family = FAMILIES.get(getattr(base.config, "model_type", ""))
    if family is None:
        raise OrchmoeError(f"method.target_modules: no default {what} for model type "
                           f"'{base.config.model_type}'; list the modules to adapt")
    return family


def select(linears: dict[str, nn.Linear], patterns: list[str] | tuple[str, ...], explicit: bool) -> list[str]:
    """Names of the linears matching any pattern; with ``explicit`` every pattern must match something."""
    if explicit:
        available = sorted({n.rsplit(".", 1)[-1] for n in linears})
        for pattern in patterns:
            if not any(matches(n, pattern) for n in linears):
                close = difflib.get_close_matches(pattern.rsplit(".", 1)[-1], available, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise OrchmoeError(f"method.target_modules: '{pattern}' matches no linear layer of this model{hint}; "
                                   f"available: {', '.join(available)}")
    chosen = [n for n in linears if any(matches(n, p) for p in patterns)]
    if not chosen:
        raise OrchmoeError(f"method.target_modules: {', '.join(patterns)} match no linear layer of this model")
    return chosen


def _position_key(name: str) -> tuple[str, int, str]:
    """(stack, layer index, name within the layer) of a module inside a stack of numbered blocks."""
    parts = name.split(".")
    index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    if index is None:
        raise OrchmoeError(f"method.target_modules: hyperloader needs modules inside numbered layers, got '{name}'")
    stack = parts[0] if parts[0] in ("encoder", "decoder") else "decoder"
    return stack, int(parts[index]), ".".join(parts[index + 1:])


def plan(base: PreTrainedModel, method: MethodConfig) -> list[Site]:
    """The layers to wrap for ``method`` (resolved), with everything needed to build their wrappers."""
    linears = linear_layers(base)
    explicit = method.target_modules is not None
    if spec_of(method).router != "hyper":
        names = select(linears, method.target_modules or _family(base, "targets").targets, explicit)
        sites = [Site(n, linears[n].in_features, linears[n].out_features) for n in names]
        heads = method.n_heads or 1
        for site in sites:
            if site.d_in % heads or site.d_out % heads:
                raise OrchmoeError(f"method.n_heads: {heads} must divide the input and output sizes of every adapted "
                                   f"layer; {site.name} maps {site.d_in} -> {site.d_out}")
        return sites
    family = _family(base, "hyperloader placement")
    lora = select(linears, method.target_modules or family.hyper_lora, explicit)
    attn, ff = (select(linears, [p], False) for p in family.hyper_adapters)
    if explicit:  # explicit LoRA targets also choose the blocks that get bottleneck adapters (e.g. top layers)
        blocks = {_position_key(name)[:2] for name in lora}
        attn, ff = ([n for n in names if _position_key(n)[:2] in blocks] for names in (attn, ff))
    clash = sorted(set(lora) & set(attn + ff))
    if clash:
        raise OrchmoeError(f"method.target_modules: {clash[0]} already carries a hyperloader adapter; "
                           "choose other LoRA targets")
    model_order = {name: i for i, name in enumerate(linears)}
    positions: dict[tuple[str, str], int] = {}  # LoRA position ids, numbered per stack in model order
    sites = []
    for name in sorted(lora + attn + ff, key=model_order.__getitem__):
        stack, layer, key = _position_key(name)
        kind = "hyper_lora" if name in lora else "hyper_adapter"
        if kind == "hyper_adapter":
            position = 0 if name in ff else 1  # HyperFormer ids: 0 feed-forward adapter, 1 attention adapter
        else:
            if (stack, key) not in positions:
                positions[(stack, key)] = 2 + sum(s == stack for s, _ in positions)
            position = positions[(stack, key)]
        sites.append(Site(name, linears[name].in_features, linears[name].out_features, kind, stack, layer, position))
    return sites


def make_router(spec: MethodSpec, method: MethodConfig, n_tasks: int) -> nn.Module:
    heads, skills = method.n_heads or 1, method.n_skills
    if spec.router == "constant":
        return AverageRouter(1, 1)
    if spec.router == "task":
        return TaskRouter(n_tasks, heads, skills, method.router_temperature, method.straight_through,
                          spec.average_at_eval)
    return AllocationRouter(method.n_abstract_tasks, heads, skills, method.router_temperature,
                            method.straight_through, method.allocation_init_spread)


def _hyper_networks(sites: list[Site], method: MethodConfig, n_tasks: int) -> HyperLoader:
    stacks = {}
    for stack in dict.fromkeys(s.stack for s in sites):
        mine = [s for s in sites if s.stack == stack]
        lora = [s for s in mine if s.kind == "hyper_lora"]
        adapter_dims = sorted({s.d_out for s in mine if s.kind == "hyper_adapter"})
        if len(adapter_dims) > 1:
            raise OrchmoeError(f"hyperloader: adapter sites of the {stack} have different sizes {adapter_dims}")
        stacks[stack] = StackHyperNetwork(
            sites=[(s.layer, s.position) for s in mine], embedding_dim=method.task_embedding_dim,
            hidden_dim=method.hidden_dim, projected_dim=method.projected_dim, rank=method.rank,
            lora_in=sorted({s.d_in for s in lora}), lora_out=sorted({s.d_out for s in lora}),
            adapter_dim=adapter_dims[0] if adapter_dims else None, bottleneck=method.adapter_bottleneck or 1)
    return HyperLoader(n_tasks, method.task_embedding_dim, stacks)


def build(sites: list[Site], method: MethodConfig, n_tasks: int, hidden_size: int, slot: RoutingSlot,
          base_for: Callable[[Site], nn.Linear]) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """Wrappers per site name, and the model-level modules (task classifier or hypernetworks)."""
    spec = spec_of(method)
    alpha, heads = method.alpha, method.n_heads
    assert alpha is not None and heads is not None, "build() takes a resolved method (registry.resolve)"
    extras: dict[str, nn.Module] = {}
    wrappers: dict[str, nn.Module] = {}
    if spec.router == "hyper":
        hyper = _hyper_networks(sites, method, n_tasks)
        extras["hyper"] = hyper
        order = {stack: [s.name for s in sites if s.stack == stack] for stack in hyper.stacks}
        for s in sites:
            args = (base_for(s), hyper, s.stack, order[s.stack].index(s.name), slot)
            wrappers[s.name] = (HyperLoRALinear(*args, alpha=alpha, dropout=method.dropout)
                                if s.kind == "hyper_lora" else HyperAdapterLinear(*args))
        return wrappers, extras
    if spec.router == "orchmoe":
        extras["task_classifier"] = TaskClassifier(hidden_size, method.n_abstract_tasks, method.classifier_temperature)
    for s in sites:
        wrappers[s.name] = SkillLoRALinear(base_for(s), make_router(spec, method, n_tasks), slot, method.rank,
                                           alpha, method.n_skills, heads, method.dropout)
    return wrappers, extras


def install(base: nn.Module, wrappers: dict[str, nn.Module]) -> None:
    """Put each wrapper in place of the module it wraps."""
    for name, wrapper in wrappers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent_name) if parent_name else base, child, wrapper)
