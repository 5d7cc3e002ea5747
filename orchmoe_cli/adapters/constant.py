"""One shared LoRA (the multi-task baseline, and `adapt`'s LoRA from scratch): every input gets the same single
skill, so there is nothing to route, it folds into the base weights, and it exports as a plain peft LoRA."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from orchmoe_cli.adapters.family import AdaptMode, RoutingFamily

if TYPE_CHECKING:
    from orchmoe_cli.adapters.method_config import MethodConfig
    from orchmoe_cli.adapters.model import AdaptedModel


class ConstantRouting(RoutingFamily):
    """lora."""

    adapt_modes: ClassVar[dict[str, AdaptMode]] = {
        "lora": AdaptMode(("lora",), ("adapters",)),  # the shared multi-task LoRA trains on
    }

    def resolve(self, method: MethodConfig, hidden_size: int) -> MethodConfig:
        return dataclasses.replace(super().resolve(method, hidden_size), n_skills=1)

    def export_peft(self, model: AdaptedModel, directory: Path) -> None:
        from orchmoe_cli.adapters.peft_interop import export_lora  # peft is imported only when exporting

        export_lora(model, directory)
