"""Rule: every "not found" about a path a user gives looks one level up and down (``paths.not_found_hint``).

Walks every ``raise`` in the package whose message says a path is missing and requires the shared hint in it,
except the few about files the toolkit itself placed (named below, with why), where a nearby name would not be
what the user meant."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from cli_runner import run_cli

PACKAGE = Path(__file__).resolve().parents[1] / "orchmoe_cli"
MISSING = ("not found", "no such file", "does not exist", "is not a file")
# (module, a phrase of the message): files orchmoe wrote or ships, reached only through a path already found
OWN_FILES = {
    ("adapters/loading.py", "checkpoint directory not found"),  # after find_checkpoint resolved the user's path
    ("analysis/adaptation_report.py", "not found{_REDO_CELL}"),  # a sweep's own per-cell predictions
}


def _missing_path_raises() -> list[tuple[str, int, str]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Raise) and node.exc is not None:
                text = ast.get_source_segment(source, node) or ""
                if any(words in text for words in MISSING):
                    found.append((str(path.relative_to(PACKAGE)), node.lineno, text))
    return found


def test_every_missing_path_message_uses_the_shared_hint() -> None:
    raises = _missing_path_raises()
    assert len(raises) >= 8  # the walk finds the messages (data sources, splits, compare, generate, checkpoints)
    allowed = {(module, phrase) for module, phrase in OWN_FILES
               if any(m == module and phrase in text for m, _, text in raises)}
    assert allowed == OWN_FILES, "an allowed message is gone: drop it from OWN_FILES"
    unhinted = [f"{module}:{line}" for module, line, text in raises if "not_found_hint" not in text
                and not any(module == m and phrase in text for m, phrase in OWN_FILES)]
    assert unhinted == []


@pytest.mark.parametrize("typo", ["promts.jsonl", "sub/prompts.jsonl"])
def test_generate_input_not_found_names_the_file_near(tmp_path: Path, capsys, monkeypatch, typo: str) -> None:
    (tmp_path / "prompts.jsonl").write_text('{"input": "x"}\n')
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    assert run_cli(["generate", "none", "--input", typo, "--recipe", "absent.yaml"]) == 2
    err = capsys.readouterr().err
    assert f"--input: {typo} not found" in err and "prompts.jsonl" in err.split("not found", 1)[1], err
