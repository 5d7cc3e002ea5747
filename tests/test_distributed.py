"""Two CPU processes under `accelerate launch` (gloo), as a multi-GPU run: OrchMoE's batch terms see the global
batch, a run resumes on another number of processes, and `orchmoe adapt` writes each result once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import run_cli
from test_train import _free_port, write_recipe

from orchmoe_cli.core.training_log import read_metrics

LAUNCHER = Path(sys.executable).with_name("accelerate")
pytestmark = pytest.mark.skipif(not LAUNCHER.exists(), reason="accelerate launcher not installed")


def launch(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [str(LAUNCHER), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
         "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "orchmoe_cli", *args],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_orchmoe_batch_terms_and_resume_on_another_process_count(sni_dir: Path, tmp_path: Path) -> None:
    """Two processes train with replicas in sync; at one global batch of 4, the mutual-information term of one
    process and of two (2 rows each) agree: the batch marginal is gathered across processes. A run saved by one
    process resumes on two."""
    one = write_recipe(tmp_path / "one.yaml", sni_dir, tmp_path / "one", method="orchmoe", steps=1, batch_size=4,
                       warmup_steps=0, schedule="constant")  # constant: resuming may extend the run
    two = write_recipe(tmp_path / "two.yaml", sni_dir, tmp_path / "two", method="orchmoe", steps=1, batch_size=2,
                       warmup_steps=0, schedule="constant")
    assert run_cli(["train", str(one)]) == 0
    launch("train", str(two))
    two_summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert two_summary["processes"] == 2 and two_summary["replicas_in_sync"]
    assert [p.name for p in (tmp_path / "two" / "checkpoints").iterdir()] == ["step-000001"]
    [single] = read_metrics(tmp_path / "one" / "metrics.jsonl")
    [double] = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert single["mutual_information"] == pytest.approx(double["mutual_information"], rel=1e-4, abs=1e-6)

    result = launch("train", str(one), "train.steps=2", "--resume")
    assert "saved by 1 process(es) and resumes on 2" in result.stdout + result.stderr
    summary = json.loads((tmp_path / "one" / "train_summary.json").read_text())
    assert summary["step"] == 2 and summary["processes"] == 2 and summary["replicas_in_sync"]


def test_adapt_under_two_processes_writes_each_result_once(sni_dir: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", sni_dir, tmp_path / "run", method="lora", steps=2)
    pool = "data.max_test_instances=3"  # the other 3 instances of each held-out task form its adaptation pool
    assert run_cli(["train", str(recipe), pool]) == 0
    out = tmp_path / "adapt"
    launch("adapt", str(recipe), pool, "adapt.checkpoint=latest", "--modes", "zero_shot,lora", "--shots", "2",
           "--tasks", "task101_delta_rewrite", "adapt.steps=2", "adapt.val_instances=0", "eval.max_instances=2",
           f"adapt.output_dir={out}")
    lines = (out / "adapt_results.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["mode"] for line in lines) == ["lora", "zero_shot"]
    assert len(list((out / "predictions").iterdir())) == 2 and (out / "adapt_summary.md").is_file()


def test_two_processes_weigh_every_target_token_like_one() -> None:
    """The answers of one process are 2 tokens long, of the other 8: the averaged gradients still equal those of
    the whole batch's token mean in one process (each token counts once, not each process's mean)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    worker = Path(__file__).with_name("token_weights_worker.py")
    result = subprocess.run(
        [str(LAUNCHER), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
         "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(worker)],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("gradients equal") == 2
