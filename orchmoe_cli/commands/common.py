"""What every command does first: read the recipe and check, before anything heavy is imported, that its
data can be found and the directories it will write can be written."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

from orchmoe_cli.data.sources import resolve
from orchmoe_cli.errors import OrchmoeError, first_repeat
from orchmoe_cli.paths import claim_directory, claim_parent, user_path
from orchmoe_cli.recipe import Recipe, load_recipe, override_sets

RECIPE_FILE = "recipe.yaml"  # what training writes into every checkpoint
_OVERRIDE = re.compile(r"^([a-z_]+)(\.[a-z_]+)+=")  # section.field=value among prompts is an override
_SECTIONS = frozenset(section.name for section in dataclasses.fields(Recipe))


def claim_outputs(recipe: Recipe, command: str) -> Path:
    """The directory ``command`` writes, claimed (:mod:`orchmoe_cli.paths`) before anything heavy runs: train's run
    directory and adapt's sweep directory are theirs alone; eval only adds its ``eval-<name>/`` to its parent."""
    if command == "train":
        return claim_directory(recipe.output.dir, "output.dir", "train")
    if command == "adapt":
        return claim_directory(recipe.adapt_dir, "adapt.output_dir", "adapt")
    return claim_parent(recipe.eval_parent_dir, "eval.output_dir" if recipe.eval.output_dir else "output.dir")


def load_checked(recipe_path: str | Path, overrides: list[str], writes: str | None = None) -> Recipe:
    """The resolved recipe (every path field through the one resolver), with its data location and the directory
    the command ``writes`` (train, eval or adapt) checked."""
    recipe = load_recipe(recipe_path, overrides)
    resolve(recipe.data)
    if writes is not None:
        claim_outputs(recipe, writes)
    return recipe


def adapt_list_override(field: str, value: str | None, kind: type) -> str | None:
    """``--shots 16,64`` -> ``adapt.shots=[16, 64]`` (checked like any recipe field); None when not given."""
    if value is None:
        return None
    parts = [part.strip() for part in value.split(",")] if value.strip() else []
    if "" in parts:  # "16,,64" or "a," : a slip of the keyboard, not a list with one item fewer
        raise OrchmoeError(f"--{field}: '{value}' has an empty item; separate the items with single commas")
    try:
        items = [kind(part) for part in parts]
    except ValueError:
        raise OrchmoeError(f"--{field}: expected a comma-separated list of {kind.__name__}s, got '{value}'") from None
    return f"adapt.{field}=[{', '.join(map(str, items))}]"


def once(values: list[str] | None, option: str) -> None:
    """A repeatable option names each thing once: a repeat would be a row twice, or silently dropped."""
    twice = first_repeat(values or [])
    if twice is not None:
        raise OrchmoeError(f"{option}: '{twice}' is given twice; name each once")


def prompts_and_overrides(words: list[str]) -> tuple[list[str], list[str]]:
    """Split ``generate``'s words: ``section.field=value`` of a recipe section is an override (a misspelt field
    is then refused by the recipe loader); anything else, ``a.b=c`` too, is a prompt."""
    def is_override(word: str) -> bool:
        match = _OVERRIDE.match(word)
        return match is not None and match.group(1) in _SECTIONS

    return [w for w in words if not is_override(w)], [w for w in words if is_override(w)]


def with_option_overrides(overrides: Sequence[str], options: dict[str, str | None]) -> list[str]:
    """``overrides`` then the ones the command's options make (``{"--shots": "adapt.shots=[16]", ...}``, None for an
    option not given). An option and an override that set the same field is refused: which of the two should win is
    a guess, and the loser would be dropped without a word."""
    made = [(option, item) for option, item in options.items() if item is not None]
    for option, item in made:
        field = item.partition("=")[0]
        clash = next((given for given in overrides if override_sets(given, field)), None)
        if clash is not None:
            raise OrchmoeError(f"{option} and the override '{clash}' both set it; give it once", field=field)
    return [*overrides, *(item for _, item in made)]


def saved_recipe(checkpoint: Path, needs: str, overrides: Sequence[str] = ()) -> Recipe:
    """The recipe a checkpoint was trained with: ``recipe.yaml`` in it or the directory above. ``needs`` ends the
    error when there is none ("pass --recipe RECIPE ...")."""
    for candidate in (checkpoint / RECIPE_FILE, checkpoint.parent / RECIPE_FILE):
        if candidate.is_file():
            return load_recipe(candidate, overrides)
    raise OrchmoeError(f"{checkpoint}: no {RECIPE_FILE} in it or the directory above, so its base model is unknown; "
                       f"{needs}")


def checkpoint_recipe(checkpoint: Path | None, recipe_path: str | Path | None, overrides: list[str]) -> Recipe:
    """``--recipe`` when given (then the only source: the base model for ``none``), else the checkpoint's own."""
    if recipe_path is not None:
        return load_recipe(recipe_path, overrides)
    assert checkpoint is not None
    return saved_recipe(checkpoint, "pass --recipe RECIPE (the one it was trained with)", overrides)


def resolve_target(checkpoint: str, recipe_path: str | Path | None, overrides: list[str]) -> tuple[Path | None, Recipe]:
    """(the checkpoint, or None for the base model, and the recipe to use)."""
    if recipe_path is not None:  # checked before the checkpoint is looked for
        user_path(recipe_path, "--recipe", option=True)
    if checkpoint.strip().lower() == "none":
        if recipe_path is None:
            raise OrchmoeError("none: the base model needs --recipe RECIPE to say which model and prompt format")
        return None, checkpoint_recipe(None, recipe_path, overrides)
    from orchmoe_cli.core.checkpoint import find_checkpoint  # torch: only once a checkpoint is needed

    path = find_checkpoint(checkpoint, how_to_train="orchmoe train RECIPE")  # an empty one is refused
    return path, checkpoint_recipe(path, recipe_path, overrides)
