"""`orchmoe adapt` on tiny models: each mode trains exactly what it claims, pools stay apart from evaluation,
a sweep resumes without recomputing (bad input: rows in test_bad_inputs.py)."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from rich.console import Console

from orchmoe_cli.adapters import load_adapted
from orchmoe_cli.adapters.few_shot import movable_parameter_count, prepare_for_adaptation
from orchmoe_cli.adapters.registry import SPECS
from orchmoe_cli.analysis.adaptation_report import read_results
from orchmoe_cli.commands import adapt as adapt_module
from orchmoe_cli.core.base_models import load_model
from orchmoe_cli.core.fit import fit, make_accelerator
from orchmoe_cli.core.recipe_data import prepare_data
from orchmoe_cli.data.collate import pad_token_id
from orchmoe_cli.data.dataset_cache import POOL
from orchmoe_cli.data.rows import TaskRows
from orchmoe_cli.recipe import TrainConfig, load_recipe

QUIET = Console(file=io.StringIO())
NEW_TASK = "task101_delta_rewrite"


def _recipe(path: Path, sni: Path, run: Path, method: str) -> Path:
    path.write_text(f"""\
data: {{source: {sni}, cache_dir: {run.parent / 'cache'}, num_pos_examples: 0, max_source_length: 96,
       max_target_length: 16, max_test_instances: 3}}
