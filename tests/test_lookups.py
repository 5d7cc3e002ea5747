"""Every "not found" looks one level up and one level down, and prompt files read as their suffix says.

A checkpoint argument uses the checkpoint found beside it (the one a file lies inside, the newest one of a
``checkpoints/`` folder or of the one run a folder holds); a recipe file or ``data.source`` that is not where it
was given is never replaced in silence: the one-line error names what lies one level up or down. "Train one
first" is said only when no checkpoint is near.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cli_runner import run_cli
from conftest import write_sni_dir
from test_train import write_recipe

from orchmoe_cli.commands.common import prompts_and_overrides
from orchmoe_cli.commands.generate import read_prompts
from orchmoe_cli.core.checkpoint import find_checkpoint
from orchmoe_cli.data.sources import resolve
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.recipe import load_recipe

STEP = "step-000002"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/ni`` (an SNI directory), ``root/one/run`` (a two-step tiny poly run) and its recipe
    ``root/one/r.yaml``, ``root/two/{a,b}`` (two copies of the run) and an empty ``root/empty``."""
    root = tmp_path_factory.mktemp("lookups")
    sni = write_sni_dir(root / "ni")
    (root / "one").mkdir()
    recipe = write_recipe(root / "one" / "r.yaml", sni, root / "one" / "run", "tiny-t5", "poly", steps=2,
                          warmup_steps=0)
    assert run_cli(["train", str(recipe)]) == 0
    for copy in ("a", "b"):
        shutil.copytree(root / "one" / "run", root / "two" / copy)
    (root / "empty").mkdir()
    (root / "one" / "run" / "notes").mkdir()
    return root


@pytest.mark.parametrize("given", [
    "one/run",  # a run directory: its newest complete checkpoint
    "one/run/checkpoints",  # a checkpoints/ folder: its newest complete step (one level down)
    f"one/run/checkpoints/{STEP}",
    f"one/run/checkpoints/{STEP}/tasks.json",  # one level up: the checkpoint a file lies inside
    f"one/run/checkpoints/{STEP}/adapter_model.safetensors",
    f"one/run/checkpoints/{STEP}/training_state",
    "one",  # a folder holding one run
])
def test_a_checkpoint_argument_finds_the_checkpoint_beside_it(tree: Path, given: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree)
    assert find_checkpoint(Path(given)) == Path("one/run/checkpoints") / STEP
    assert find_checkpoint(tree / given, "eval.checkpoint") == tree / "one/run/checkpoints" / STEP


@pytest.mark.parametrize("given, expected", [
    ("one/run/checkpoints/step-000009", "does not exist (did you mean 'step-000002'?)"),
    ("one/rn", "does not exist (did you mean 'run'?)"),
    ("one/run/notes", "holds no adapter checkpoint; one/run holds checkpoints: did you mean it?"),
    ("one/r.yaml", "is a file, not an adapter checkpoint; one/run holds checkpoints: did you mean it?"),
    ("two", "is no run directory, and 2 below it hold checkpoints (a, b): name one"),
    ("empty", "holds no adapter checkpoint; train one first (orchmoe train r.yaml)"),
    ("nowhere", "does not exist; train one first (orchmoe train r.yaml)"),
])
def test_no_checkpoint_names_what_is_near_and_says_train_only_when_nothing_is(
        tree: Path, given: str, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree)
    with pytest.raises(OrchmoeError) as caught:
        find_checkpoint(Path(given), "eval.checkpoint", "orchmoe train r.yaml")
    assert caught.value.field == "eval.checkpoint"
    assert str(caught.value).startswith(f"eval.checkpoint: {given} {expected}")


