"""Rules 1 and 2 of docs/reliability.md: every path goes through one resolver, and no command writes over what a user
made or another command owns. The field rule walks the recipe schema, so a path field added later is covered (or
this test says it is unmarked)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest
from cli_runner import run_cli

from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.paths import PATH_KINDS, claim_directory, claim_file, claim_new_directory
from orchmoe_cli.recipe import Recipe, load_recipe

# words that mark a field as holding a path; such a field must say which kind (``path`` metadata)
PATHLIKE = ("dir", "file", "checkpoint", "source", "init_from", "split")
NOT_PATHS = {"data.columns.split", "data.hub_split"}  # a column name, a hub dataset's split


def schema_fields(cls: type = Recipe, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted name, field, type hint) of every leaf field of the recipe schema."""
    found = []
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[spec.name]):
            found += schema_fields(hints[spec.name], f"{prefix}{spec.name}.")
        else:
            found.append((f"{prefix}{spec.name}", spec, hints[spec.name]))
    return found


PATH_FIELDS = [(name, spec.metadata["path"]) for name, spec, _ in schema_fields() if "path" in spec.metadata]


def test_every_field_that_names_a_path_is_marked() -> None:
    for name, spec, hint in schema_fields():
        if hint not in (str, str | None) or name in NOT_PATHS:  # free text only: not choices, numbers or lists
            continue
        text = f"{name} {spec.metadata.get('help', '')}".lower()
        if any(word in name for word in PATHLIKE) or "directory" in text:
            assert spec.metadata.get("path") in PATH_KINDS, f"{name} looks like a path but has no path kind"
    assert {"output.dir", "eval.output_dir", "adapt.output_dir", "data.cache_dir", "model.cache_dir",
            "train.init_from", "eval.checkpoint", "adapt.checkpoint", "data.source"} <= dict(PATH_FIELDS).keys()


def _value(recipe: Recipe, dotted: str) -> Any:
    section, *rest = dotted.split(".")
    value: Any = getattr(recipe, section)
    for part in rest:
        value = getattr(value, part)
    return value


@pytest.mark.parametrize(("field", "kind"), PATH_FIELDS, ids=[name for name, _ in PATH_FIELDS])
def test_every_path_field_goes_through_the_resolver(field: str, kind: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ORCHMOE_TEST_PLACE", str(tmp_path / "place"))
    monkeypatch.delenv("ORCHMOE_TEST_UNSET", raising=False)
    assert _value(load_recipe(None, [f"{field}=~/runs/g01"]), field) == str(tmp_path / "home" / "runs" / "g01")
    for spelling in ("${ORCHMOE_TEST_PLACE}/x", "$ORCHMOE_TEST_PLACE/x"):
        assert _value(load_recipe(None, [f"{field}={spelling}"]), field) == str(tmp_path / "place" / "x")
    refusals = {"${ORCHMOE_TEST_UNSET}/x": "environment variable ORCHMOE_TEST_UNSET is not set",
                "''": "is empty", "a\x00b": "NUL byte", "d/" + "n" * 300: "bytes long"}
    if kind == "dir":
        (tmp_path / "afile").write_text("mine")
        refusals[str(tmp_path / "afile")] = "is a file"
        refusals[str(tmp_path / "afile" / "below")] = "is a file"
    for value, message in refusals.items():
        with pytest.raises(OrchmoeError, match=message) as caught:
            load_recipe(None, [f"{field}={value}"])
        assert caught.value.field == field and "\n" not in str(caught.value)


def test_claims_never_write_over_a_checkpoint_another_command_or_a_user(tmp_path: Path) -> None:
    step = tmp_path / "run" / "checkpoints" / "step-000002"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text("{}")
    (step / "adapter_config.json").write_text("{}")
    (tmp_path / "run" / "train_summary.json").write_text("{}")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "recipe.yaml").write_text("# my notes\n")
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text("{}")
    cases = [(step, "adapt", "inside the saved checkpoint"), (step / "below", "eval", "inside the saved checkpoint"),
             (tmp_path / "run", "adapt", "holds the output of `orchmoe train`"),
             (sweep, "train", "holds the output of `orchmoe adapt`"),
             (tmp_path / "mine", "train", "holds files orchmoe did not write")]
    for path, command, message in cases:
        with pytest.raises(OrchmoeError, match=message):
            claim_directory(path, "x.dir", command)
    assert claim_directory(tmp_path / "run", "output.dir", "train") == tmp_path / "run"  # its own run
    assert claim_directory(sweep, "adapt.output_dir", "adapt") == sweep
    assert claim_directory(tmp_path / "new" / "deeper", "output.dir", "train").parent == tmp_path / "new"
    with pytest.raises(OrchmoeError, match="inside the saved checkpoint"):
        claim_file(step / "answers.jsonl", "--output", option=True)
    with pytest.raises(OrchmoeError, match="is a directory"):
        claim_file(tmp_path / "mine", "--output", option=True)
    with pytest.raises(OrchmoeError, match="not empty"):
        claim_new_directory(tmp_path / "mine", "--out", option=True)
    assert (tmp_path / "mine" / "recipe.yaml").read_text() == "# my notes\n"


