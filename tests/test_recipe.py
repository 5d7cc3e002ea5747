"""Strict recipe loading: defaults, overrides, and one clear error line for bad recipes."""

from pathlib import Path

import pytest
import yaml

from orchmoe_cli.cli import main
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.recipe import Recipe, dump_recipe, field_help, load_recipe

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides() -> None:
    recipe = load_recipe(None, ["eval.max_instances=20", "model.name=tiny-t5", "data.languages=[English, German]"])
    assert isinstance(recipe, Recipe)
    assert recipe.eval.max_instances == 20
    assert recipe.model.name == "tiny-t5"
    assert recipe.data.languages == ["English", "German"]


def test_every_shipped_recipe_loads() -> None:
    recipes = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if p.parent.name != "accelerate")
    assert len(recipes) >= 10
    for path in recipes:
        text = path.read_text()
        assert text.startswith("#") and "orchmoe " in text.split("\n\n")[0], f"{path.name}: header must show the command"
        load_recipe(path)


def test_dump_roundtrip(tmp_path: Path) -> None:
    recipe = load_recipe(None, ["eval.batch_size=3", "data.num_pos_examples=0"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_recipe(recipe))
    assert load_recipe(path) == recipe


def test_float_fields_accept_yaml_exponent_strings(tmp_path: Path) -> None:
    # PyYAML reads `1e-3` (no dot) as a string; float fields still accept it
    from dataclasses import dataclass, field

    from orchmoe_cli.recipe import build

    @dataclass
    class Section:
        lr: float = field(default=0.1, metadata={"help": "learning rate", "min": 0, "min_exclusive": True})

    assert build(Section, {"lr": "1e-3"}, "x.yaml").lr == pytest.approx(1e-3)
    with pytest.raises(OrchmoeError, match="x.yaml: lr: must be > 0"):
        build(Section, {"lr": 0}, "x.yaml")


def test_field_help_covers_every_field() -> None:
    rows = field_help()
    assert all(help_text for _, _, help_text in rows), [name for name, _, h in rows if not h]
    assert "eval.max_instances" in {name for name, _, _ in rows}


BAD_RECIPES = [
    ("trian:\n  seed: 1\n", "trian: unknown key (did you mean 'train'?)"),
    ("eval:\n  max_instance: 3\n", "eval.max_instance: unknown key (did you mean 'max_instances'?)"),
    ("eval:\n  batch_size: eight\n", "eval.batch_size: expected an integer"),
    ("eval:\n  max_instances: -1\n", "eval.max_instances: must be >= 1"),
    ("data:\n  max_source_length: 0\n", "data.max_source_length: must be >= 8"),
    ("data:\n  add_definition: maybe\n", "data.add_definition: expected true or false"),
    ("eval:\n  split: dev\n", "eval.split: 'dev' is not one of test, train"),
    ("data:\n  languages: English\n", "data.languages: expected a list"),
    ("- a\n- b\n", "a recipe must be a YAML mapping"),
    ("data: [unclosed\n", "invalid YAML"),
    ("data: !!python/object/apply:os.system ['echo hi']\n", "invalid YAML"),
    ("eval: 5\n", "eval: expected a mapping"),
    ("model:\n  dtype: float64\n", "model.dtype: 'float64' is not one of"),
    ("model:\n  tiny:\n    hidden_size: 64\n    num_heads: 3\n", "model.tiny.num_heads: must divide hidden_size"),
    ("method:\n  name: polly\n", "method.name: 'polly' is not one of"),
    ("output:\n  dir: [a, b]\n", "output.dir: expected a string"),
]


@pytest.mark.parametrize(("text", "message"), BAD_RECIPES, ids=[m.split(":")[0] for _, m in BAD_RECIPES])
def test_bad_recipe_exits_2_with_one_line(text: str, message: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert str(path) in err and message in err, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prepare", "missing.yaml"], "missing.yaml: recipe file not found"),
        (["prepare", "RECIPE", "eval.max_instances"], "expected section.field=value"),
        (["prepare", "RECIPE", "eval.max_instancs=3"], "eval.max_instancs (set on the command line): unknown key (did you mean 'max_instances'?)"),
        (["prepare", "RECIPE", "--no-such-flag"], "No such option"),
        (["evaluate", "RECIPE"], "No such command"),
    ],
)
def test_bad_command_lines_exit_2(args: list[str], message: str, tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "ok.yaml"
    recipe.write_text("eval:\n  max_instances: 2\n")
    with pytest.raises(SystemExit) as exit_info:
        main([str(recipe) if a == "RECIPE" else a for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_show_config_prints_resolved_recipe(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "ok.yaml"
    recipe.write_text("eval:\n  max_instances: 2\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(recipe), "eval.batch_size=3", "--show-config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "max_instances: 2" in out and "batch_size: 3" in out


def test_shipped_recipes_name_their_data_by_a_documented_place_only() -> None:
    """Data comes from 'bundled', ${ORCHMOE_SNI_DIR}, or a table the recipe's own header makes from the bundled
    sample (``--export-table``), never a path beside the repository."""
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        if path.parent.name == "accelerate":
            continue
        data = yaml.safe_load(path.read_text(encoding="utf-8"))["data"]  # as written, before ${VAR} is expanded
        made_here = f"--export-table {data['source']}" in path.read_text(encoding="utf-8")
        assert data["source"] in ("bundled", "${ORCHMOE_SNI_DIR}") or made_here, f"{path.name}: {data['source']}"
        if data.get("split_dir") is not None:
            assert (REPO / data["split_dir"]).is_dir(), f"{path.name}: data.split_dir {data['split_dir']}"


def test_data_location_from_an_environment_variable(sni_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchmoe_cli.data.sni import resolve_source
    from orchmoe_cli.errors import OrchmoeError

    monkeypatch.delenv("ORCHMOE_TEST_SNI", raising=False)
    with pytest.raises(OrchmoeError, match=r"data.source \(set on the command line\): environment variable ORCHMOE_TEST_SNI is not set"):
        load_recipe(None, ["data.source=${ORCHMOE_TEST_SNI}/sni"])
    monkeypatch.setenv("ORCHMOE_TEST_SNI", str(sni_dir.parent))
    recipe = load_recipe(None, ["data.source=${ORCHMOE_TEST_SNI}/sni"])
    assert recipe.data.source == str(sni_dir)  # expanded once, when the recipe is read
    assert resolve_source(recipe.data).tasks["train"][0] == "task001_alpha_qa"


def test_unset_data_variable_fails_fast_in_one_line(tmp_path: Path) -> None:
    """The CLI reports it before importing torch (no model or tokenizer is loaded first)."""
    import os
    import subprocess
    import sys

    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  source: ${ORCHMOE_TEST_UNSET}\n", encoding="utf-8")
    code = ("import sys\nfrom orchmoe_cli.cli import main\ntry:\n    main(['prepare', sys.argv[1]])\n"
            "except SystemExit as exc:\n    print(exc.code, 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "ORCHMOE_TEST_UNSET"}
    result = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, env=env)
    assert result.stdout.split() == ["2", "False"], result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and f"{recipe}: data.source: environment variable" in result.stderr


def test_readme_methods_table_lists_exactly_the_registered_methods() -> None:
    """The registry is the one list of methods: the README's table names each of them once, and no other."""
    import re

    from orchmoe_cli.adapters.registry import method_names

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| `method.name` |"):].split("\n\n", 1)[0].splitlines()[2:]
    named = [name for row in table for name in re.findall(r"`([a-z_]+)`", row.split("|")[1])]
    assert sorted(named) == sorted(method_names()), named


def test_a_mapping_override_sets_the_fields_it_names_and_keeps_the_others(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("eval: {max_instances: 1, max_new_tokens: 2}\nmodel: {name: tiny-llama, tiny: {num_layers: 3}}\n")
    recipe = load_recipe(path, ["eval={num_beams: 2}", "model={tiny: {hidden_size: 48}}"])
    assert (recipe.eval.max_instances, recipe.eval.max_new_tokens, recipe.eval.num_beams) == (1, 2, 2)
    assert (recipe.model.tiny.num_layers, recipe.model.tiny.hidden_size) == (3, 48)
    assert load_recipe(path, ["eval={}"]).eval.max_instances == 1  # an empty mapping changes nothing
    assert load_recipe(path, ["method.target_modules=[q_proj]"]).method.target_modules == ["q_proj"]  # lists replace


def _list_fields(cls: type, prefix: str = "") -> list[tuple[str, type]]:
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    found = []
    for spec in dataclasses.fields(cls):
        hint = hints[spec.name]
        if dataclasses.is_dataclass(hint):
            found += _list_fields(hint, f"{prefix}{spec.name}.")
            continue
        lists = [h for h in (hint, *typing.get_args(hint)) if typing.get_origin(h) is list]
        if lists:
            found.append((f"{prefix}{spec.name}", typing.get_args(lists[0])[0]))
    return found


def test_every_list_field_refuses_an_item_twice() -> None:
    """Every list of a recipe names a set (tasks, steps, seeds, modules, trackers): an item twice is refused when
    the recipe is read, naming the field."""
    fields = _list_fields(Recipe)
    assert len(fields) >= 9
    for dotted, item in fields:
        value = "[1, 1]" if item is int else "[same, same]"
        with pytest.raises(OrchmoeError, match="is listed twice") as info:
            load_recipe(None, [f"{dotted}={value}"])
        assert info.value.field == dotted


@pytest.mark.parametrize(("overrides", "words"), [
    (["train.steps=3", "train.steps=5"], "train.steps.*given twice \\('train.steps=3' and 'train.steps=5'\\)"),
    (["eval={max_instances: 5}", "eval.max_instances=6"], "eval.max_instances.*given twice"),
    (["eval={max_instances: 5, max_instances: 6}"], "key 'max_instances' repeats"),
    ([".steps=3"], "expected section.field=value"),
    (["train..steps=3"], "expected section.field=value"),
    (["eval.tasks=[]"], "eval.tasks.*is empty"),
])
def test_a_field_is_set_once_on_the_command_line(overrides: list[str], words: str) -> None:
    with pytest.raises(OrchmoeError, match=words):
        load_recipe(None, overrides)
    assert load_recipe(None, ["eval={max_instances: 5}", "eval.batch_size=3"]).eval.batch_size == 3


def _repeatable_options() -> list[tuple[str, list[str]]]:
    """(option, a command line that gives it twice) for every repeatable option of every command."""
    import typer

    from orchmoe_cli.cli import app

    found = []
    for name, command in typer.main.get_command(app).commands.items():
        needed = [name]
        for param in command.params:
            if param.required and param.param_type_name == "argument" and param.nargs == 1:
                needed.append("x")
            elif param.required and param.param_type_name == "option":
                needed += [param.opts[0], "y"]
        found += [(f"{name} {p.opts[0]}", [*needed, p.opts[0], "a", p.opts[0], "a"])
                  for p in command.params if getattr(p, "multiple", False)]
    return found


def test_every_repeatable_option_names_each_thing_once(capsys) -> None:
    """Walk every repeatable option of every command: a value given twice (a row twice, or one silently dropped)
    is refused in one line before anything is read."""
    from cli_runner import run_cli

    options = _repeatable_options()
    assert {option for option, _ in options} >= {"inspect-routing --task", "inspect-routing --layer", "export --task"}
    for option, argv in options:
        assert run_cli(argv) == 2, option
        err = capsys.readouterr().err
        assert "is given twice; name each once" in err and len(err.strip().splitlines()) == 1, (option, err)
