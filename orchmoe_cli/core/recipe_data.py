"""The recipe's data, encoded with its model's tokenizer: the first step of every command that reads data."""

from __future__ import annotations

from rich.console import Console

from orchmoe_cli.core.base_models import load_tokenizer
from orchmoe_cli.data.dataset_cache import Prepared, prepare
from orchmoe_cli.recipe import Recipe


def prepare_data(recipe: Recipe, console: Console) -> Prepared:
    """Encode the recipe's SNI data with its model's tokenizer (served from the cache when unchanged)."""
    info = load_tokenizer(recipe.model)
    return prepare(recipe.data, info.tokenizer, info.tokenizer_id, info.is_encoder_decoder, console=console)
