"""Resuming refuses what would change the run or leave the user going in circles, a reused evaluation rewrites
what it derives, prepared data gets the umask's permissions, and warnings go to stderr."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import run_cli
from rich.console import Console
from test_eval import write_recipe as eval_recipe
from test_train import write_recipe as train_recipe

from orchmoe_cli.commands import adapt as adapt_module
from orchmoe_cli.core.metrics import aggregate


def _files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    return err


def test_resume_refuses_a_changed_length_only_where_the_schedule_depends_on_it(sni_dir: Path, tmp_path: Path,
                                                                               capsys) -> None:
    """A linear schedule decays to 0 at train.steps and is rebuilt from the recipe on resume: another length would
    make the learning rate jump. A constant schedule does not depend on it."""
    linear = train_recipe(tmp_path / "linear.yaml", sni_dir, tmp_path / "linear", method="lora", steps=2)
    assert run_cli(["train", str(linear)]) == 0
    before = _files(tmp_path / "linear")
    capsys.readouterr()
    assert run_cli(["train", str(linear), "--resume", "train.steps=4"]) == 2
    err = _one_line(capsys)
    assert "train.steps" in err and "train.steps=2" in err and "another output.dir" in err, err
    assert _files(tmp_path / "linear") == before

    constant = train_recipe(tmp_path / "constant.yaml", sni_dir, tmp_path / "constant", method="lora", steps=2,
                            schedule="constant")
    assert run_cli(["train", str(constant)]) == 0
    assert run_cli(["train", str(constant), "--resume", "train.steps=3"]) == 0
    assert json.loads((tmp_path / "constant" / "train_summary.json").read_text())["step"] == 3


def test_a_directory_another_run_holds_is_reported_as_in_use(sni_dir: Path, tmp_path: Path, capsys) -> None:
    """A run that is still starting has written no checkpoint yet: the lock, not the directory's contents, says
    why another run cannot start there, with or without --resume."""
    trained = train_recipe(tmp_path / "r.yaml", sni_dir, tmp_path / "trained", method="lora", steps=1)
    assert run_cli(["train", str(trained)]) == 0
    capsys.readouterr()
    starting, running = tmp_path / "starting", tmp_path / "running"
    starting.mkdir()
    shutil.copytree(tmp_path / "trained", running)
    for run, args in ((starting, ["--resume"]), (running, [])):
        (run / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
        before = _files(run)
        assert run_cli(["train", str(trained), f"output.dir={run}", *args]) == 2
        err = _one_line(capsys)
        assert f"{run} is in use by another orchmoe run" in err, err
        assert _files(run) == before


def test_only_damaged_checkpoints_say_how_to_train_afresh(sni_dir: Path, tmp_path: Path, capsys) -> None:
    """With every checkpoint damaged, neither `--resume` nor running without it may send the user to the other:
    both name the checkpoint to delete (or another output.dir), and following that works."""
    run = tmp_path / "run"
    recipe = train_recipe(tmp_path / "r.yaml", sni_dir, run, method="lora", steps=1)
    assert run_cli(["train", str(recipe)]) == 0
    damaged = run / "checkpoints" / "step-000001"
    (damaged / "training_state" / "optimizer.json").unlink()
    capsys.readouterr()
    for args in ([], ["--resume"]):
        assert run_cli(["train", str(recipe), *args]) == 2
        err = _one_line(capsys)
        assert f"delete {damaged} or choose another output.dir" in err, err
        assert "pass --resume" not in err and "without --resume" not in err, err
    shutil.rmtree(damaged)
    assert run_cli(["train", str(recipe)]) == 0


def test_a_reused_evaluation_rewrites_what_it_derives_from_its_predictions(sni_dir: Path, tmp_path: Path,
                                                                           capsys) -> None:
    """Edited scores and deleted result files of a finished evaluation are restored from its verified predictions,
    and the numbers printed are the numbers written."""
    recipe = eval_recipe(tmp_path / "r.yaml", sni_dir, tmp_path / "out", "tiny-t5")
    results = tmp_path / "out" / "eval-base"
    assert run_cli(["eval", str(recipe), "eval.max_instances=1"]) == 0
    first = _files(results)
    edited = json.loads((results / "results.json").read_text())
    edited["results"]["rougeL"] = 77.7
    (results / "results.json").write_text(json.dumps(edited))
    (results / "results.md").unlink()
    (results / "recipe.yaml").unlink()
    capsys.readouterr()

    assert run_cli(["eval", str(recipe), "eval.max_instances=1"]) == 0
    printed = capsys.readouterr().out
    assert "reusing the identical evaluation" in printed
    assert _files(results) == first  # provenance (versions, date) included: the run that made the predictions
    rows = [json.loads(line) for line in (results / "predictions.jsonl").read_text().splitlines()]
    written = json.loads((results / "results.json").read_text())["results"]
    assert written == aggregate(rows) and "77.70" not in printed


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_prepared_data_directories_get_the_umask_permissions(umask: int, sni_dir: Path, tmp_path: Path) -> None:
    recipe = eval_recipe(tmp_path / "r.yaml", sni_dir, tmp_path / "out", "tiny-t5")
    previous = os.umask(umask)
    try:
        assert run_cli(["prepare", str(recipe)]) == 0
    finally:
        os.umask(previous)
    [prepared] = (tmp_path / "out" / "prepared").iterdir()
    assert stat.S_IMODE(prepared.stat().st_mode) == 0o777 & ~umask


def test_the_prepare_truncation_warning_goes_to_stderr(sni_dir: Path, tmp_path: Path) -> None:
    recipe = eval_recipe(tmp_path / "r.yaml", sni_dir, tmp_path / "out", "tiny-t5")
    result = subprocess.run([sys.executable, "-m", "orchmoe_cli", "prepare", str(recipe), "data.max_source_length=24"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "longer than data.max_source_length" in " ".join(result.stderr.split()), result.stderr
    assert "longer than" not in result.stdout, result.stdout


def test_a_results_line_cut_short_is_a_logged_warning_not_output(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The line a killed sweep leaves is dropped with a warning through logging (stderr), never on the output."""
    identity = {"base": "tiny", "checkpoint_sha256": None, "init_from": None}
    (tmp_path / adapt_module.SWEEP).write_text(json.dumps(identity))
    line = {"key": "t/zero_shot/k0/s0", "task": "t", "mode": "zero_shot", "shots": 0, "seed": 0, "trainable": 0,
            "rougeL": 50.0, "scores": {"0": 0.5}, **identity}  # an older line: its scores inline
    (tmp_path / adapt_module.RESULTS).write_text(json.dumps(line) + '\n{"key": "t/zero')
    output = io.StringIO()
    with caplog.at_level(logging.WARNING, logger=adapt_module.__name__):
        done = adapt_module._finished(tmp_path, [], identity, False, True, Console(file=output))
    assert [row["key"] for row in done] == ["t/zero_shot/k0/s0"]
    assert "line 2 was cut short" in caplog.text and output.getvalue() == ""


def test_adapters_on_a_base_with_other_weights_are_refused(sni_dir: Path, tmp_path: Path, capsys) -> None:
    """Same architecture and sizes, other weights (another random initialisation): resuming, evaluating or
    adapting on it would be silently wrong, so loading the adapters is refused naming the base model."""
    from test_train import write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", sni_dir, tmp_path / "run", "tiny-llama", "lora", steps=2,
                          schedule="constant")
    assert run_cli(["train", str(recipe)]) == 0
    capsys.readouterr()
    for argv in (["train", str(recipe), "--resume", "train.steps=3", "model.tiny.seed=7"],
                 ["eval", str(recipe), "eval.checkpoint=latest", "model.tiny.seed=7"]):
        assert run_cli(argv) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "base_model.embedding_probe differs" in errors[0], errors
    assert run_cli(["eval", str(recipe), "eval.checkpoint=latest"]) == 0  # the base it was trained on
