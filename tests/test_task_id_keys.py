"""Instance ids are unique only within a task: every join of per-instance results is keyed by (task, id).

Two held-out tasks here number their instances alike ("0", "1", ...); evaluation (fresh and resumed), the
adaptation report and the paired bootstrap must keep both tasks whole. Two rows with the same (task, id) in one
task are refused where rows enter.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Callable

import datasets
import pytest
from cli_runner import run_cli
from test_eval import write_recipe

from orchmoe_cli.analysis.adaptation_report import PREDICTIONS, cell_file_name, read_results, summarise
from orchmoe_cli.analysis.bootstrap import instance_scores, paired_bootstrap
from orchmoe_cli.core import evaluation as evaluate_module
from orchmoe_cli.core.evaluation import select_instances
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.recipe import EvalConfig

REPO = Path(__file__).resolve().parents[1]
TEST_TASKS = ("task101_delta_rewrite", "task102_epsilon_qa")


def _module(relative: str) -> ModuleType:
    """A benchmark script as a module (they are not in the package)."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem + "_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def colliding_sni(sni_dir: Path, make_task: Callable) -> Path:
    """The shared SNI fixture with both held-out tasks' instance ids replaced by "0" .. "5"."""
    for name in TEST_TASKS:
        task = make_task(name)
        for i, instance in enumerate(task["Instances"]):
            instance["id"] = str(i)
        (sni_dir / "tasks" / f"{name}.json").write_text(json.dumps(task, indent=4), encoding="utf-8")
    return sni_dir


def _pairs(rows: list[dict]) -> Counter:
    return Counter((r["task"], r["id"]) for r in rows)


def _check_eval_dir(result_dir: Path, per_task: int) -> None:
    results = json.loads((result_dir / "results.json").read_text())
    rows = [json.loads(line) for line in (result_dir / "predictions.jsonl").read_text().splitlines()]
    assert {t["task"]: t["n"] for t in results["tasks"]} == dict.fromkeys(TEST_TASKS, per_task)
    assert results["n_instances"] == len(rows) == 2 * per_task
    expected = Counter((task, str(i)) for task in TEST_TASKS for i in range(per_task))
    assert _pairs(rows) == expected  # each (task, id) exactly once
    for row in rows:  # each row is its own task's instance (the prompt names the task)
        assert row["references"][0] == f"answer {row['id']}"