def test_recipe_path_and_options_use_the_resolver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "r.yaml").write_text("model: {name: tiny-llama}\noutput: {dir: ~/runs/x}\n")
    assert run_cli(["train", "~/r.yaml", "--show-config"]) == 0
    assert f"dir: {tmp_path / 'runs' / 'x'}" in capsys.readouterr().out
    (tmp_path / "afile").write_text("mine")
    for argv, message in [(["inspect-routing", str(tmp_path / "nothing"), "--out", "''"], "not"),
                          (["export", str(tmp_path), "--to", "peft", "--out", str(tmp_path / "afile")], "is a file"),
                          (["generate", "none", "hi", "--recipe", "~/r.yaml", "--output", str(tmp_path)],
                           "is a directory")]:
        assert run_cli(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_no_rerun_takes_a_users_file_with_it(tmp_path: Path) -> None:
    """A file the user left in a report folder a command replaces whole, or an existing file named as an output,
    is refused, never replaced."""
    report = tmp_path / "routing-step-000003"
    report.mkdir()
    (report / "routing.json").write_text("{}")
    (report / "heatmap.png").write_bytes(b"png")
    assert claim_directory(report, "--out", "inspect-routing", option=True) == report  # its own report only
    (report / "my_notes.md").write_text("mine")
    with pytest.raises(OrchmoeError, match=r"did not write \(my_notes.md\)"):
        claim_directory(report, "--out", "inspect-routing", option=True)
    (tmp_path / "answers.jsonl").write_text("mine")
    with pytest.raises(OrchmoeError, match="already exists"):
        claim_file(tmp_path / "answers.jsonl", "--output", option=True)
    assert (tmp_path / "answers.jsonl").read_text() == "mine"


def test_labels_are_told_apart_without_taking_another_name() -> None:
    from orchmoe_cli.fsutil import distinct, unique_names

    assert distinct(["a", "a", "a#2"]) == ["a", "a#3", "a#2"]
    assert unique_names(["x y", "x_y", "x_y-2"]) == ["x_y", "x_y-3", "x_y-2"]


@pytest.mark.parametrize("argv", [
    ["train", ""], ["prepare", "{recipe}", "--export-table", ""], ["inspect-routing", ""],
    ["inspect-routing", "{run}", "--out", ""], ["inspect-routing", "{run}", "--data", ""], ["generate", "", "hi"],
    ["generate", "{run}", "hi", "--recipe", ""], ["export", "{run}", "--to", "peft", "--out", ""],
    ["compare", "", "{run}"],
])
def test_an_empty_path_argument_is_refused_not_read_as_this_folder(argv: list[str], tmp_path: Path, capsys) -> None:
    """An empty path is not the current folder (typer's Path('') is '.'): every path argument says it is empty."""
    from cli_runner import run_cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: tiny-llama}\n")
    filled = [a.replace("{recipe}", str(recipe)).replace("{run}", str(tmp_path)) for a in argv]
    assert run_cli(filled) == 2
    err = capsys.readouterr().err
    assert "is empty" in err and len(err.strip().splitlines()) == 1, err


def test_no_command_line_parameter_becomes_a_path_before_the_resolver() -> None:
    """typer turns a ``Path`` parameter's '' into '.', so an empty path would pass as the current folder: every
    command-line parameter is text, and each path among them goes through ``user_path`` (rows above)."""
    import pathlib

    import typer

    from orchmoe_cli.cli import app

    def mentions_path(hint: object) -> bool:
        return hint is pathlib.Path or any(mentions_path(arg) for arg in typing.get_args(hint))

    commands = typer.main.get_command(app).commands
    assert len(commands) >= 8
    for name, command in commands.items():
        hints = typing.get_type_hints(command.callback, include_extras=True)
        assert not [p for p, hint in hints.items() if mentions_path(hint)], name
