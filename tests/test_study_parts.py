"""Parts of the study driver on hand-written result files: the plan's estimates (the pace of finished pieces, this
scale first, then the `cpu` scale, read leniently), the report's per-task table and its check of the predictions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _study_module(name: str):
    """``benchmarks/study/<name>.py`` (the study's folder is not a package; report.py imports its neighbours)."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks" / "study"))
    try:
        spec = importlib.util.spec_from_file_location(f"study_{name}", REPO / "benchmarks" / "study" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks" / "study"))
    return module


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record), encoding="utf-8")


def test_each_piece_is_priced_from_the_nearest_measurement(tmp_path: Path) -> None:
    here, cpu = tmp_path / "cpu-10x", tmp_path / "cpu"
    _write(here / "train" / "orchmoe.json", {"step": 1000, "wall_s": 6000.0})
    _write(cpu / "train" / "orchmoe.json", {"step": 100, "wall_s": 700.0})
    _write(cpu / "train" / "lora.json", {"step": 100, "wall_s": 300.0})
    _write(here / "zero-shot" / "orchmoe.json", {"wall_s": 170.0})
    _write(here / "zero-shot" / "base.json", {"wall_s": 450.0})
    _write(cpu / "in-distribution" / "lora.json", {"wall_s": 70.0})
    (cpu / "adapt" / "lora").mkdir(parents=True)
    (cpu / "adapt" / "lora" / "adapt_results.jsonl").write_text(
        "".join(json.dumps({"mode": m, "wall_s": w}) + "\n" for m, w in
                (("zero_shot", 10.0), ("lora_scratch", 50.0), ("lora_scratch", 70.0), ("lora", 90.0))))
    module = _study_module("estimate")
    estimator = module.Estimator([here, cpu, tmp_path / "absent"])
    assert estimator.training("orchmoe", 1000) == pytest.approx(6000.0)  # this scale's own pace wins
    assert estimator.training("lora", 1000) == pytest.approx(3000.0)  # else the cpu scale's, per step
    assert estimator.training("poly", 10) == pytest.approx(60.0)  # an untrained method: the median pace here
    assert estimator.whole("zero-shot", base=False) == 170.0 and estimator.whole("zero-shot", base=True) == 450.0
    assert estimator.whole("in-distribution", base=False) == 70.0 and estimator.whole("routing", False) is None
    assert estimator.sweep({"zero_shot": 5, "lora_scratch": 2}) == pytest.approx(5 * 10 + 2 * 60)
    assert estimator.sweep({"mhr": 3}) == pytest.approx(3 * (50 + 70 + 90) / 3)  # unmeasured mode: trained cells' mean
    assert [module.duration(s) for s in (None, 30, 600, 7200)] == ["?", "30 s", "10 min", "2.0 h"]


def test_estimates_read_cut_and_incomplete_records_without_stopping(tmp_path: Path) -> None:
    module = _study_module("estimate")
    results = tmp_path / "cpu-10x"
    _write(results / "train" / "lora.json", {"step": 10})  # no wall_s: not a pace
    _write(results / "zero-shot" / "lora.json", {"wall_s": "soon"})
    sweep = results / "adapt" / "lora" / "adapt_results.jsonl"
    sweep.parent.mkdir(parents=True)
    sweep.write_text(json.dumps({"mode": "lora_scratch", "wall_s": 40.0}) + "\n" + json.dumps({"mode": "lora"})
                     + "\n" + '{"mode": "lora_scr', encoding="utf-8")  # a line without wall_s, one cut by a kill
    (results / "train" / "mhr.json").write_text("{not json", encoding="utf-8")
    estimator = module.Estimator([results])
    assert estimator.training("lora", 100) is None and estimator.whole("zero-shot", False) is None
    assert estimator.sweep({"lora_scratch": 2, "zero_shot": 0}) == 80.0  # a mode with no cell left costs nothing
    assert [row["mode"] for row in module.result_lines(sweep)] == ["lora_scratch", "lora"]
    assert module.read_object(results / "train" / "mhr.json") == {}


def test_the_per_task_table_shows_every_zero_shot_column_and_the_pool_shift(tmp_path: Path) -> None:
    report = _study_module("report")
    cells = {"zero_shot (lora)@0": {"mean": 10.0}, "zero_shot (orchmoe)@0": {"mean": 12.5},
             "lora_scratch@16": {"mean": 20.0}, "orchmoe@16": {"mean": 22.25}}
    summary = {"by_task": {"t1": cells}, "columns": [
        {"mode": "zero_shot (lora)", "shots": 0}, {"mode": "zero_shot (orchmoe)", "shots": 0},
        {"mode": "lora_scratch", "shots": 16}, {"mode": "orchmoe", "shots": 16}]}
    _write(tmp_path / "adapt" / "pool_shift.json", {"t1": {"mismatch": 0.22, "shifted": True}})
    lines = report._per_task(summary, tmp_path)
    header = next(line for line in lines if line.startswith("| task"))
    assert header == "| task | pool mismatch | k | zero_shot (lora) | zero_shot (orchmoe) | lora_scratch | orchmoe |"
    assert "| t1 | 0.22 unlike | 16 | 10.00 | 12.50 | 20.00 | 22.25 |" in lines


