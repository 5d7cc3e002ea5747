"""Where adapters go in a base model, and putting wrappers in place.

Targets default per architecture (attention and feed-forward linears) and can be overridden by
``method.target_modules``: a pattern matches a module whose full name equals it or ends with
``.pattern``, with shell-style globs (``wi*``). Families that place adapters differently (HyperLoader)
plan their own sites from the same helpers.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from torch import nn
from transformers import PreTrainedModel

from orchmoe_cli.errors import OrchmoeError

if TYPE_CHECKING:
    from orchmoe_cli.adapters.method_config import MethodConfig


@dataclass(frozen=True)
class Architecture:
    """Module names of one architecture family."""

    targets: tuple[str, ...]  # default skill-LoRA targets
    hyper_lora: tuple[str, ...]  # HyperLoader's default LoRA targets
    hyper_adapters: tuple[str, str]  # output projections of (self-attention, feed-forward)


_T5 = Architecture(("q", "k", "v", "o", "wi*", "wo"), ("SelfAttention.q", "SelfAttention.v", "EncDecAttention.q",
                                                "EncDecAttention.v"), ("SelfAttention.o", "DenseReluDense.wo"))
_LLAMA = Architecture(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                ("self_attn.q_proj", "self_attn.v_proj"), ("self_attn.o_proj", "mlp.down_proj"))
ARCHITECTURES: dict[str, Architecture] = {
    **dict.fromkeys(("t5", "mt5", "umt5"), _T5),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite"), _LLAMA),
}


@dataclass(frozen=True)
class Site:
    """One linear layer to wrap."""

    name: str
    d_in: int
    d_out: int
    kind: str = "skill"  # the planning family's label for what goes here
    stack: str = ""
    layer: int = 0
    position: int = 0


def matches(name: str, pattern: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


def linear_layers(base: nn.Module) -> dict[str, nn.Linear]:
    """Plain linears (not other subclasses, such as attention's own projections), and bitsandbytes' quantised
    ones (``model.quantization``), which compute ``x W^T + b`` like them."""
    return {name: m for name, m in base.named_modules()
            if type(m) is nn.Linear or (isinstance(m, nn.Linear) and type(m).__module__.startswith("bitsandbytes"))}


def architecture(base: PreTrainedModel, what: str) -> Architecture:
    """The base model's module names; ``what`` says what was looked up, for the error."""
    family = ARCHITECTURES.get(getattr(base.config, "model_type", ""))
    if family is None:
        raise OrchmoeError(f"no default {what} for model type "
                           f"'{base.config.model_type}'; list the modules to adapt", field="method.target_modules")
    return family


def select(linears: dict[str, nn.Linear], patterns: list[str] | tuple[str, ...], explicit: bool) -> list[str]:
    """Names of the linears matching any pattern; with ``explicit`` every pattern must match something."""
    if explicit:
        available = sorted({n.rsplit(".", 1)[-1] for n in linears})
        for pattern in patterns:
            if not any(matches(n, pattern) for n in linears):
                close = difflib.get_close_matches(pattern.rsplit(".", 1)[-1], available, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise OrchmoeError(f"'{pattern}' matches no linear layer of this model{hint}; "
                                   f"available: {', '.join(available)}", field="method.target_modules")
    chosen = [n for n in linears if any(matches(n, p) for p in patterns)]
    if not chosen:
        raise OrchmoeError(f"{', '.join(patterns)} match no linear layer of this model", field="method.target_modules")
    return chosen


def skill_sites(base: PreTrainedModel, method: MethodConfig) -> list[Site]:
    """The skill-LoRA sites of a resolved ``method``: its targets, each divisible into its routing heads."""
    linears = linear_layers(base)
    explicit = method.target_modules is not None
    names = select(linears, method.target_modules or architecture(base, "targets").targets, explicit)
    sites = [Site(n, linears[n].in_features, linears[n].out_features) for n in names]
    heads = method.n_heads or 1
    for site in sites:
        if site.d_in % heads or site.d_out % heads:
            raise OrchmoeError(f"{heads} must divide the input and output sizes of every adapted "
                               f"layer; {site.name} maps {site.d_in} -> {site.d_out}", field="method.n_heads")
    return sites


def install(base: nn.Module, wrappers: dict[str, nn.Module]) -> None:
    """Put each wrapper in place of the module it wraps."""
    for name, wrapper in wrappers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent_name) if parent_name else base, child, wrapper)
