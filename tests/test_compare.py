"""`orchmoe compare`: differences between evaluations with paired-bootstrap intervals, on prediction files
written by hand (no model): known differences, refusals of mismatched or damaged inputs, the output formats,
labels and where a run's predictions are found."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
from cli_runner import run_cli

from orchmoe_cli.analysis.comparison import OVERALL, compare_runs
from orchmoe_cli.commands.compare import distinct_labels
from orchmoe_cli.core.results import text_sha256

TASKS = ("t1", "t2")


def _row(task: str, instance: int, rouge: float, em: float = 0.0) -> dict[str, Any]:
    """One line of ``predictions.jsonl`` as ``orchmoe eval`` writes it."""
    return {"task": task, "category": "Cat", "id": str(instance), "prompt_sha256": "0" * 16, "prediction": "p",
            "references": ["r"], "exact_match": em, "rougeL": rouge}


def _base_rows(n: int = 20) -> list[dict[str, Any]]:
    return [_row(t, i, 0.1 + 0.03 * i) for t in TASKS for i in range(n)]


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _shifted(rows: list[dict[str, Any]], by: float) -> list[dict[str, Any]]:
    return [{**r, "rougeL": r["rougeL"] + by} for r in rows]


def _json(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert run_cli(["compare", *args, "--format", "json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Exit code 2 with one error line and no traceback; returns the line."""
    capsys.readouterr()
    assert run_cli(["compare", *args]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_known_difference_gives_an_interval_around_it() -> None:
    base = _base_rows()
    better = [{**r, "exact_match": 1.0 if int(r["id"]) % 2 else 0.0} for r in _shifted(base, 0.10)]
    comparison = compare_runs({"a": base, "b": better})
    assert comparison.tasks == [OVERALL, *TASKS] and comparison.reference == "a"
    for task in comparison.tasks:
        cell_a, cell_b = comparison.cells_for(task)
        assert cell_a.differences == {} and cell_b.n == (40 if task == OVERALL else 20)
        rouge = cell_b.differences["rougeL"]
        assert rouge.mean == pytest.approx(10.0)
        assert rouge.low <= 10.0 + 1e-9 and rouge.high >= 10.0 - 1e-9 and rouge.low > 0  # contains 10, not 0
        assert cell_b.means["rougeL"] - cell_a.means["rougeL"] == pytest.approx(10.0)
        em = cell_b.differences["exact_match"]
        assert em.mean == pytest.approx(50.0) and 0 < em.low < 50 < em.high  # half the instances gain a match
    assert compare_runs({"a": base, "b": better}) == comparison  # seeded: the same inputs, the same intervals


def test_noisy_difference_covers_zero() -> None:
    base = _base_rows()
    noisy = [{**r, "rougeL": r["rougeL"] + (0.05 if int(r["id"]) % 2 else -0.05)} for r in base]
    difference = compare_runs({"a": base, "b": noisy}).cells_for(OVERALL)[1].differences["rougeL"]
    assert difference.mean == pytest.approx(0.0, abs=1e-9) and difference.low < 0 < difference.high


def test_cli_reports_the_difference_with_options_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _write(tmp_path / "a.predictions.jsonl", _base_rows())
    b = _write(tmp_path / "b.predictions.jsonl", _shifted(_base_rows(), 0.10))
    result = _json([str(a), str(b), "--samples", "500", "--seed", "3"], capsys)
    assert result["reference"] == "a" and result["runs"] == ["a", "b"]
    assert result["interval"]["resamples"] == 500 and result["interval"]["seed"] == 3
    overall = result["results"]["b"][OVERALL]
    assert overall["n"] == 40 and overall["rougeL"]["difference"] == pytest.approx(10.0)
    assert overall["rougeL"]["ci_low"] <= 10.0 <= overall["rougeL"]["ci_high"] + 1e-9
    assert "difference" not in result["results"]["a"][OVERALL]["rougeL"]  # the reference has none
    assert result["sources"] == {"a": str(a), "b": str(b)}


@pytest.mark.parametrize("extra_in", ["reference", "other"])
def test_runs_on_different_instances_are_refused_naming_the_first(
        extra_in: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    short = [_row("t1", i, 0.5) for i in range(4)] + [_row("t2", 0, 0.5)]
    long = short[:4] + [_row("t1", 7, 0.5), _row("t1", 9, 0.5)] + short[4:]
    reference = _write(tmp_path / "ref.predictions.jsonl", long if extra_in == "reference" else short)
    other = _write(tmp_path / "new.predictions.jsonl", short if extra_in == "reference" else long)
    line = _refused([str(reference), str(other)], capsys)
    has, lacks = ("ref", "new") if extra_in == "reference" else ("new", "ref")
    assert f"task t1, id '7' is in {has} but not in {lacks}" in line, line


@pytest.mark.parametrize(("content", "expected"), [
    (json.dumps(_row("t1", 0, 0.5)) + "\n\n" + json.dumps(_row("t1", 0, 0.2)) + "\n",
     "line 3: task t1, id '0' is already scored on line 1"),
    (json.dumps(_row("t1", 0, 0.5)) + "\n" + '{"task": "t1", "id": \n', "line 2: not valid JSON"),
    (json.dumps({"task": "t1", "id": "0", "rougeL": 0.5}) + "\n", "line 1: no 'exact_match' field"),
    (json.dumps(_row("t1", 0, 45.0)) + "\n", "line 1: rougeL is 45.0, expected a per-instance score"),
    ("", "holds no predictions"),
])
def test_damaged_prediction_files_are_refused_naming_file_and_line(
        content: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _write(tmp_path / "good.predictions.jsonl", [_row("t1", 0, 0.5)])
    bad = tmp_path / "bad.predictions.jsonl"
    bad.write_text(content, encoding="utf-8")
    line = _refused([str(good), str(bad)], capsys)
    assert str(bad) in line and expected in line, line


def test_fewer_than_two_runs_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    only = _write(tmp_path / "a.predictions.jsonl", _base_rows())
    assert "at least two runs" in _refused([str(only)], capsys)
    assert "--format" in _refused([str(only), str(only), "--format", "yaml"], capsys)


def test_formats_parse_and_the_plot_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = [str(_write(tmp_path / f"{name}.predictions.jsonl", _shifted(_base_rows(), by)))
            for name, by in (("a", 0.0), ("b", 0.1), ("c", -0.05))]
    result = _json(runs, capsys)

    def numbers(value: Any) -> list[float]:
        if isinstance(value, dict):
            return [n for v in value.values() for n in numbers(v)]
        return [float(value)] if isinstance(value, (int, float)) else []

    assert all(math.isfinite(n) for n in numbers(result["results"]))
    assert set(result["results"]["c"]) == {OVERALL, *TASKS}

    assert run_cli(["compare", *runs, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 3 * 3 and {(r["run"], r["task"]) for r in rows} == {
        (run, task) for run in "abc" for task in (OVERALL, *TASKS)}
    assert float(next(r for r in rows if (r["run"], r["task"]) == ("c", OVERALL))["rougeL_difference"]) == \
        pytest.approx(-5.0)

    assert run_cli(["compare", *runs, "--format", "markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines.index("| run | n | ROUGE-L | ROUGE-L minus reference [95% CI] | EM | EM minus reference [95% CI] |")
    assert lines[header + 1].startswith("|---|") and lines[header + 2].startswith("| a | 40 |")
    assert any(line.startswith("| task | run |") for line in lines)

    plot = tmp_path / "figures" / "forest.png"
    assert run_cli(["compare", *runs, "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "overall" in out and "+10.00" in out  # the rich table on standard output
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert "end in .png" in _refused([*runs, "--plot", str(tmp_path / "forest.pdf")], capsys)


def test_clashing_labels_are_lengthened_until_unique(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = _write(tmp_path / "study" / "cpu" / "lora.predictions.jsonl", _base_rows())
    second = _write(tmp_path / "study" / "gpu" / "lora.predictions.jsonl", _base_rows())
    third = _write(tmp_path / "other" / "cpu" / "lora.predictions.jsonl", _base_rows())
    result = _json([str(first), str(second), str(third)], capsys)
    assert result["runs"] == ["study/cpu/lora", "gpu/lora", "other/cpu/lora"]
    assert distinct_labels([first, tmp_path / "x" / "base.jsonl", first]) == ["lora", "base", "lora#2"]


def test_run_directories_are_searched_one_level_down_and_up(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    evaluation = tmp_path / "runs" / "lora" / "eval-step-000010-0123abcd"
    _write(evaluation / "predictions.jsonl", _base_rows())
    other = _write(tmp_path / "runs" / "poly" / "eval-base" / "predictions.jsonl", _shifted(_base_rows(), 0.1))
    (other.parent / "results.json").write_text(json.dumps({"predictions_sha256": text_sha256(other.read_text())}),
                                               encoding="utf-8")
    monkeypatch.setenv("RUNS_HOME", str(tmp_path / "runs"))
    result = _json(["$RUNS_HOME/lora", str(other.parent / "results.json"), str(other.parent)], capsys)
    assert result["runs"] == ["lora", "eval-base", "eval-base#2"]  # a run directory names its evaluation
    assert result["sources"]["lora"] == str(evaluation / "predictions.jsonl")

    _write(tmp_path / "runs" / "poly" / "eval-step-000020-4567cdef" / "predictions.jsonl", _base_rows())
    line = _refused([str(evaluation), str(tmp_path / "runs" / "poly")], capsys)
    assert "holds 2 evaluations (eval-base, eval-step-000020-4567cdef); which one?" in line, line
    assert "no predictions.jsonl in it" in _refused([str(evaluation), str(tmp_path)], capsys)
    assert "UNSET_RUNS_HOME is not set" in _refused([str(evaluation), "$UNSET_RUNS_HOME/x"], capsys)
    typo = _refused([str(evaluation), str(tmp_path / "runs" / "poly" / "eval-bse")], capsys)
    assert "no such file or directory (did you mean 'eval-base'?)" in typo, typo  # a close name beside it
    step = tmp_path / "runs" / "poly" / "checkpoints" / "step-000020"  # a checkpoint: its evaluations, first
    step.mkdir(parents=True)
    line = _refused([str(evaluation), str(step)], capsys)
    assert f"near it: {step.parent.parent / 'eval-step-000020-4567cdef'}, {step.parent.parent / 'eval-base'}" in line
    folder = tmp_path / "files"  # a folder of predictions files (the study's layout): they are named
    _write(folder / "lora.predictions.jsonl", _base_rows())
    assert f"near it: {folder / 'lora.predictions.jsonl'}: pass one" in _refused([str(evaluation), str(folder)], capsys)


def test_every_run_keeps_its_own_label(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Labels key the results: a suffix never equals another run's name, and two files of one folder that share a
    stem keep their whole names; so no run silently disappears."""
    base = _base_rows(5)
    files = [_write(tmp_path / name, _shifted(base, by)) for name, by in
             (("lora.jsonl", 0.0), ("lora.predictions.jsonl", 0.3), ("lora#2.jsonl", 0.6))]
    result = _json([str(f) for f in files], capsys)
    assert len(result["runs"]) == 3 == len(set(result["runs"]))
    assert distinct_labels([files[0], files[0], tmp_path / "lora#2.jsonl"]) == ["lora", "lora#3", "lora#2"]


def test_a_task_named_overall_keeps_its_own_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [_row("overall", i, 1.0) for i in range(3)] + [_row("t2", i, 0.0) for i in range(3)]
    comparison = compare_runs({"a": rows, "b": rows})
    assert comparison.overall != "overall" and comparison.tasks[1:] == ["overall", "t2"]
    assert comparison.cells_for("overall")[0].means["rougeL"] == 100.0
    assert comparison.cells_for(comparison.overall)[0].means["rougeL"] == 50.0


def test_names_with_dollars_and_bars_plot_and_tabulate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Task names are user data: `$` is drawn as written (not mathtext), `|` stays inside its Markdown cell."""
    rows = [_row(task, i, 0.2 + 0.1 * i) for task in ("price_$5_to_$10", "yes|no") for i in range(4)]
    a, b = _write(tmp_path / "a.jsonl", rows), _write(tmp_path / "b.jsonl", _shifted(rows, 0.1))
    capsys.readouterr()
    assert run_cli(["compare", str(a), str(b), "--plot", str(tmp_path / "f.png"), "--format", "markdown"]) == 0
    assert (tmp_path / "f.png").stat().st_size > 0
    table = [line for line in capsys.readouterr().out.splitlines() if "yes" in line]
    assert table and all(line.count(" | ") == table[0].count(" | ") and "yes\\|no" in line for line in table)
    assert run_cli(["compare", str(a), str(b), "--plot", str(tmp_path / "f.png")]) == 2  # never overwritten


def test_predictions_changed_after_their_evaluation_are_refused(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    import hashlib

    reference = _write(tmp_path / "lora.predictions.jsonl", _base_rows())
    evaluation = tmp_path / "run" / "eval-test"
    predictions = _write(evaluation / "predictions.jsonl", _shifted(_base_rows(), 0.05))
    digest = hashlib.sha256(predictions.read_bytes()).hexdigest()
    (evaluation / "results.json").write_text(json.dumps({"predictions_sha256": digest}), encoding="utf-8")
    assert _json([str(reference), str(evaluation)], capsys)["runs"][1] == "eval-test"  # vouched for: compared
    (evaluation / "results.json").write_text(json.dumps({"predictions_sha256": digest.upper()}), encoding="utf-8")
    assert _json([str(reference), str(evaluation)], capsys)["runs"][1] == "eval-test"  # hex in either case
    _write(predictions, _shifted(_base_rows(), 0.5))  # edited after the evaluation wrote its scores
    line = _refused([str(reference), str(tmp_path / "run")], capsys)
    assert str(predictions) in line and "predictions_sha256" in line, line
    for damaged, words in (("{\"overall\": ", "not readable JSON"), ("[1, 2]", "records no predictions_sha256"),
                           ('{"predictions_sha256": 123}', "records no predictions_sha256"),
                           ("{}", "records no predictions_sha256")):  # a results.json that cannot vouch is refused
        (evaluation / "results.json").write_text(damaged, encoding="utf-8")
        line = _refused([str(reference), str(evaluation)], capsys)
        assert str(evaluation / "results.json") in line and words in line, line
    copy = _write(tmp_path / "elsewhere" / "edited.jsonl", _shifted(_base_rows(), 0.05))
    assert _json([str(reference), str(copy)], capsys)["runs"][1] == "edited"  # a copy outside stands on its own