def test_eval_keeps_tasks_whose_instance_ids_coincide(colliding_sni: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", colliding_sni, out, "tiny-t5")
    assert run_cli(["eval", str(recipe), "eval.max_instances=2"]) == 0
    _check_eval_dir(out / "eval-base", per_task=2)


def test_resumed_eval_keeps_tasks_whose_instance_ids_coincide(colliding_sni: Path, tmp_path: Path,
                                                             monkeypatch) -> None:
    """Interrupted once the first task is done: resuming must still generate every instance of the second."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", colliding_sni, out, "tiny-t5")  # 3 instances a task, batches of 2
    original = evaluate_module.generate_predictions
    seen: list[tuple[str, str]] = []

    def interrupted(model, tokenizer, is_encoder_decoder, rows, cfg, task_id, on_batch, shard=(0, 1)):
        def stop_after_the_first_task(batch_rows, predictions):
            on_batch(batch_rows, predictions)
            seen.extend((r["task"], r["id"]) for r in batch_rows)
            if len(seen) >= 3:
                raise KeyboardInterrupt

        original(model, tokenizer, is_encoder_decoder, rows, cfg, task_id, stop_after_the_first_task, shard)

    monkeypatch.setattr(evaluate_module, "generate_predictions", interrupted)
    assert run_cli(["eval", str(recipe)]) == 130
    assert {task for task, _ in seen} == {TEST_TASKS[0]} and len(seen) == 3

    generated: list[tuple[str, str]] = []

    def counting(model, tokenizer, is_encoder_decoder, rows, cfg, task_id, on_batch, shard=(0, 1)):
        generated.extend((r["task"], r["id"]) for r in rows)
        original(model, tokenizer, is_encoder_decoder, rows, cfg, task_id, on_batch, shard)

    monkeypatch.setattr(evaluate_module, "generate_predictions", counting)
    assert run_cli(["eval", str(recipe)]) == 0
    assert sorted(generated) == [(TEST_TASKS[1], str(i)) for i in range(3)]  # the same ids, the other task
    _check_eval_dir(out / "eval-base", per_task=3)


def test_duplicate_instance_id_within_a_task_is_one_line_naming_task_and_id(sni_dir: Path, tmp_path: Path,
                                                                           make_task: Callable, capsys) -> None:
    name = TEST_TASKS[1]
    task = make_task(name)
    task["Instances"][4]["id"] = task["Instances"][2]["id"]
    (sni_dir / "tasks" / f"{name}.json").write_text(json.dumps(task), encoding="utf-8")
    recipe = write_recipe(tmp_path / "r.yaml", sni_dir, tmp_path / "out", "tiny-t5")
    for command in ("prepare", "eval"):
        capsys.readouterr()
        assert run_cli([command, str(recipe)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert name in err and f"'{name}-2'" in err, err


def test_prepared_rows_repeating_a_task_and_id_are_refused() -> None:
    """A prepared split can only hold a repeat if it was not made by prepare; evaluation refuses it anyway."""
    rows = {"task": ["a", "a", "b"], "category": ["c"] * 3, "id": ["0", "0", "0"], "prompt": ["p"] * 3,
            "prompt_ids": [[1]] * 3, "references": [["r"]] * 3}
    with pytest.raises(OrchmoeError, match="task a: instance id '0'"):
        select_instances(datasets.Dataset.from_dict(rows), EvalConfig(max_instances=5))
    rows["id"] = ["0", "1", "0"]  # the same id in two tasks is fine
    assert [(r["task"], r["id"]) for r in select_instances(datasets.Dataset.from_dict(rows),
                                                            EvalConfig(max_instances=5))] == [
        ("a", "0"), ("a", "1"), ("b", "0")]


def _prediction(task: str, instance: str, rouge: float) -> dict:
    return {"task": task, "category": "c", "id": instance, "prediction": "x", "references": ["y"],
            "rougeL": rouge, "exact_match": 0.0}


def test_paired_bootstrap_pairs_task_and_id() -> None:
    ids = [str(i) for i in range(4)]
    a = instance_scores([_prediction(t, i, 1.0 if t == "t1" else 0.0) for t in ("t1", "t2") for i in ids],
                        scale=100)
    b = instance_scores([_prediction(t, i, 0.0 if t == "t1" else 1.0) for t in ("t2", "t1") for i in ids],
                        scale=100)
    assert len(a) == len(b) == 8
    difference = paired_bootstrap(a, b)
    assert difference.n == 8 and difference.mean == pytest.approx(0.0)  # +100 on t1, -100 on t2
    one_task = paired_bootstrap({k: v for k, v in a.items() if k[0] == "t1"}, b)
    assert one_task.n == 4 and one_task.mean == pytest.approx(100.0)
    with pytest.raises(TypeError, match=r"\(task, id\)"):
        paired_bootstrap({i: 1.0 for i in ids}, {i: 0.0 for i in ids})  # ids alone would pair across tasks
    with pytest.raises(ValueError, match="task t1: instance id '0' is scored twice"):
        instance_scores([_prediction("t1", "0", 1.0), _prediction("t1", "0", 0.0)])


def _cell(task: str, mode: str, shots: int, seed: int, scores: dict[str, float]) -> tuple[dict, dict[str, float]]:
    """A results line (its ROUGE-L the mean of its per-instance ``scores``, as readers check) and its scores."""
    line = {"task": task, "mode": mode, "shots": shots, "seed": seed, "method": "orchmoe", "trainable": 1,
            "key": f"{task}/{mode}/k{shots}/s{seed}", "category": "c", "exact_match": 0.0,
            "rougeL": 100 * sum(scores.values()) / len(scores)}
    return line, scores


def _write_sweep(out: Path, cells: list[tuple[dict, dict[str, float]]]) -> Path:
    """adapt_results.jsonl and predictions/<cell>.jsonl, as `orchmoe adapt` writes them."""
    (out / PREDICTIONS).mkdir(parents=True)
    for line, scores in cells:
        predictions = [_prediction(line["task"], i, v) for i, v in scores.items()]
        (out / PREDICTIONS / f"{cell_file_name(line['key'])}.jsonl").write_text(
            "".join(json.dumps(p) + "\n" for p in predictions))
    path = out / "adapt_results.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line, _ in cells))
    return path


@pytest.mark.parametrize("inline", [False, True], ids=["predictions-files", "scores-in-the-line"])
def test_adaptation_report_pools_cells_of_tasks_whose_ids_coincide(tmp_path: Path, inline: bool) -> None:
    high, low = {"0": 1.0, "1": 1.0}, {"0": 0.0, "1": 0.0}
    cells = [_cell("t1", "orchmoe", 4, 0, high), _cell("t2", "orchmoe", 4, 0, low),
             _cell("t1", "lora_scratch", 4, 0, low), _cell("t2", "lora_scratch", 4, 0, low)]
    if inline:  # older sweeps: scores in the line, keyed by id alone within the cell's task
        path = tmp_path / "adapt_results.jsonl"
        path.write_text("".join(json.dumps({**line, "scores": scores}) + "\n" for line, scores in cells))
    else:
        path = _write_sweep(tmp_path, cells)
    rows = read_results(path)
    assert rows[0]["scores"] == {("t1", "0"): 1.0, ("t1", "1"): 1.0}
    summary = summarise(rows)
    assert summary["overall"]["orchmoe@4"]["mean"] == pytest.approx(50.0)  # 4 instances: 2 at 100, 2 at 0
    assert summary["overall"]["lora_scratch@4"]["mean"] == pytest.approx(0.0)

    report = _module("benchmarks/study/report.py")
    orchmoe = report._per_seed_mean(rows, "orchmoe", 4)
    assert orchmoe == {("t1", "0"): 100.0, ("t1", "1"): 100.0, ("t2", "0"): 0.0, ("t2", "1"): 0.0}
    difference = paired_bootstrap(orchmoe, report._per_seed_mean(rows, "lora_scratch", 4))
    assert difference.n == 4 and difference.mean == pytest.approx(50.0)


def test_study_report_scores_evaluations_by_task_and_id(tmp_path: Path) -> None:
    """Two tasks share the id "0": the report's differences pair (task, id), so neither overwrites the other."""
    stage = tmp_path / "zero-shot"
    stage.mkdir()
    for method, scores in (("lora", (0.5, 0.1)), ("orchmoe", (0.7, 0.3))):
        rows = [_prediction(task, "0", score) for task, score in zip(("t1", "t2"), scores)]
        (stage / f"{method}.predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (stage / f"{method}.json").write_text(json.dumps({"results": {"rougeL": 100 * sum(scores) / 2,
                                                                      "exact_match": 0.0}, "n_instances": 2}))
    table = _module("benchmarks/study/report.py")._evaluation_table(tmp_path, "zero-shot", "lora")
    orchmoe = next(line for line in table if line.startswith("| orchmoe |"))
    assert "+20.00 [+20.00, +20.00]" in orchmoe  # 0.7 - 0.5 and 0.3 - 0.1, each in its own task