model: {{name: tiny-llama, tiny: {{hidden_size: 32, num_layers: 2, num_heads: 4, intermediate_size: 64}}}}
method: {{name: {method}, rank: 4, alpha: 4, n_skills: 2{', n_heads: 2' if method == 'mhr' else ''}}}
train: {{steps: 3, batch_size: 4, lr: 0.03, router_lr: 0.1}}
eval: {{max_instances: 2, batch_size: 2, max_new_tokens: 4}}
adapt: {{steps: 3, batch_size: 2, lr: 0.05, router_lr: 0.5, val_instances: 1, eval_every: 2}}
output: {{dir: {run}}}
""")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """method -> (recipe, checkpoint) of a 3-step tiny run; held-out tasks keep 3 instances for evaluation
    and the other 3 as their adaptation pool."""
    from conftest import _SNI_TEST_TASKS, _SNI_TRAIN_TASKS, _sni_task

    root = tmp_path_factory.mktemp("adapt")
    sni = root / "sni"
    (sni / "tasks").mkdir(parents=True)
    for name in _SNI_TRAIN_TASKS + _SNI_TEST_TASKS:
        (sni / "tasks" / f"{name}.json").write_text(json.dumps(_sni_task(name)), encoding="utf-8")
    (sni / "train_tasks.txt").write_text("\n".join(_SNI_TRAIN_TASKS) + "\n", encoding="utf-8")
    (sni / "test_tasks.txt").write_text("\n".join(_SNI_TEST_TASKS) + "\n", encoding="utf-8")
    out = {}
    for method in ("lora", "mhr", "orchmoe", "hyperloader"):
        recipe = _recipe(root / f"{method}.yaml", sni, root / f"run-{method}", method)
        assert run_cli(["train", str(recipe)]) == 0
        out[method] = (recipe, root / f"run-{method}" / "checkpoints" / "step-000003")
    return out


# mode -> checkpoint method, the parameter groups that must change, and whether a task row is added
MODES = {"lora": ("lora", {"adapters"}), "mhr": ("mhr", {"adapters", "routers"}), "mhr_z": ("mhr", {"routers"}),
         "mhr_mu": ("mhr", {"adapters"}), "orchmoe": ("orchmoe", {"adapters"}),
         "hyperloader": ("hyperloader", {"hyper.task_embedding"})}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_each_mode_trains_exactly_what_it_claims(mode: str, trained: dict, tmp_path: Path) -> None:
    method, changing = MODES[mode]
    recipe_path, checkpoint = trained[method]
    recipe = load_recipe(recipe_path)
    prepared = prepare_data(recipe, QUIET)
    loaded = load_model(recipe.model)
    model = load_adapted(copy.deepcopy(loaded.model), checkpoint)
    n_train = len(model.task_names)
    prepare_for_adaptation(model, mode, NEW_TASK)
    before = {n: p.detach().clone() for n, p in model.named_adapter_parameters()}
    rows = TaskRows(prepared.dataset[POOL]).of_tasks([NEW_TASK])
    # weight decay on: the training tasks' rows must stay fixed by the mode itself, not by the optimizer settings
    cfg = TrainConfig(steps=3, batch_size=2, lr=0.05, router_lr=0.5, hypernetwork_lr=0.05, weight_decay=0.1,
                      schedule="constant", log_every=1)
    seen_task_ids = []
    original_forward = model.forward

    def recording_forward(**batch):  # noqa: ANN003, ANN202 - pass-through
        seen_task_ids.append(batch.get("task_ids"))
        return original_forward(**batch)

    model.forward = recording_forward  # type: ignore[method-assign]
    fit(model, rows, cfg, tmp_path / "cell", make_accelerator(cfg, SPECS[method]),
        pad_id=pad_token_id(loaded.tokenizer), causal=True, recipe_yaml="{}\n", console=QUIET)
    for name, param, group in model.named_adapter_tensors():
        key = name if name == "hyper.task_embedding" else group
        if key in changing:
            assert not torch.equal(param, before[name]) or param.numel() == 0, f"{name} did not train"
        else:
            assert torch.equal(param, before[name]), f"{name} changed but {mode} freezes it"
        if name.endswith(".router.logits"):  # the training tasks' routing rows: bit-identical
            assert torch.equal(param[:n_train], before[name][:n_train]), name
        if name == "hyper.task_embedding":
            assert torch.equal(param[:n_train], before[name][:n_train])
    moved = sum(int((param != before[name]).sum()) for name, param in model.named_adapter_parameters())
    movable = movable_parameter_count(model)  # what the results report as the mode's trainable count
    assert 0.9 * movable <= moved <= movable, (moved, movable)
    if mode == "orchmoe":
        assert seen_task_ids and all(ids is None for ids in seen_task_ids)  # no task id, ever
    elif mode in ("mhr", "mhr_z", "hyperloader"):
        assert all(ids is not None and (ids == n_train).all() for ids in seen_task_ids)  # the new task's row


def test_lora_scratch_matches_the_checkpoint_count(trained: dict) -> None:
    recipe_path, checkpoint = trained["mhr"]
    recipe = load_recipe(recipe_path)
    base = load_model(recipe.model).model
    mhr = load_adapted(copy.deepcopy(base), checkpoint).count_parameters()["total_trainable"]
    cell = adapt_module.Cell(NEW_TASK, "lora_scratch", 2, 1)
    scratch = adapt_module._build(cell, base, adapt_module.describe_checkpoint(base, checkpoint), recipe)
    count = scratch.count_parameters()["total_trainable"]
    assert abs(count - mhr) <= 0.05 * mhr and scratch.method.name == "lora"


def test_pool_draws_never_touch_evaluation_instances(trained: dict) -> None:
    recipe = load_recipe(trained["lora"][0])
    prepared = prepare_data(recipe, QUIET)
    evaluation = set(prepared.dataset["test"]["id"])
    pool = prepared.dataset[POOL]
    for seed in (1, 2, 3):
        shots, val = adapt_module._draw(TaskRows(pool), adapt_module.Cell(NEW_TASK, "lora", 2, seed), 1)
        ids = [pool[i]["id"] for i in shots.positions() + (val.positions() if val else [])]
        assert len(set(ids)) == 3 and not set(ids) & evaluation and all(i.startswith(NEW_TASK) for i in ids)


def test_sweep_resumes_and_matches_an_uninterrupted_one(trained: dict, tmp_path: Path, monkeypatch) -> None:
    recipe, checkpoint = trained["mhr"]
    args = ["adapt", str(recipe), f"adapt.checkpoint={checkpoint}", "--modes", "zero_shot,mhr_z", "--shots", "2",
            "--seeds", "1,2", "--tasks", NEW_TASK]
    assert run_cli([*args, f"adapt.output_dir={tmp_path / 'a'}"]) == 0
    reference = read_results(tmp_path / "a" / "adapt_results.jsonl")
    assert [r["key"].split("/", 1)[1] for r in reference] == ["zero_shot/k0/s0", "mhr_z/k2/s1", "mhr_z/k2/s2"]
    for row in reference:  # each cell's per-sample predictions are its one per-instance record
        path = tmp_path / "a" / "predictions" / f"{row['key'].replace('/', '-')}.jsonl"
        samples = [json.loads(line) for line in path.open()]
        assert all("prediction" in s for s in samples) and len(samples) == len(row["scores"])
        assert 100 * sum(s["rougeL"] for s in samples) / len(samples) == pytest.approx(row["rougeL"])
    assert not (tmp_path / "a" / "cells").exists()  # cells train in memory: no checkpoint, no plot, no eval dir

    real = adapt_module.run_cell
    calls = []

    def interrupted_third(cell, *rest):  # noqa: ANN001, ANN002, ANN202
        calls.append(cell.key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(cell, *rest)

    monkeypatch.setattr(adapt_module, "run_cell", interrupted_third)
    assert run_cli([*args, f"adapt.output_dir={tmp_path / 'b'}"]) == 130
    monkeypatch.setattr(adapt_module, "run_cell", lambda cell, *rest: (calls.append(cell.key), real(cell, *rest))[1])
    assert run_cli([*args, f"adapt.output_dir={tmp_path / 'b'}"]) == 0
    assert calls[3:] == [reference[2]["key"]]  # only the interrupted cell ran again
    resumed = read_results(tmp_path / "b" / "adapt_results.jsonl")
    for a, b in zip(reference, resumed, strict=True):
        assert (a["key"], a["scores"], a["trainable"]) == (b["key"], b["scores"], b["trainable"])
    assert (tmp_path / "b" / "adapt_summary.md").is_file() and (tmp_path / "b" / "sample_efficiency.png").is_file()
    assert set(json.loads((tmp_path / "b" / "pool_shift.json").read_text())) == {NEW_TASK}  # the adapted task
    assert "## Adaptation pools" in (tmp_path / "b" / "adapt_summary.md").read_text()


def test_sigkill_mid_cell_then_rerun_gives_the_uninterrupted_results(trained: dict, tmp_path: Path) -> None:
    """A sweep killed inside a cell's training: the rerun keeps the finished cell, restarts the killed one
    from scratch, and ends with the same lines as a sweep that was never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    recipe, checkpoint = trained["mhr"]
    args = ["adapt", str(recipe), f"adapt.checkpoint={checkpoint}", "--modes", "mhr", "--shots", "2", "--seeds",
            "1,2", "--tasks", NEW_TASK, "adapt.steps=120", "adapt.eval_every=120"]
    assert run_cli([*args, f"adapt.output_dir={tmp_path / 'a'}"]) == 0
    reference = read_results(tmp_path / "a" / "adapt_results.jsonl")

    out = tmp_path / "b"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "orchmoe_cli", *args, f"adapt.output_dir={out}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    results = out / "adapt_results.jsonl"
    deadline = time.monotonic() + 120
    while not (results.is_file() and results.read_text().count("\n") == 1):  # the first cell is recorded
        assert proc.poll() is None, "the sweep ended before the kill point"
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.01)
    time.sleep(0.2)  # into the second cell's 120 steps (cells train in memory: nothing on disk shows the step)
    assert proc.poll() is None, "the sweep ended before the kill point"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert len((out / "adapt_results.jsonl").read_text().splitlines()) == 1

    assert run_cli([*args, f"adapt.output_dir={out}"]) == 0
    resumed = read_results(out / "adapt_results.jsonl")
    assert [(r["key"], r["scores"]) for r in resumed] == [(r["key"], r["scores"]) for r in reference]


