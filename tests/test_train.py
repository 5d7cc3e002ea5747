"""`orchmoe train` on tiny models: learning, exact resume, locking, and real 2-process training."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from safetensors.torch import load_file
from tolerance import assert_close_scaled

from orchmoe_cli.adapters.registry import SPECS
from orchmoe_cli.cli import main
from orchmoe_cli.core.sampling import TaskBatchSampler
from orchmoe_cli.core.training_log import read_metrics

METHODS = list(SPECS)  # every registered method


def write_recipe(path: Path, sni: Path, run: Path, model: str = "tiny-t5", method: str = "poly", **train: object) -> Path:
    train_cfg = {"steps": 6, "batch_size": 4, "lr": 0.03, "router_lr": 0.1, "hypernetwork_lr": 0.01,
                 "log_every": 1, "warmup_steps": 1, **train}
    lines = [
        "data:", f"  source: {sni}", f"  cache_dir: {run.parent / 'prepared'}", "  num_pos_examples: 0",
        "  max_source_length: 96", "  max_target_length: 16",
        "model:", f"  name: {model}", "  tiny: {hidden_size: 32, num_layers: 2, num_heads: 4, intermediate_size: 64}",
        "method:", f"  name: {method}", "  rank: 4", "  alpha: 4", "  n_skills: 2",
        *(["  n_heads: 2"] if method.startswith("mhr") else []),
        *(["  task_embedding_dim: 16", "  projected_dim: 16", "  hidden_dim: 16"] if method == "hyperloader" else []),
        "train:", *[f"  {k}: {v}" for k, v in train_cfg.items()],
        "output:", f"  dir: {run}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def final_adapter(run: Path) -> dict[str, torch.Tensor]:
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    return load_file(str(newest / "adapter_model.safetensors"))


@pytest.mark.parametrize("model", ["tiny-t5", "tiny-llama"])
@pytest.mark.parametrize("method", METHODS)
def test_loss_decreases(method: str, model: str, sni_dir: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", sni_dir, tmp_path / "run", model, method, steps=24, batch_size=6,
                          schedule="constant")
    assert run_cli(["train", str(recipe)]) == 0
    losses = [row["lm_loss"] for row in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lm_loss" in row]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4, losses
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["replicas_in_sync"] and summary["step"] == 24
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 0


def test_resume_after_crash_is_bit_identical(sni_dir: Path, tmp_path: Path, monkeypatch) -> None:
    full = write_recipe(tmp_path / "a.yaml", sni_dir, tmp_path / "a", method="orchmoe", steps=6, save_every=2)
    assert run_cli(["train", str(full)]) == 0

    crashed = write_recipe(tmp_path / "b.yaml", sni_dir, tmp_path / "b", method="orchmoe", steps=6, save_every=2)
    original = TaskBatchSampler.batch

    def crash_at_batch_5(self: TaskBatchSampler, index: int) -> list[int]:
        if index == 5:
            raise RuntimeError("simulated crash")
        return original(self, index)

    monkeypatch.setattr(TaskBatchSampler, "batch", crash_at_batch_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["train", str(crashed)])
    assert not (tmp_path / "b" / ".lock").exists()
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    monkeypatch.setattr(TaskBatchSampler, "batch", original)
    assert run_cli(["train", str(crashed), "--resume"]) == 0

    a, b = final_adapter(tmp_path / "a"), final_adapter(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_saves_and_exits_130(signum: int, sni_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """Ctrl-C, and SIGTERM as kill, docker stop, SLURM and Kubernetes send it: finish the step, save, exit 130."""
    recipe = write_recipe(tmp_path / "r.yaml", sni_dir, tmp_path / "run", method="lora", steps=6)
    original = TaskBatchSampler.batch

    def interrupt_at_batch_3(self: TaskBatchSampler, index: int) -> list[int]:
        if index == 3:
            signal.raise_signal(signum)
        return original(self, index)

    monkeypatch.setattr(TaskBatchSampler, "batch", interrupt_at_batch_3)
    assert run_cli(["train", str(recipe)]) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and "step 4" in err
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000004"]


def test_second_run_on_same_output_is_refused(sni_dir: Path, tmp_path: Path, capsys) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", sni_dir, tmp_path / "run", method="lora")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename}))
    assert run_cli(["train", str(recipe)]) == 2
    errors = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning:")]
    assert len(errors) == 1 and "in use by another orchmoe run" in errors[0], errors
    assert not (tmp_path / "run" / "checkpoints").exists()


def _free_port() -> int:
    """A port nobody listens on, so a second 2-process run on the machine cannot collide with the default 29500."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_causal_loss_on_answer_positions_equals_full_loss() -> None:
    import torch.nn.functional as F

    from orchmoe_cli.core.base_models import load_model
    from orchmoe_cli.core.steps import lm_loss
    from orchmoe_cli.recipe import load_recipe

    model = load_model(load_recipe(None, ["model.name=tiny-llama"]).model).model
    input_ids = torch.randint(3, 300, (3, 12))
    labels = torch.full_like(input_ids, -100)
    labels[0, 5:8], labels[1, 9:12], labels[2, 2:4] = input_ids[0, 5:8], input_ids[1, 9:12], input_ids[2, 2:4]
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    logits = model(input_ids=input_ids).logits
    full = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert_close_scaled(lm_loss(model, batch, causal=True, label_smoothing=0.0)[0], full)


