"""`orchmoe prepare`: validate the recipe's task files and encode them into the cached Arrow dataset."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from orchmoe_cli.core.recipe_data import prepare_data
from orchmoe_cli.data.dataset_cache import Prepared
from orchmoe_cli.data.sources import resolve
from orchmoe_cli.data.tables import TableSource
from orchmoe_cli.data.tables import export_table as write_table
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.recipe import Recipe


def prepare(recipe: Recipe, console: Console) -> Prepared:
    """Encode (or find in the cache) the recipe's data for its model's tokenizer."""
    return prepare_data(recipe, console)


def export_table(recipe: Recipe, path: Path) -> int:
    """Write the recipe's SNI tasks as one table file (``--export-table``); returns the number of rows."""
    layout = resolve(recipe.data)
    if isinstance(layout, TableSource):
        raise OrchmoeError(f"{layout.origin} is already a table; --export-table writes SNI task files as one",
                           field="data.source")
    return write_table(layout, path)
