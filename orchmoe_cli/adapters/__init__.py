"""The adapter family: skill-LoRA layers, routers, hypernetworks and their injection into a base model.

Public API: ``attach_adapters`` (new adapters on a base model), ``load_adapted`` (a saved orchmoe
or peft LoRA/Poly checkpoint), and the returned ``AdaptedModel``.
"""

from orchmoe_cli.adapters.config import METHOD_NAMES, MethodConfig
from orchmoe_cli.adapters.loading import load_adapted
from orchmoe_cli.adapters.model import AdaptedModel, attach_adapters

__all__ = ["METHOD_NAMES", "AdaptedModel", "MethodConfig", "attach_adapters", "load_adapted"]
