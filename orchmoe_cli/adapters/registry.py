"""Method name -> routing family and defaults: the one table every list of methods is derived from.

A row names its family through a function that imports it, so reading a recipe never imports torch; the
family class is imported the first time a model is built. (Rows are code: nothing a recipe or checkpoint
says is ever imported.) A new method is one family module
under ``adapters/`` plus one :func:`register` call (see ``adapters/README.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchmoe_cli.errors import OrchmoeError

if TYPE_CHECKING:
    from orchmoe_cli.adapters.family import RoutingFamily


@dataclass(frozen=True)
class MethodSpec:
    """Static facts about a method: its routing family and the defaults it takes from its paper."""

    family_source: type[RoutingFamily] | Callable[[], type[RoutingFamily]]  # the class, or a function importing it
    heads: int = 1  # default routing heads
    several_heads: bool | None = False  # False: exactly one head; True: more than one; None: any number
    heads_variant: str | None = None  # the sibling method with the other head count (poly <-> mhr), for messages
    average_at_eval: bool = False  # the mu variants: task routing in training, average of skills at evaluation
    average_of: str | None = None  # the method whose trained checkpoint this one averages (train.init_from)

    @property
    def family(self) -> type[RoutingFamily]:
        """The family class, imported on first use."""
        if isinstance(self.family_source, type):
            return self.family_source
        return self.family_source()

    @property
    def may_skip_parameters(self) -> bool:
        """A step may leave some trainable tensors unused (DDP must look for them)."""
        return self.family.may_skip_parameters


SPECS: dict[str, MethodSpec] = {}


def register(name: str, spec: MethodSpec) -> None:
    """Add a method; its name becomes valid in recipes and every method list at once."""
    if name in SPECS or name == "none":
        raise ValueError(f"method '{name}' is already registered")
    SPECS[name] = spec


def method_names() -> tuple[str, ...]:
    """Every recipe value of ``method.name``: ``none`` (the base model alone) and the registered methods."""
    return ("none", *SPECS)


def spec_of(name: str) -> MethodSpec:
    if name not in SPECS:
        raise OrchmoeError(f"'{name}' has no adapters to attach; choose one of {', '.join(SPECS)}",
                           field="method.name")
    return SPECS[name]


def _constant() -> type[RoutingFamily]:
    from orchmoe_cli.adapters.constant import ConstantRouting

    return ConstantRouting


def _task() -> type[RoutingFamily]:
    from orchmoe_cli.adapters.task_routing import TaskRouting

    return TaskRouting


def _orchmoe() -> type[RoutingFamily]:
    from orchmoe_cli.adapters.orchmoe import OrchMoERouting

    return OrchMoERouting


def _hyperloader() -> type[RoutingFamily]:
    from orchmoe_cli.adapters.hyperloader import HyperLoaderRouting

    return HyperLoaderRouting


register("lora", MethodSpec(_constant))
register("poly", MethodSpec(_task, heads_variant="mhr"))
register("mhr", MethodSpec(_task, heads=4, several_heads=True, heads_variant="poly"))
register("poly_mu", MethodSpec(_task, heads_variant="mhr", average_at_eval=True, average_of="poly"))
register("mhr_mu", MethodSpec(_task, heads=4, several_heads=True, heads_variant="poly_mu", average_at_eval=True,
                              average_of="mhr"))
register("orchmoe", MethodSpec(_orchmoe, several_heads=None))
register("hyperloader", MethodSpec(_hyperloader))