COMMITTED_SWEEPS = sorted([*(REPO / "docs" / "results" / "adapt-quickstart").glob("*/adapt_results.jsonl"),
                           *(REPO / "benchmarks" / "study" / "results").glob("*/adapt/*/adapt_results.jsonl")])


@pytest.mark.parametrize("path", COMMITTED_SWEEPS, ids=lambda p: str(p.relative_to(REPO)))
def test_committed_sweeps_read_with_task_and_id_keys(path: Path) -> None:
    """Committed results key ``scores`` by id alone inside one task's cell: read as (cell task, id), with the
    overall numbers the committed summary recorded."""
    rows = read_results(path)
    assert rows and all(key[0] == row["task"] for row in rows for key in row["scores"])
    recorded = path.parent / "adapt_summary.json"
    if recorded.is_file():
        overall = json.loads(recorded.read_text())["overall"]
        assert {k: v["mean"] for k, v in summarise(rows)["overall"].items()} == pytest.approx(
            {k: v["mean"] for k, v in overall.items()})


def test_routing_ablation_reads_committed_and_task_keyed_scores() -> None:
    ablation = _module("benchmarks/orchmoe_routing.py")
    committed = [json.loads(p.read_text()) for p in sorted(ablation.RESULTS.glob("*.json"))]
    assert committed
    for result in committed:  # written before scores were grouped by task: ids alone, paired with each other
        points = ablation._points(result)
        assert len(points) == len(result["scores"])
        assert paired_bootstrap(points, ablation._points(committed[0])).n == len(points)
    new = {"scores": {"t1": {"0": 0.5, "1": 1.0}, "t2": {"0": 0.0, "1": 0.25}}}
    assert ablation._points(new) == {("t1", "0"): 50.0, ("t1", "1"): 100.0, ("t2", "0"): 0.0, ("t2", "1"): 25.0}