def test_resume_at_the_last_step_changes_nothing(sni_dir: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", sni_dir, run, method="lora", steps=2)
    assert run_cli(["train", str(recipe)]) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert run_cli(["train", str(recipe), "--resume", "train.steps=1"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("setting", ["report_to=[wandb]", "tensorboard=true"])
def test_a_missing_tracker_is_one_line_before_anything_is_written(setting: str, sni_dir: Path, tmp_path: Path,
                                                                  monkeypatch, capsys) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "wandb") else real(name, *a))
    recipe = write_recipe(tmp_path / "r.yaml", sni_dir, tmp_path / "run", method="lora")
    assert run_cli(["train", str(recipe), f"train.{setting}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.report_to" in err and "pip install" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_trackers_log_through_accelerate_offline(tracker: str, sni_dir: Path, tmp_path: Path,
                                                 monkeypatch) -> None:
    pytest.importorskip(tracker)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", sni_dir, run, method="lora", steps=2)
    assert run_cli(["train", str(recipe), f"train.report_to=[{tracker}]"]) == 0
    assert len(read_metrics(run / "metrics.jsonl")) == 2  # the JSONL record is always there
    if tracker == "tensorboard":
        assert list((run / "trackers").rglob("events.out.tfevents.*"))
    else:
        assert list(tmp_path.rglob("*.wandb"))


def test_init_from_continues_a_checkpoint_and_averages_for_mu(sni_dir: Path, tmp_path: Path, capsys) -> None:
    """train.init_from starts from a checkpoint's adapters; mhr_mu from an mhr checkpoint averages its routing
    first (MHR-µ), so the new run trains the skills of the average and saves no task routing."""
    mhr = write_recipe(tmp_path / "mhr.yaml", sni_dir, tmp_path / "mhr", "tiny-llama", "mhr", steps=2)
    assert run_cli(["train", str(mhr)]) == 0
    start = final_adapter(tmp_path / "mhr")
    mu = write_recipe(tmp_path / "mu.yaml", sni_dir, tmp_path / "mu", "tiny-llama", "mhr_mu", steps=2,
                      init_from=tmp_path / "mhr")
    assert run_cli(["train", str(mu)]) == 0
    after = final_adapter(tmp_path / "mu")
    newest = sorted((tmp_path / "mu" / "checkpoints").glob("step-*"))[-1]
    assert json.loads((newest / "adapter_config.json").read_text())["averaged"] is True
    assert set(after) == {k for k in start if "router" not in k}  # the skills, without task routing
    assert all(after[k].shape == start[k].shape and not torch.equal(after[k], start[k]) for k in after
               if "lora_A" in k)  # they trained on ...
    assert all((after[k] - start[k]).norm() < 0.5 * start[k].norm() for k in after if "lora_A" in k)  # ... from there
    capsys.readouterr()
    # resuming with another origin would record it for weights that came from the first one
    other = tmp_path / "mhr" / "checkpoints" / "step-000002"
    assert run_cli(["train", str(mu), "--resume", "train.steps=3", f"train.init_from={other}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.init_from" in err and "differs" in err and len(err.splitlines()) == 1, err
    lora = write_recipe(tmp_path / "lora.yaml", sni_dir, tmp_path / "lora", "tiny-llama", "lora", steps=2,
                        init_from=tmp_path / "mhr")
    assert run_cli(["train", str(lora)]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.init_from" in err and "the checkpoint is mhr" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "lora" / "checkpoints").exists()


def test_keep_steps_survive_pruning(sni_dir: Path, tmp_path: Path) -> None:
    """`train.keep_steps` saves those steps even off the save_every grid and never prunes them (routing along
    one run is compared at its kept steps)."""
    recipe = write_recipe(tmp_path / "r.yaml", sni_dir, tmp_path / "run", method="lora", save_every=2,
                          keep_last=1, keep_steps="[1, 4]")
    assert run_cli(["train", str(recipe)]) == 0
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step-000001", "step-000004", "step-000006"]
    assert run_cli(["train", str(recipe), "train.keep_steps=[7]"]) == 2  # not a step of a 6-step run
