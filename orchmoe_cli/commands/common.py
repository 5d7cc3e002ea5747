"""What every command does first: read the recipe and check, before anything heavy is imported, that its
data can be found and the directories it will write can be written."""

from __future__ import annotations

from pathlib import Path

from orchmoe_cli.data.sources import resolve
from orchmoe_cli.fsutil import check_output_dir
from orchmoe_cli.recipe import Recipe, load_recipe


def load_checked(recipe_path: Path, overrides: list[str], writes: tuple[str, ...] = ()) -> Recipe:
    """The resolved recipe, with its data location and the output directories the command ``writes``
    (dotted fields) checked."""
    recipe = load_recipe(recipe_path, overrides)
    resolve(recipe.data)
    for field in writes:
        section, name = field.split(".")
        value = getattr(getattr(recipe, section), name)
        if value is not None:
            check_output_dir(value, field)
    return recipe
