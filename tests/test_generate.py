"""`orchmoe generate` and `orchmoe export` from the command line: prompts from arguments, files and standard
input, formatted as the training data was, generated as `eval` generates, routing written beside each answer."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from cli_runner import run_cli
from conftest import write_sni_dir
from test_train import write_recipe

from orchmoe_cli.commands.generate import read_prompts
from orchmoe_cli.errors import OrchmoeError


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two-step tiny runs: orchmoe on a decoder-only model, poly on T5."""
    root = tmp_path_factory.mktemp("generate")
    sni = write_sni_dir(root / "sni")
    made = {}
    for method, model in (("orchmoe", "tiny-llama"), ("poly", "tiny-t5")):
        recipe = write_recipe(root / f"{method}.yaml", sni, root / method, model, method, steps=2,
                              warmup_steps=0)
        assert run_cli(["train", str(recipe), "eval.max_new_tokens=4"]) == 0
        made[method] = root / method
    made["recipe"] = root / "orchmoe.yaml"
    return made


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_orchmoe_prompts_from_arguments_carry_their_abstract_task(runs: dict[str, Path], capsys) -> None:
    capsys.readouterr()
    assert run_cli(["generate", str(runs["orchmoe"]), "What is 2 + 2?", "Name a colour.", "--instruction",
                    "Answer briefly"]) == 0
    rows = _jsonl(capsys.readouterr().out)
    assert [r["input"] for r in rows] == ["What is 2 + 2?", "Name a colour."]
    for row in rows:
        assert row["prompt"].startswith("Definition: Answer briefly.") and "Input: " in row["prompt"]
        assert isinstance(row["prediction"], str)
        probs = row["abstract_task_probs"]
        assert row["abstract_task"] == max(range(len(probs)), key=probs.__getitem__)
        assert row["adapter"] == f"abstract_task_{row['abstract_task']}"


def test_route_only_and_files_and_stdin(runs: dict[str, Path], tmp_path: Path, capsys, monkeypatch) -> None:
    source = tmp_path / "prompts.jsonl"
    source.write_text('{"id": "a", "input": "first", "adapter": "mine"}\n{"id": "b", "input": "second", "note": 7}\n'
                      '{"id": 5, "input": "third"}\n')
    out = tmp_path / "answers.jsonl"
    assert run_cli(["generate", str(runs["orchmoe"]), "--input", str(source), "--output", str(out),
                    "--route-only"]) == 0
    rows = _jsonl(out.read_text())
    assert [r["id"] for r in rows] == ["a", "b", 5] and rows[1]["note"] == 7  # an id keeps its type, for joins
    assert all("prediction" not in r and "adapter" in r for r in rows)
    assert rows[0]["adapter"] == f"abstract_task_{rows[0]['abstract_task']}"  # computed fields win over the input's
    assert "input field(s) adapter are written by generate" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("one line\n\nanother line\n"))
    capsys.readouterr()
    assert run_cli(["generate", str(runs["orchmoe"]), "--input", "-", "--raw", "eval.max_new_tokens=2"]) == 0
    rows = _jsonl(capsys.readouterr().out)
    assert [r["prompt"] for r in rows] == ["one line", "another line"]


def test_task_routed_method_uses_the_task_or_says_it_averages(runs: dict[str, Path], capsys) -> None:
    capsys.readouterr()
    assert run_cli(["generate", str(runs["poly"]), "a question", "--task", "task001_alpha_qa"]) == 0
    [row] = _jsonl(capsys.readouterr().out)
    assert row["task"] == "task001_alpha_qa" and row["routing"] == "task task001_alpha_qa"
    assert run_cli(["generate", str(runs["poly"]), "a question"]) == 0
    [row] = _jsonl(capsys.readouterr().out)
    assert row["task"] is None and "average of skills" in row["routing"]


def test_base_model_needs_a_recipe_and_answers_with_it(runs: dict[str, Path], capsys) -> None:
    assert run_cli(["generate", "none", "hello"]) == 2
    assert "--recipe" in capsys.readouterr().err
    assert run_cli(["generate", "none", "hello", "--recipe", str(runs["recipe"]), "eval.max_new_tokens=2"]) == 0
    [row] = _jsonl(capsys.readouterr().out)
    assert "prediction" in row and "adapter" not in row


@pytest.mark.parametrize("args, expected", [
    (["x", "--task", "task001_alpha_q"], "did you mean 'task001_alpha_qa'"),
    ([], "no prompt"),
    (["x", "  "], "prompt 2 on the command line is empty"),
    (["x", "--raw", "--instruction", "Answer briefly"], "--raw: --instruction, but --raw sends each text as it is"),
])
def test_bad_generate_input_is_one_line(runs: dict[str, Path], args: list[str], expected: str, capsys) -> None:
    assert run_cli(["generate", str(runs["poly"]), *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_read_prompts_refuses_empty_files_missing_fields_and_repeated_ids(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(OrchmoeError, match="empty"):
        read_prompts([], str(empty))
    table = tmp_path / "rows.csv"
    table.write_text("question,id\nwhat?,1\n")
    with pytest.raises(OrchmoeError, match="rows.csv: row 1 has no non-empty text field"):
        read_prompts([], str(table))
    twice = tmp_path / "twice.jsonl"
    twice.write_text('{"id": 1, "input": "a"}\n{"id": 1, "input": "b"}\n')
    with pytest.raises(OrchmoeError, match="id '1' appears twice"):
        read_prompts([], str(twice))
    capitals = tmp_path / "capitals.csv"  # Excel-style headers would pass through as extra fields, unused
    capitals.write_text("Input,Instruction\nwhat?,Answer briefly\n")
    with pytest.raises(OrchmoeError, match=r"capitals.csv: row 1: field 'Input': did you mean 'input'\?"):
        read_prompts([], str(capitals))


def test_export_command_writes_adapters_and_never_replaces_a_directory(runs: dict[str, Path], tmp_path: Path,
                                                                         capsys) -> None:
    out = tmp_path / "exported"
    assert run_cli(["export", str(runs["orchmoe"]), "--to", "peft", "--out", str(out)]) == 0
    manifest = json.loads((out / "orchmoe_export.json").read_text())
    assert manifest["router"] == "router" and all((out / e["path"] / "adapter_config.json").is_file()
                                                  for e in manifest["adapters"])
    assert run_cli(["export", str(runs["orchmoe"]), "--to", "peft", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert run_cli(["export", str(runs["poly"]), "--to", "merged", "--out", str(tmp_path / "m")]) == 2
    assert "--all-tasks" in capsys.readouterr().err and not (tmp_path / "m").exists()
    assert run_cli(["export", str(runs["poly"]), "--to", "merged", "--task", "task001_alpha_qa", "--out",
                    str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / "tokenizer.json").is_file()


def test_raw_refuses_an_instruction_a_row_carries(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    source = tmp_path / "prompts.jsonl"
    source.write_text('{"id": "a", "input": "first"}\n{"id": "b", "input": "second", "instruction": "Be brief"}\n')
    assert run_cli(["generate", str(runs["orchmoe"]), "--input", str(source), "--raw"]) == 2
    err = capsys.readouterr().err
    assert f"{source}: row 'b' has an instruction field" in err and len(err.strip().splitlines()) == 1
