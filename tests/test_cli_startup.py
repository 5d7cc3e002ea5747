"""Help, --show-config and recipe errors answer without importing torch and the other heavy libraries.

Those imports take seconds; a user asking for help or checking a recipe should not wait for them. Each
case runs the CLI's ``main()`` in a fresh interpreter (this process has imported everything already) and
lists the heavy modules loaded by the time it exits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("accelerate", "datasets", "peft", "torch", "transformers")
RECIPE = "model: {name: tiny-llama}\nmethod: {name: lora}\n"

_PROBE = f"""
import json, sys
from orchmoe_cli.cli import main
code = 0
try:
    main(sys.argv[2:])
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
with open(sys.argv[1], "w") as out:
    json.dump({{"code": code, "heavy": heavy}}, out)
"""


@dataclass
class Startup:
    code: int
    heavy: list[str]
    stdout: str
    stderr: str


def _run_cli(tmp_path: Path, *args: str) -> Startup:
    """Run in ``tmp_path``: anything a command writes by mistake (runs/, .orchmoe/) stays out of the repository."""
    result = tmp_path / "probe.json"
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(result), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.exists(), f"the probe did not finish (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    probe = json.loads(result.read_text())
    return Startup(probe["code"], probe["heavy"], proc.stdout, proc.stderr)


@pytest.mark.parametrize("command",
                         [[], ["train"], ["eval"], ["prepare"], ["adapt"], ["inspect-routing"], ["compare"]],
                         ids=lambda c: " ".join(c) or "root")
def test_help_imports_no_heavy_library(command: list[str], tmp_path: Path) -> None:
    run = _run_cli(tmp_path, *command, "--help")
    assert run.code == 0, run.stderr
    assert "Usage" in run.stdout
    assert run.heavy == []


def test_show_config_imports_no_heavy_library(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    run = _run_cli(tmp_path, "train", str(recipe), "--show-config")
    assert run.code == 0, run.stderr
    assert "tiny-llama" in run.stdout and "lora" in run.stdout
    assert run.heavy == []


def test_bad_recipe_fails_in_one_line_without_heavy_imports(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE + "trian: {seed: 1}\n")
    run = _run_cli(tmp_path, "train", str(recipe))
    assert run.code == 2
    assert len(run.stderr.strip().splitlines()) == 1 and "trian: unknown key" in run.stderr, run.stderr
    assert run.heavy == []


@pytest.mark.parametrize(("args", "words"), [
    (["train.steps=3", "train.steps=4"], "given twice"),
    (["eval.tasks=[a, a]"], "listed twice"),
    (["eval.tasks=[]"], "is empty"),
    (["data.columns.output=input"], "three columns"),
    (["--export-table", "t.csv"], "written as .jsonl or .parquet"),
    (["--export-table", "recipe.yaml"], "already exists"),
])
def test_recipe_and_option_refusals_wait_for_no_heavy_library(args: list[str], words: str, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    run = _run_cli(tmp_path, "prepare", str(recipe), *args)
    assert run.code == 2 and words in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert run.heavy == []


@pytest.mark.parametrize("module", ["eval", "generate", "prepare", "inspect_routing", "compare", "export"])
def test_commands_that_do_not_export_leave_peft_unimported(module: str, tmp_path: Path) -> None:
    """peft imports bitsandbytes when it is installed (about a second): only exporting needs it (`train` and
    `adapt` still import it through transformers' learning-rate schedules)."""
    probe = (f"import sys, orchmoe_cli.commands.{module}\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'peft'))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
