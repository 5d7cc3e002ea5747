"""`orchmoe export`: a checkpoint as peft LoRA adapters or merged Hugging Face models (see ``core/model_export``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from orchmoe_cli.commands.common import resolve_target
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.paths import claim_new_directory

FORMATS = ("peft", "merged")


def export(checkpoint: str, to: str, tasks: list[str], all_tasks: bool, out: Path, recipe_path: str | Path | None,
           overrides: list[str]) -> dict[str, Any]:
    """Export ``checkpoint`` to ``out``; every option is checked before the model is loaded."""
    if to not in FORMATS:
        raise OrchmoeError(f"--to: '{to}' is not one of {', '.join(FORMATS)}")
    if tasks and all_tasks:
        raise OrchmoeError("--task and --all-tasks: give one of them")
    claim_new_directory(out, "--out", option=True)
    path, recipe = resolve_target(checkpoint, recipe_path, overrides)
    if path is None:
        raise OrchmoeError("none: the base model has nothing to export")
    from orchmoe_cli.adapters import load_adapted
    from orchmoe_cli.core.base_models import load_model
    from orchmoe_cli.core.model_export import export_model

    notes = {}
    if recipe.model.quantization != "none":  # adapters trained on a quantised base fold into its full weights
        notes["trained_on"] = f"the {recipe.model.quantization}-quantised base; exported for its unquantised weights"
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, quantization="none"))
    if recipe.model.dtype == "auto":  # export runs on the CPU: the same file whether or not a GPU is visible
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, dtype="float32"))
    loaded = load_model(recipe.model)
    model = load_adapted(loaded.model, path).eval()
    return export_model(model, loaded.tokenizer, path, recipe.model.name, to,  # type: ignore[arg-type]
                        None if all_tasks else tasks, out, notes)
