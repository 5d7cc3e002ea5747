"""The comparison study's driver end to end at its tiny scale: every stage writes its result files, the report
is generated from them, and a rerun recomputes nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_study_runs_every_stage_and_resumes(tmp_path: Path) -> None:
    command = [sys.executable, str(REPO / "benchmarks" / "study" / "run.py"), "--scale", "tiny", "--results",
               str(tmp_path / "results"), "--runs", str(tmp_path / "runs"), "--report", str(tmp_path / "study.md")]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    results = tmp_path / "results"
    methods = {"lora", "poly", "mhr", "orchmoe", "hyperloader", "mhr_mu_avg"}
    assert {p.stem for p in (results / "train").glob("*.json")} == methods
    early = {"lora@1", "orchmoe@1"}  # the scale's earlier checkpoints scored zero-shot too
    for stage, extra in (("zero-shot", early), ("in-distribution", set())):
        assert {p.name.split(".")[0] for p in (results / stage).glob("*.predictions.jsonl")} == methods | {"base"} | extra
    routing = {p.stem: json.loads(p.read_text()) for p in (results / "routing").glob("*.json")}
    assert set(routing) == {f"{m}@{s}" for m in ("poly", "mhr", "orchmoe") for s in (1, 2)}
    assert routing["orchmoe@2"]["classifier"]["used_abstract_tasks"] >= 1
    held_back = _held_back_ids()  # in-distribution = exactly the rows training held back (train.val_instances)
    for method in methods | {"base"}:
        predictions = results / "in-distribution" / f"{method}.predictions.jsonl"
        assert {json.loads(line)["id"] for line in predictions.open()} == held_back
    scales = {json.loads(p.read_text())["lora_scale"] for p in (results / "train").glob("*.json")}
    assert scales == {1.0}  # one LoRA scale for every method
    rows = [json.loads(line) for p in (results / "adapt").glob("*/adapt_results.jsonl") for line in p.open()]
    trained = [json.loads(p.read_text()) for p in (results / "train").glob("*.json")]
    # committed result files name no machine's paths: checkpoints are relative to the runs directory
    assert not any(Path(r["checkpoint"]).is_absolute() for r in [*rows, *trained] if r.get("checkpoint"))
    modes = {row["mode"] for row in rows}
    assert {"lora_scratch", "lora", "mhr", "mhr_z", "mhr_mu", "orchmoe", "hyperloader", "zero_shot"} <= modes
    report = (tmp_path / "study.md").read_text()
    for heading in ("Zero-shot", "In-distribution", "Few-shot adaptation", "Routing", "Cost"):
        assert f"## {heading}" in report
    assert (tmp_path / "study" / "sample_efficiency.png").is_file()
    assert "study plan" in first.stdout and "total" in first.stdout  # the plan, with estimates, came first
    shifts = json.loads((results / "adapt" / "pool_shift.json").read_text())
    assert set(shifts) == {row["task"] for row in rows} and "### Per task" in report
    damaged = results / "adapt" / "orchmoe" / "pool_shift.json"  # said, and measured again from the data
    damaged.write_text("{")
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*.json")}
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"skipped, its tasks' measures taken from adapt/pool_shift.json or the prepared data: {damaged}: " in \
        again.stdout, again.stdout[-3000:]
    assert json.loads((results / "adapt" / "pool_shift.json").read_text()) == shifts
    assert "$ orchmoe" not in again.stdout  # every piece was done: no command ran again
    assert "nothing left to run" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*.json")} == before

    # a fresh machine has the committed result files but not the checkpoints: an unfinished piece that reads
    # one retrains it and goes on only if the adapter is bitwise the recorded one
    shutil.rmtree(tmp_path / "runs" / "mhr")
    (results / "adapt" / "mhr" / "done.json").unlink()
    record = results / "train" / "mhr.json"
    original = record.read_text()
    record.write_text(original.replace(json.loads(original)["adapter_checksums"][0], "0" * 64))
    plan = subprocess.run([*command, "--plan"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert plan.returncode == 0 and "retrain" in plan.stdout and "$ orchmoe" not in plan.stdout  # runs nothing
    refused = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert refused.returncode != 0 and "retrained mhr adapter differs" in refused.stderr + refused.stdout
    record.write_text(original)
    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "$ orchmoe train" in resumed.stdout and (results / "adapt" / "mhr" / "done.json").is_file()
    assert record.read_text() == original


def _held_back_ids() -> set[str]:
    import io
    import os

    from rich.console import Console

    from orchmoe_cli.commands.train import training_rows
    from orchmoe_cli.core.recipe_data import prepare_data
    from orchmoe_cli.data.rows import TaskRows
    from orchmoe_cli.recipe import load_recipe

    cwd = os.getcwd()
    os.chdir(REPO)  # the driver prepared the data from the repository root
    try:
        recipe = load_recipe(REPO / "benchmarks" / "study" / "tiny.yaml")
        prepared = prepare_data(recipe, Console(file=io.StringIO()))
    finally:
        os.chdir(cwd)
    train = prepared.dataset["train"]
    _, held = training_rows(TaskRows(train), recipe.train.val_instances)
    return {train[i]["id"] for i in held.positions()}