def test_a_signal_inside_a_cell_stops_the_sweep_without_recording_it(trained: dict, tmp_path: Path,
                                                                     monkeypatch) -> None:
    import signal

    from orchmoe_cli.core.sampling import TaskBatchSampler

    recipe, checkpoint = trained["mhr"]
    original = TaskBatchSampler.batch

    def terminate_at_batch_1(self: TaskBatchSampler, index: int) -> list[int]:
        if index == 1:
            signal.raise_signal(signal.SIGTERM)
        return original(self, index)

    monkeypatch.setattr(TaskBatchSampler, "batch", terminate_at_batch_1)
    out = tmp_path / "out"
    assert run_cli(["adapt", str(recipe), f"adapt.checkpoint={checkpoint}", "--modes", "mhr", "--shots", "2",
                    "--tasks", NEW_TASK, f"adapt.output_dir={out}"]) == 130
    assert not (out / "adapt_results.jsonl").exists() or not (out / "adapt_results.jsonl").read_text().strip()


def test_a_sweep_with_other_settings_or_another_checkpoint_is_refused(trained: dict, tmp_path: Path,
                                                                       capsys) -> None:
    """Cells of one results file answer one question: a changed setting or checkpoint is one line, exit 2,
    and the file is untouched; a larger grid with the same settings is welcome."""
    recipe, checkpoint = trained["mhr"]
    out = tmp_path / "out"
    args = ["adapt", str(recipe), "--modes", "zero_shot", "--tasks", NEW_TASK, f"adapt.output_dir={out}"]
    assert run_cli([*args, f"adapt.checkpoint={checkpoint}"]) == 0
    before = (out / "adapt_results.jsonl").read_bytes()
    capsys.readouterr()
    for extra, words in ([f"adapt.checkpoint={checkpoint}", "adapt.lr=0.01"], "adapt.lr=0.05"), (
            [f"adapt.checkpoint={trained['lora'][1]}"], "another checkpoint"):
        assert run_cli([*args, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "adapt.output_dir" in err and len(err.splitlines()) == 1, err
        assert (out / "adapt_results.jsonl").read_bytes() == before
    assert run_cli([*args, f"adapt.checkpoint={checkpoint}", "--modes", "zero_shot,mhr_z", "--shots", "2"]) == 0
    assert len((out / "adapt_results.jsonl").read_text().splitlines()) == 2


def test_merged_sweeps_name_each_zero_shot_after_its_checkpoint(tmp_path: Path) -> None:
    from orchmoe_cli.analysis.adaptation_report import merge_results, summarise

    def line(mode: str, method: str, seed: int, score: float) -> dict:
        shots = 0 if mode == "zero_shot" else 4
        return {"task": NEW_TASK, "mode": mode, "shots": shots, "seed": seed, "method": method, "trainable": 1,
                "key": f"{NEW_TASK}/{mode}/k{shots}/s{seed}", "rougeL": score, "scores": {"a": score / 100}}

    for name, rows in {"orchmoe": [line("zero_shot", "orchmoe", 0, 10.0), line("orchmoe", "orchmoe", 1, 20.0)],
                       "mhr": [line("zero_shot", "mhr", 0, 30.0), line("mhr_z", "mhr", 1, 40.0)]}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapt_results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    merged = summarise(merge_results([tmp_path / "orchmoe" / "adapt_results.jsonl",
                                      tmp_path / "mhr" / "adapt_results.jsonl"]))
    assert {k: v["mean"] for k, v in merged["overall"].items()} == pytest.approx(
        {"zero_shot (orchmoe)@0": 10.0, "orchmoe@4": 20.0, "zero_shot (mhr)@0": 30.0, "mhr_z@4": 40.0})
    with pytest.raises(ValueError, match="more than one"):
        merge_results([tmp_path / "mhr" / "adapt_results.jsonl"] * 2)


def test_kept_adapters_are_scored_again_by_eval_and_inspected_as_adapted(trained: dict, tmp_path: Path,
                                                                        capsys, monkeypatch) -> None:
    """--keep-adapters leaves each cell's adapter and the recipe it ran (its train section is exactly what the cell
    trained with): `orchmoe eval` scores the adapter again (the same predictions), and `inspect-routing` marks the
    new task and lists its nearest training tasks."""
    recipe, checkpoint = trained["mhr"]
    out = tmp_path / "out"
    ran = []
    real_fit = adapt_module.fit
    monkeypatch.setattr(adapt_module, "fit", lambda model, rows, cfg, *a, **k: (ran.append(cfg),
                                                                              real_fit(model, rows, cfg, *a, **k))[1])
    assert run_cli(["adapt", str(recipe), f"adapt.checkpoint={checkpoint}", "--modes", "mhr", "--shots", "2",
                    "--tasks", NEW_TASK, f"adapt.output_dir={out}", "--keep-adapters", "adapt.eval_every=2"]) == 0
    line = json.loads((out / "adapt_results.jsonl").read_text())
    adapter = out / "cells" / f"{NEW_TASK}-mhr-k2-s13" / "adapter"
    assert json.loads((adapter / "tasks.json").read_text())[-1] == NEW_TASK
    [cfg] = ran
    kept = load_recipe(adapter / "recipe.yaml")
    assert kept.train == cfg and line["train"] == dataclasses.asdict(cfg)  # what the cell ran, not the outer recipe
    assert (cfg.steps, cfg.lr, cfg.weight_decay, cfg.schedule, cfg.seed) == (3, 0.05, 0.0, "constant", 13)
    assert kept.eval.tasks == [NEW_TASK]
    assert run_cli(["eval", str(recipe), f"eval.checkpoint={adapter}", f"eval.tasks=[{NEW_TASK}]",
                    f"eval.output_dir={tmp_path / 'again'}"]) == 0
    [again] = (tmp_path / "again").glob("eval-adapter-*")

    def predictions(path: Path) -> list[tuple[str, str]]:
        return [(r["id"], r["prediction"]) for r in map(json.loads, path.open())]

    assert predictions(again / "predictions.jsonl") == predictions(out / "predictions" / f"{adapter.parent.name}.jsonl")
    assert json.loads((again / "results.json").read_text())["results"]["rougeL"] == pytest.approx(line["rougeL"])
    capsys.readouterr()
    assert run_cli(["inspect-routing", str(adapter), "--format", "json", "--out", str(tmp_path / "routing")]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows[NEW_TASK]["adapted"] and not rows[NEW_TASK]["training"]
    assert not any(r["adapted"] for name, r in rows.items() if name != NEW_TASK)
    assert NEW_TASK not in {t["task"] for r in rows.values() for t in r["nearest_training_tasks"]}
    assert len(rows[NEW_TASK]["nearest_training_tasks"]) > 0


def test_validation_generates_in_eval_batches_not_training_batches(trained: dict, tmp_path: Path,
                                                                    monkeypatch) -> None:
    recipe, checkpoint = trained["lora"]
    real, sizes = adapt_module.score_rows, []

    def recording(model, tokenizer, is_encoder_decoder, rows, cfg, *rest):  # noqa: ANN001, ANN002, ANN202
        sizes.append(cfg.batch_size)
        return real(model, tokenizer, is_encoder_decoder, rows, cfg, *rest)

    monkeypatch.setattr(adapt_module, "score_rows", recording)
    assert run_cli(["adapt", str(recipe), f"adapt.checkpoint={checkpoint}", "--modes", "lora", "--shots", "1",
                    "--seeds", "1", "--tasks", NEW_TASK, "eval.batch_size=3", "adapt.batch_size=2",
                    f"adapt.output_dir={tmp_path / 'out'}"]) == 0
    assert len(sizes) >= 2 and set(sizes) == {3}  # the validations (eval_every 2 of 3 steps) and the final scoring