def test_a_few_shot_sweep_names_its_cells_adapters_not_the_run_above(tree: Path, tmp_path: Path) -> None:
    """A sweep's output (or its cells/ folder) holds the cells' adapters a level or two down; the run above is the
    checkpoint before adaptation, so it is not offered."""
    sweep = tmp_path / "run" / "adapt"
    shutil.copytree(tree / "one" / "run" / "checkpoints", tmp_path / "run" / "checkpoints")
    sweep.mkdir()
    (sweep / "sweep.json").write_text("{}")
    for target in (sweep, sweep / "cells"):
        (sweep / "cells").mkdir(exist_ok=True)
        with pytest.raises(OrchmoeError, match="few-shot sweep's output: its cells keep their adapters only with"):
            find_checkpoint(target)
    adapter = sweep / "cells" / "task-lora-k2-s1" / "adapter"
    shutil.copytree(tree / "one" / "run" / "checkpoints" / STEP, adapter)
    for target in (sweep, sweep / "cells"):
        with pytest.raises(OrchmoeError, match=f"holds 1 few-shot cell adapter\\(s\\) \\({adapter}\\): name one"):
            find_checkpoint(target)


def test_checkpoint_commands_take_a_file_inside_a_checkpoint_and_refuse_in_one_line(tree: Path, tmp_path: Path,
                                                                                    capsys) -> None:
    out = tmp_path / "exported"
    assert run_cli(["export", str(tree / "one/run/checkpoints" / STEP / "tasks.json"), "--to", "peft",
                    "--task", "task001_alpha_qa", "--out", str(out)]) == 0
    assert (out / "orchmoe_export.json").is_file()
    assert run_cli(["export", str(tree / "two"), "--to", "peft", "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "name one" in err and "train one first" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "refused").exists()


def _recipe_dir(root: Path) -> Path:
    holder = root / "recipes"
    (holder / "sub").mkdir(parents=True, exist_ok=True)
    (holder / "many").mkdir(exist_ok=True)
    (holder / "single").mkdir(exist_ok=True)
    for path in (holder / "r.yaml", holder / "many/a.yaml", holder / "many/b.yml", holder / "single/only.yaml"):
        path.write_text("model: {name: tiny-t5}\n")
    return holder


@pytest.mark.parametrize("cwd, given, expected", [
    (".", "r.yaml", "r.yaml: recipe file not found; recipes/r.yaml exists: did you mean it?"),  # one level down
    ("recipes/sub", "r.yaml", "r.yaml: recipe file not found; ../r.yaml exists: did you mean it?"),  # one up
    ("recipes", "r.yml", "r.yml: recipe file not found (did you mean 'r.yaml'?)"),
    ("recipes", "many", "many: is a directory; it holds a.yaml, b.yml: name one"),
    ("recipes", "single", "single: is a directory; it holds only.yaml: did you mean single/only.yaml?"),
    ("recipes/sub", "other.yaml", "other.yaml: recipe file not found"),
])
def test_a_missing_recipe_names_the_one_near_without_using_it(tmp_path: Path, cwd: str, given: str, expected: str,
                                                              monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(_recipe_dir(tmp_path).parent / cwd)
    assert run_cli(["prepare", given]) == 2
    assert capsys.readouterr().err.strip() == f"error: {expected}"


def _source_error(source: Path, *overrides: str) -> str:
    with pytest.raises(OrchmoeError) as caught:
        resolve(load_recipe(None, [f"data.source={source}", *overrides]).data)
    assert caught.value.field == "data.source"
    return str(caught.value)


@pytest.mark.parametrize("source, overrides, expected", [
    ("ni/tasks", (), ("'{root}/ni/tasks' is the task folder of the SNI directory '{root}/ni'; "
                      "did you mean data.source={root}/ni?")),
    ("ni/tasks", ("data.format=sni",), "is the task folder of the SNI directory '{root}/ni'"),
    ("ni/tasks/task001_alpha_qa.json", (), "is a task file of the SNI directory '{root}/ni'"),
    (".", ("data.format=sni",), ("no split file train_tasks.txt in {root} or {root}/splits/default; "
                                 "{root}/ni holds them: did you mean data.source={root}/ni?")),
    ("nii", (), "directory '{root}/nii' not found (did you mean 'ni'?)"),
], ids=["tasks-folder", "tasks-folder-sni", "task-file", "one-level-down", "close-name"])
def test_data_source_names_the_sni_directory_up_or_down(tree: Path, source: str, overrides: tuple[str, ...],
                                                        expected: str) -> None:
    given = tree if source == "." else tree / source
    assert expected.format(root=tree) in _source_error(given, *overrides)


def test_a_task_folder_with_its_split_directory_is_a_complete_source(tree: Path) -> None:
    overrides = [f"data.source={tree / 'ni/tasks'}", f"data.split_dir={tree / 'ni'}", "data.format=sni"]
    layout = resolve(load_recipe(None, overrides).data)
    assert layout.tasks["train"][0] == "task001_alpha_qa"


def test_prepare_refuses_a_task_folder_in_one_line(tree: Path, capsys) -> None:
    assert run_cli(["prepare", str(tree / "one/r.yaml"), f"data.source={tree / 'ni/tasks'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tree / 'one/r.yaml'}: data.source (set on the command line): ")
    assert f"data.source={tree / 'ni'}?" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("name, content, expected", [
    ("p.txt", "[INST] hi [/INST]\n{not json}\n\n", ["[INST] hi [/INST]", "{not json}"]),  # text whatever it starts with
    ("p.csv", "\ufeffinput,id\nfirst,a\n", ["first"]),  # Excel's "CSV UTF-8" starts with a byte-order mark
    ("p.tsv", "\ufeffid\tinput\na\tfirst\n", ["first"]),
    ("p.jsonl", '\ufeff{"input": "first"}\n', ["first"]),
    ("p", '{"input": "first"}\n', ["first"]),  # no suffix: JSON when it starts as JSON does
    ("p", "[INST] first\n", None),
])
def test_prompt_files_read_as_their_suffix_says(tmp_path: Path, name: str, content: str,
                                                expected: list[str] | None) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    if expected is None:
        with pytest.raises(OrchmoeError, match="not valid JSON"):
            read_prompts([], str(path))
        return
    assert [prompt.input for prompt in read_prompts([], str(path))] == expected


@pytest.mark.parametrize("name, content, expected", [
    ("p.csv", "input,id\nfirst,a\n,b\n", "p.csv: row 2 has no non-empty text field"),
    ("p.jsonl", "[1]\n", "p.jsonl: row 1 is not an object"),
    ("p.json", '[{"input": "a"}, {"input": "b", "task": 3}]', "p.json: row 2: 'task' must be text, got int"),
])
def test_prompt_rows_are_numbered_from_one(tmp_path: Path, name: str, content: str, expected: str) -> None:
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(OrchmoeError) as caught:
        read_prompts(["a prompt before the file"], str(tmp_path / name))
    assert str(caught.value).startswith(f"{tmp_path}/{expected}")


@pytest.mark.parametrize("word, is_override", [
    ("eval.num_beams=4", True),
    ("data.columns.task=kind", True),
    ("eval.nm_beams=4", True),  # a real section: the loader refuses the misspelt field with a did-you-mean
    ("a.b=c", False),
    ("x=1", False),
    ("what is eval.num_beams=4?", False),
])
def test_only_a_real_recipe_section_makes_a_word_an_override(word: str, is_override: bool) -> None:
    prompts, overrides = prompts_and_overrides([word])
    assert (overrides, prompts) == (([word], []) if is_override else ([], [word]))


def test_generate_answers_a_prompt_shaped_like_an_override(tree: Path, capsys) -> None:
    capsys.readouterr()
    assert run_cli(["generate", str(tree / "one/run"), "a.b=c", "--raw", "eval.max_new_tokens=2"]) == 0
    assert '"input": "a.b=c"' in capsys.readouterr().out


def test_a_split_directory_not_found_names_the_one_near(tree: Path) -> None:
    overrides = [f"data.source={tree / 'ni'}", f"data.split_dir={tree / 'nii'}", "data.format=sni"]
    with pytest.raises(OrchmoeError, match=r"directory '.*/nii' not found \(did you mean 'ni'\?\)"):
        resolve(load_recipe(None, overrides).data)
