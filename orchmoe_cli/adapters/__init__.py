"""Adapters: the skill-LoRA layer, one module per routing family, the registry, and their injection into a base model.

Public API: ``attach_adapters`` (new adapters on a base model), ``load_adapted`` (a saved orchmoe
or peft LoRA/Poly checkpoint), and the returned ``AdaptedModel``. They are imported on first use,
so that reading a recipe (which needs only ``MethodConfig``) never waits for torch to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchmoe_cli.adapters.method_config import MethodConfig

if TYPE_CHECKING:
    from orchmoe_cli.adapters.loading import load_adapted
    from orchmoe_cli.adapters.model import AdaptedModel, attach_adapters

__all__ = ["AdaptedModel", "MethodConfig", "attach_adapters", "load_adapted"]


def __getattr__(name: str) -> Any:
    if name in ("AdaptedModel", "attach_adapters"):
        from orchmoe_cli.adapters import model

        return getattr(model, name)
    if name == "load_adapted":
        from orchmoe_cli.adapters.loading import load_adapted

        return load_adapted
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
