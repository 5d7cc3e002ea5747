"""Rule: per-instance rows are read only together with what vouches for them. An evaluation's
``predictions.jsonl`` is the one its ``results.json`` records the sha256 of; a sweep cell's (or a study result's)
recorded score is the mean of its per-instance rows. Otherwise the tables (recorded scores) and the intervals
(per-instance rows) can tell two stories without a word.

The walk: every function in the package and the benchmarks that names a predictions file and reads a file must
call one of the checkers in ``orchmoe_cli/core/results.py`` (or ``cell_scores``, the one reader of a sweep
cell's rows), unless it is listed below with the reason it needs none.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKERS = {"check_vouched", "predictions_digest", "text_sha256", "recorded_score_gap"}
READS = {"read_text", "read_bytes", "open", "read_jsonl", "readlines"}
NEEDS_NONE = {
    ("orchmoe_cli/core/evaluation.py", "_load_partial"): "an unfinished evaluation's rows: nothing sums them up "
                                                         "yet, and the file's first line binds them to the run",
}


def _call_name(call: ast.Call) -> str | None:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def _names_predictions(node: ast.AST) -> bool:
    for child in ast.walk(node):
        if isinstance(child, ast.Constant) and isinstance(child.value, str) and "predictions" in child.value:
            return True
        if isinstance(child, ast.Name) and child.id == "PREDICTIONS":
            return True
    return False


def _reads(call: ast.Call) -> bool:
    if _call_name(call) not in READS:
        return False
    modes = [a.value for a in call.args if isinstance(a, ast.Constant)]
    modes += [k.value.value for k in call.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)]
    return not any(isinstance(m, str) and set(m) & set("wax") for m in modes)  # open(..., "w") writes


def _readers() -> dict[tuple[str, str], set[str]]:
    """(file, function) -> the checkers it calls, for every function that names a predictions file and reads."""
    found = {}
    for path in sorted([*REPO.glob("orchmoe_cli/**/*.py"), *REPO.glob("benchmarks/**/*.py")]):
        for function in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)) or not _names_predictions(function):
                continue
            calls = [node for node in ast.walk(function) if isinstance(node, ast.Call)]
            if any(_reads(call) for call in calls):
                found[(str(path.relative_to(REPO)), function.name)] = {_call_name(c) for c in calls} & CHECKERS
    return found


def test_every_reader_of_per_instance_rows_checks_what_vouches_for_them() -> None:
    readers = _readers()
    unchecked = sorted(place for place, checks in readers.items() if not checks and place not in NEEDS_NONE)
    assert unchecked == [], f"read predictions without check_vouched / recorded_score_gap: {unchecked}"
    assert ("orchmoe_cli/analysis/adaptation_report.py", "cell_scores") in readers  # the walk sees the readers
    assert ("orchmoe_cli/core/evaluation.py", "_load_finished") in readers
    assert set(NEEDS_NONE) <= set(readers), "an exemption names a reader that is gone"