def test_the_report_refuses_predictions_changed_after_their_evaluation(tmp_path: Path) -> None:
    from orchmoe_cli.core.results import text_sha256

    report = _study_module("report")
    rows = [{"task": "t1", "id": str(i), "rougeL": 0.5, "exact_match": 0.0} for i in range(5)]
    text = "".join(json.dumps(row) + "\n" for row in rows)
    for method in ("lora", "orchmoe"):
        (tmp_path / "zero-shot").mkdir(exist_ok=True)
        (tmp_path / "zero-shot" / f"{method}.predictions.jsonl").write_text(text, encoding="utf-8")
        _write(tmp_path / "zero-shot" / f"{method}.json", {"results": {"rougeL": 50.0, "exact_match": 0.0},
                                                           "n_instances": 5, "predictions_sha256": text_sha256(text)})
    assert any("| orchmoe |" in line for line in report._evaluation_table(tmp_path, "zero-shot", "lora"))
    (tmp_path / "zero-shot" / "orchmoe.predictions.jsonl").write_text(text.replace("0.5", "0.9"), encoding="utf-8")
    with pytest.raises(SystemExit, match="orchmoe.predictions.jsonl: changed since its evaluation"):
        report._evaluation_table(tmp_path, "zero-shot", "lora")


def test_the_report_refuses_recorded_scores_its_predictions_do_not_give(tmp_path: Path) -> None:
    """Result files from before evaluations recorded a digest are checked by their scores instead."""
    report = _study_module("report")
    rows = [{"task": "t1", "id": str(i), "rougeL": 0.5, "exact_match": 0.0} for i in range(4)]
    (tmp_path / "zero-shot").mkdir()
    for method, rougeL in (("lora", 50.0), ("orchmoe", 62.5)):
        (tmp_path / "zero-shot" / f"{method}.predictions.jsonl").write_text(
            "".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        _write(tmp_path / "zero-shot" / f"{method}.json", {"results": {"rougeL": rougeL, "exact_match": 0.0},
                                                           "n_instances": 4})
    with pytest.raises(SystemExit, match=r"orchmoe.json: rougeL 62.5 is recorded, but its 4 per-instance"):
        report._evaluation_table(tmp_path, "zero-shot", "lora")


def test_the_cost_table_sums_each_methods_pieces_by_stage(tmp_path: Path) -> None:
    report = _study_module("report")
    _write(tmp_path / "train" / "lora.json", {"wall_s": 120.0})
    _write(tmp_path / "zero-shot" / "lora@300.json", {"wall_s": 30.0})  # an earlier checkpoint: still lora
    _write(tmp_path / "zero-shot" / "lora.json", {"wall_s": 30.0})
    _write(tmp_path / "adapt" / "lora-one-seed" / "done.json", {"wall_s": 300.0})
    _write(tmp_path / "zero-shot" / "base.json", {"wall_s": 240.0})
    lines = report._wall_clock(tmp_path)
    assert lines[0] == "| method | train min | zero-shot min | adapt min | total min |"
    assert "| lora | 2.0 | 1.0 | 5.0 | 8.0 |" in lines and "| base |  | 4.0 |  | 4.0 |" in lines
    assert lines[-1] == "Total recorded wall-clock: 0.2 hours on the machine below."


def test_each_evaluation_table_gets_its_forest_plot(tmp_path: Path) -> None:
    report = _study_module("report")
    for method, value in (("lora", 0.5), ("orchmoe", 0.75)):
        rows = [{"task": "t1", "id": str(i), "rougeL": value, "exact_match": 0.0} for i in range(4)]
        (tmp_path / "zero-shot").mkdir(exist_ok=True)
        (tmp_path / "zero-shot" / f"{method}.predictions.jsonl").write_text(
            "".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        _write(tmp_path / "zero-shot" / f"{method}.json", {"results": {"rougeL": 100 * value, "exact_match": 0.0},
                                                           "n_instances": 4})
    lines = report._evaluation_table(tmp_path, "zero-shot", "lora", tmp_path / "study")
    assert lines[-1] == "![zero-shot minus lora](study/zero-shot-minus-lora.png)"
    assert (tmp_path / "study" / "zero-shot-minus-lora.png").read_bytes().startswith(b"\x89PNG")


def test_the_driver_runs_part_of_a_scale(tmp_path: Path) -> None:
    """--methods and a list of --only stages narrow the plan; a method the scale does not train is refused."""
    import subprocess
    import sys

    command = [sys.executable, str(REPO / "benchmarks" / "study" / "run.py"), "--scale", "tiny", "--plan",
               "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")]
    plan = subprocess.run([*command, "--methods", "lora", "--only", "train,zero-shot"], capture_output=True,
                          text=True, timeout=300, check=False)
    assert plan.returncode == 0, plan.stderr
    listed = [line.split("│")[1:3] for line in plan.stdout.splitlines() if line.count("│") == 4]
    assert [(stage.strip(), piece.strip()) for stage, piece in listed if stage.strip()] == [
        ("zero-shot", "base"), ("train", "lora"), ("zero-shot", "lora"), ("zero-shot", "lora@1")]
    wrong = subprocess.run([*command, "--scale", "cpu-10x", "--methods", "hyperloader"], capture_output=True,
                           text=True, timeout=300, check=False)
    assert wrong.returncode == 2 and "--methods: the cpu-10x scale trains orchmoe, lora, mhr, poly" in wrong.stderr
    bad = subprocess.run([*command, "--set", "eval.nope=1"], capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode == 2 and "--set: " in bad.stderr and "eval.nope (set on the command line)" in bad.stderr


def test_set_reaches_every_command_and_the_recipe_read(tmp_path: Path) -> None:
    run = _study_module("run")
    study = run.Study("tiny", tmp_path / "results", tmp_path / "runs", overrides=("eval.max_new_tokens=3",))
    assert study.settings("mhr_mu_avg")[-2:] == ["eval.max_new_tokens=3", f"output.dir={tmp_path / 'runs'}/mhr_mu_avg"]
    assert study.config.eval.max_new_tokens == 3
