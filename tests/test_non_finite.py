"""Numbers that cannot be right are refused, never scored and never written.

Adapter weights holding a NaN or an infinity are refused where adapter checkpoints are read
(``adapters/files.py``), so every command that uses adapters stops with one line naming the weights file and
the tensor, exit code 2, instead of scoring what such a model generates. And no NaN or Infinity reaches a
JSON file (it is not JSON): every ``json.dump`` / ``json.dumps`` in the package passes ``allow_nan=False``,
most of them through ``fsutil.json_text``, which names the file and the key path of the number it refuses.
The rule tests find the commands and the writers themselves, so a new one is covered the day it is added.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
import typer.main
from cli_runner import run_cli
from conftest import write_sni_dir
from safetensors.torch import load_file, save_file
from tiny_recipe import tiny_recipe

import orchmoe_cli
from orchmoe_cli.cli import app
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.fsutil import atomic_write_json, json_text

WEIGHTS = "adapter_model.safetensors"
HELD_OUT = "task101_delta_rewrite"
# every command that reads adapters, with a checkpoint {ck}; outputs go under {tmp}
READERS = {
    "eval": ["eval", "{recipe}", "eval.checkpoint={ck}", "eval.output_dir={tmp}/eval"],
    "adapt": ["adapt", "{recipe}", "adapt.checkpoint={ck}", "--modes", "zero_shot", "--tasks", HELD_OUT,
              "adapt.output_dir={tmp}/adapt"],
    "generate": ["generate", "{ck}", "What is 2 + 2?", "--output", "{tmp}/answers.jsonl"],
    "export": ["export", "{ck}", "--to", "peft", "--all-tasks", "--out", "{tmp}/export"],
    "inspect-routing": ["inspect-routing", "{ck}", "--out", "{tmp}/routing"],
    "train": ["train", "{recipe}", "train.init_from={ck}", "output.dir={tmp}/run"],
}
NEVER_READ_ADAPTERS = {"prepare", "compare"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A poly run on tiny-llama trained for one step, its checkpoint, and that checkpoint as a peft Poly one."""
    root = tmp_path_factory.mktemp("non_finite")
    sni = write_sni_dir(root / "sni")
    recipe = tiny_recipe(root / "recipe.yaml", sni, root / "run", "{name: poly, rank: 4, alpha: 4, n_skills: 2}",
                         train="{steps: 1, batch_size: 4, log_every: 1, warmup_steps: 0}",
                         eval="{max_instances: 2, max_new_tokens: 4}")
    assert run_cli(["train", str(recipe)]) == 0
    checkpoint = root / "run" / "checkpoints" / "step-000001"
    assert run_cli(["export", str(checkpoint), "--to", "peft", "--all-tasks", "--out", str(root / "peft")]) == 0
    return {"recipe": recipe, "checkpoint": checkpoint, "peft": root / "peft" / "peft-poly"}  # peft's Poly layout


def spoiled_copy(source: Path, target: Path, value: float) -> str:
    """A copy of the adapter checkpoint ``source`` (a plain adapter directory, no manifest) with ``value`` in one
    element of one tensor; returns that tensor's name."""
    shutil.copytree(source, target)
    (target / "manifest.json").unlink(missing_ok=True)
    tensors = load_file(str(target / WEIGHTS))
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(target / WEIGHTS), metadata={"format": "pt"})
    return name


def one_error_line(code: int, stderr: str) -> str:
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_every_command_that_reads_adapters_is_checked_here() -> None:
    commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert commands - NEVER_READ_ADAPTERS == set(READERS), "classify the new command: reads adapters or not"


