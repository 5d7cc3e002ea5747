"""`orchmoe prepare`: validate the recipe's task files and encode them into the cached Arrow dataset."""

from __future__ import annotations

from rich.console import Console

from orchmoe_cli.core.recipe_data import prepare_data
from orchmoe_cli.data.dataset_cache import Prepared
from orchmoe_cli.recipe import Recipe


def prepare(recipe: Recipe, console: Console) -> Prepared:
    """Encode (or find in the cache) the recipe's data for its model's tokenizer."""
    return prepare_data(recipe, console)
