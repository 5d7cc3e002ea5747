"""The reusable training core: `fit` on a few rows of one task, rows read from Arrow, explicit task ids."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from orchmoe_cli.adapters import attach_adapters
from orchmoe_cli.adapters.registry import spec_of
from orchmoe_cli.core.base_models import load_model
from orchmoe_cli.core.fit import fit, make_accelerator
from orchmoe_cli.core.recipe_data import prepare_data
from orchmoe_cli.core.training_log import read_metrics
from orchmoe_cli.data.collate import GenerationCollator, pad_token_id
from orchmoe_cli.data.rows import TaskRows
from orchmoe_cli.recipe import load_recipe

QUIET = Console(file=io.StringIO())


def _setup(sni_dir: Path, tmp_path: Path, method: str) -> tuple:
    recipe = load_recipe(None, [
        f"data.source={sni_dir}", f"data.cache_dir={tmp_path / 'cache'}", "data.num_pos_examples=0",
        "data.max_source_length=96", "model.name=tiny-llama",
        "model.tiny={hidden_size: 32, num_layers: 2, num_heads: 4, intermediate_size: 64}",
        f"method.name={method}", "method.rank=4", "method.n_skills=2",
        "train.steps=8", "train.batch_size=4", "train.lr=0.03", "train.router_lr=0.1", "train.log_every=1",
        "train.schedule=constant",
    ])
    prepared = prepare_data(recipe, QUIET)
    return recipe, prepared


def test_fit_trains_on_a_few_rows_of_one_unseen_task(sni_dir: Path, tmp_path: Path) -> None:
    """What few-shot adaptation does: a trained-task model, then `fit` on 4 rows of a held-out task."""
    recipe, prepared = _setup(sni_dir, tmp_path, "lora")
    test_rows = TaskRows(prepared.dataset["test"])
    first = test_rows.task_names[0]
    one_task = test_rows.of_tasks([first]).hold_out_first(4)[1]  # the first 4 rows of one test task
    assert len(one_task) == 4 and one_task.task_names == [first]

    accelerator = make_accelerator(recipe.train, spec_of(recipe.method.name))
    loaded = load_model(recipe.model)
    model = attach_adapters(loaded.model, recipe.method, ["task001_alpha_qa"])
    outcome = fit(model, one_task, recipe.train, tmp_path / "adapt", accelerator,
                  pad_id=pad_token_id(loaded.tokenizer), causal=True, recipe_yaml="{}\n", console=QUIET)
    assert outcome.step == 8 and outcome.final_checkpoint == tmp_path / "adapt" / "checkpoints" / "step-000008"
    losses = [row["lm_loss"] for row in read_metrics(tmp_path / "adapt" / "metrics.jsonl")]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert json.loads((tmp_path / "adapt" / "train_summary.json").read_text())["step"] == 8


def test_hold_out_first_takes_the_first_rows_of_every_task(sni_dir: Path, tmp_path: Path) -> None:
    _, prepared = _setup(sni_dir, tmp_path, "lora")
    split = prepared.dataset["train"]
    rest, held = TaskRows(split).hold_out_first(2)
    tasks = split["task"]
    expected_held = [i for i, t in enumerate(tasks) if tasks[:i].count(t) < 2]  # the definition, quadratically
    assert len(held) == len(expected_held) and len(rest) == len(split) - len(expected_held)
    assert [r["prompt_ids"] for r in held.rows(range(len(held)))] == [split[i]["prompt_ids"] for i in expected_held]
    assert held.task_counts() == dict.fromkeys(dict.fromkeys(tasks), 2)


@pytest.mark.parametrize("method", ["poly", "orchmoe"])
def test_task_ids_come_from_the_model_and_unknown_tasks_get_minus_one(method: str, sni_dir: Path,
                                                                     tmp_path: Path) -> None:
    """Test-task rows, whose manifest index is past the training tasks, route as unseen (-1);
    OrchMoE's batches carry no task id at all."""
    recipe, prepared = _setup(sni_dir, tmp_path, method)
    model = attach_adapters(load_model(recipe.model).model, recipe.method, ["task003_gamma_qa", "task001_alpha_qa"])
    train_rows = TaskRows(prepared.dataset["train"])
    collate = GenerationCollator(0, False, model.task_index)
    batch = collate(train_rows.rows(range(len(train_rows))))
    test_batch = collate(TaskRows(prepared.dataset["test"]).rows([0, 1]))
    if method == "orchmoe":
        assert model.task_index is None and "task_ids" not in batch and "task_ids" not in test_batch
        return
    names = [r["task"] for r in train_rows.rows(range(len(train_rows)))]
    expected = [{"task003_gamma_qa": 0, "task001_alpha_qa": 1}.get(n, -1) for n in names]
    assert batch["task_ids"].tolist() == expected and test_batch["task_ids"].tolist() == [-1, -1]
