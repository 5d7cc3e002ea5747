"""What each recipe method is made of: router kind, defaults, and what it can do.

All methods share the skill-LoRA layer except HyperLoader; they differ in the router that
produces the (batch, heads, skills) weights. Defaults follow the papers (see docs/methods.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from orchmoe_cli.adapters.config import MethodConfig
from orchmoe_cli.errors import OrchmoeError

RouterKind = Literal["constant", "task", "orchmoe", "hyper"]


@dataclass(frozen=True)
class MethodSpec:
    """Static facts about a method."""

    router: RouterKind
    heads: int  # default routing heads
    average_at_eval: bool  # the mu variants: task router in training, average of skills at eval
    exportable: bool  # has an exact peft equivalent
    mergeable: bool  # a fixed routing folds into the base weights
    may_skip_parameters: bool = False  # a step may leave some trainable tensors unused (DDP must look for them)

    @property
    def needs_task_ids(self) -> bool:
        return self.router in ("task", "hyper")


SPECS: dict[str, MethodSpec] = {
    "lora": MethodSpec("constant", 1, False, True, True),
    "poly": MethodSpec("task", 1, False, True, True),
    "mhr": MethodSpec("task", 4, False, True, True),
    "poly_mu": MethodSpec("task", 1, True, False, True),
    "mhr_mu": MethodSpec("task", 4, True, False, True),
    "orchmoe": MethodSpec("orchmoe", 1, False, False, False),
    # generators of positions a base model lacks (e.g. cross-attention on decoder-only) get no gradient
    "hyperloader": MethodSpec("hyper", 1, False, False, False, may_skip_parameters=True),
}


def spec_of(method: MethodConfig) -> MethodSpec:
    if method.name not in SPECS:
        raise OrchmoeError(f"method.name: '{method.name}' has no adapters to attach; choose one of {', '.join(SPECS)}")
    return SPECS[method.name]


def resolve(method: MethodConfig, hidden_size: int) -> MethodConfig:
    """A copy with every method-dependent default filled in (rank stays as given)."""
    spec = spec_of(method)
    hyper = spec.router == "hyper"
    return dataclasses.replace(
        method,
        alpha=method.alpha if method.alpha is not None else (float(method.rank) if hyper else 1.0),
        n_heads=method.n_heads if method.n_heads is not None else spec.heads,
        n_skills=1 if spec.router in ("constant", "hyper") else method.n_skills,
        adapter_bottleneck=method.adapter_bottleneck or max(1, hidden_size // 32),
        train_layer_norms=method.train_layer_norms if method.train_layer_norms is not None else hyper,
    )