@pytest.mark.parametrize("command", sorted(READERS))
def test_adapters_with_a_nan_are_refused_naming_file_and_tensor(command: str, trained: dict[str, Path],
                                                                tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = tmp_path / "ck"
    tensor = spoiled_copy(trained["checkpoint"], checkpoint, float("nan"))
    argv = [arg.format(recipe=trained["recipe"], ck=checkpoint, tmp=tmp_path) for arg in READERS[command]]
    capsys.readouterr()

    line = one_error_line(run_cli(argv), capsys.readouterr().err)

    assert str(checkpoint / WEIGHTS) in line and tensor in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"], "something was written"


def test_peft_adapters_with_an_infinity_are_refused(trained: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    checkpoint = tmp_path / "peft"
    tensor = spoiled_copy(trained["peft"], checkpoint, float("-inf"))
    capsys.readouterr()

    line = one_error_line(run_cli(["eval", str(trained["recipe"]), f"eval.checkpoint={checkpoint}",
                                   f"eval.output_dir={tmp_path}/eval"]), capsys.readouterr().err)

    assert tensor in line and WEIGHTS in line, line


def test_finite_adapters_still_load(trained: dict[str, Path], tmp_path: Path) -> None:
    """The check refuses only what is wrong: the same copy without the spoiled value is evaluated."""
    checkpoint = tmp_path / "ck"
    spoiled_copy(trained["checkpoint"], checkpoint, 0.25)
    assert run_cli(["eval", str(trained["recipe"]), f"eval.checkpoint={checkpoint}",
                    f"eval.output_dir={tmp_path}/eval"]) == 0


# --------------------------------------------------------------------------- JSON writers


def _json_module_names(tree: ast.Module) -> tuple[set[str], list[str]]:
    """Names the json module is bound to, and any ``from json import dump(s)`` (refused: hides the writer)."""
    modules, direct = {"json"}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.asname or alias.name for alias in node.names if alias.name == "json"}
        elif isinstance(node, ast.ImportFrom) and node.module == "json":
            direct += [f"line {node.lineno}: from json import {alias.name}" for alias in node.names
                       if alias.name in ("dump", "dumps")]
    return modules, direct


def _refuses_nan(call: ast.Call) -> bool:
    return any(k.arg == "allow_nan" and isinstance(k.value, ast.Constant) and k.value.value is False
               for k in call.keywords)


def test_every_json_writer_refuses_non_finite_numbers() -> None:
    """Every json.dump / json.dumps call in the package says allow_nan=False, and rich's print_json is only
    given text (its ``data=`` would write NaN)."""
    package = Path(orchmoe_cli.__file__).parent
    offenders, calls = [], 0
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules, direct = _json_module_names(tree)
        offenders += [f"{path.relative_to(package)} {what}" for what in direct]
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            func = node.func
            if func.attr in ("dump", "dumps") and isinstance(func.value, ast.Name) and func.value.id in modules:
                calls += 1
                if not _refuses_nan(node):
                    offenders.append(f"{path.relative_to(package)} line {node.lineno}: json.{func.attr} without "
                                     "allow_nan=False (use fsutil.json_text)")
            elif func.attr == "print_json" and any(k.arg == "data" for k in node.keywords):
                offenders.append(f"{path.relative_to(package)} line {node.lineno}: print_json(data=...)")
    assert calls >= 5, "the walk found too few writers to be looking in the right place"
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize(("value", "where"), [
    ({"scores": {"rougeL": float("nan")}}, "scores.rougeL is nan"),
    ([{"loss": 1.0}, {"loss": float("inf")}], "[1].loss is inf"),
    (float("-inf"), "the value is -inf"),
])
def test_json_text_names_the_file_and_where_the_number_sits(value: object, where: str) -> None:
    with pytest.raises(OrchmoeError) as info:
        json_text(value, "out/results.json")
    assert str(info.value).startswith(f"out/results.json: {where}"), str(info.value)


def test_a_refused_json_file_is_not_written_and_the_old_one_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    atomic_write_json(path, {"rougeL": 12.5, "undefined": None})
    assert json.loads(path.read_text()) == {"rougeL": 12.5, "undefined": None}  # undefined is null

    with pytest.raises(OrchmoeError, match="rougeL is nan"):
        atomic_write_json(path, {"rougeL": float("nan")})

    assert json.loads(path.read_text()) == {"rougeL": 12.5, "undefined": None}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_spoiled_tensor_is_counted_in_the_message(trained: dict[str, Path], tmp_path: Path) -> None:
    from orchmoe_cli.adapters.files import read_tensors

    checkpoint = tmp_path / "ck"
    tensor = spoiled_copy(trained["checkpoint"], checkpoint, float("nan"))
    tensors = load_file(str(checkpoint / WEIGHTS))
    tensors[tensor].view(-1)[1] = float("inf")
    save_file(tensors, str(checkpoint / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(OrchmoeError, match=rf"tensor {tensor} holds 2 NaN or infinite value\(s\) of "
                                           rf"{tensors[tensor].numel()}"):
        read_tensors(checkpoint)
    assert torch.isfinite(load_file(str(trained["checkpoint"] / WEIGHTS))[tensor]).all()  # the original is intact
