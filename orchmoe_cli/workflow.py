"""The steps shared by commands: prepare the recipe's data for its model, evaluate a model."""

from __future__ import annotations

from rich.console import Console

from orchmoe_cli.data.prepare import Prepared, prepare
from orchmoe_cli.evaluate import EvalOutcome, run_evaluation
from orchmoe_cli.models import load_model, load_tokenizer
from orchmoe_cli.recipe import Recipe


def prepare_data(recipe: Recipe, source: str, console: Console) -> Prepared:
    """Encode the recipe's SNI data with its model's tokenizer (served from the cache when unchanged)."""
    info = load_tokenizer(recipe.model)
    return prepare(recipe.data, info.tokenizer, info.tokenizer_id, info.is_encoder_decoder, console=console)


def evaluate(recipe: Recipe, source: str, console: Console) -> EvalOutcome:
    """Evaluate the base model, or the adapter named by ``eval.checkpoint``, on the recipe's split."""
    prepared = prepare_data(recipe, source, console)
    loaded = load_model(recipe.model)
    model = loaded.model
    if recipe.eval.checkpoint is not None:
        from orchmoe_cli.adapters import load_adapted

        model = load_adapted(model, recipe.eval.checkpoint)
    model.eval()
    return run_evaluation(
        recipe, model, loaded.tokenizer, loaded.is_encoder_decoder, prepared.dataset[recipe.eval.split],
        prepared.manifest["content_hash"], source, console,
    )
