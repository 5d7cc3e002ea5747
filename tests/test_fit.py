"""The reusable training core: `fit` on a few rows of one task, rows read from Arrow, explicit task ids."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from adapter_fixtures import METHODS
from tolerance import assert_close_scaled

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


def test_accumulated_micro_batches_weigh_tokens_as_one_batch() -> None:
    """grad_accum=2 x batch 4 gives the gradients of one batch of 8: every target token weighs the same, however
    the step's tokens fall into micro-batches (here one holds 4x the answer tokens of the other)."""
    import torch
    from accelerate import Accelerator

    from orchmoe_cli.adapters import MethodConfig
    from orchmoe_cli.core.steps import lm_loss, micro_step, target_tokens

    base = load_model(load_recipe(None, ["model.name=tiny-llama", "model.tiny={hidden_size: 32, num_layers: 2, "
                                         "num_heads: 4, intermediate_size: 64}"]).model).model
    model = attach_adapters(base, MethodConfig(name="lora", rank=4), [])
    for layer in model.layers:
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    torch.manual_seed(0)
    input_ids = torch.randint(3, 250, (8, 16))
    labels = torch.full_like(input_ids, -100)
    for row in range(8):  # answers of 2 tokens in the first four rows, 8 in the others
        labels[row, 16 - (2 if row < 4 else 8):] = input_ids[row, 16 - (2 if row < 4 else 8):]
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    params = [p for p in model.parameters() if p.requires_grad]

    total, _ = lm_loss(model, batch, causal=True, label_smoothing=0.0)
    expected = torch.autograd.grad(total, params)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    step_tokens = target_tokens(labels, causal=True)
    for half in (slice(0, 4), slice(4, 8)):
        with accelerator.accumulate(model):
            micro_step(accelerator, model, {k: v[half] for k, v in batch.items()}, step_tokens, True, 0.0)
    for param, grad in zip(params, expected):
        assert_close_scaled(param.grad, grad)


@pytest.mark.parametrize("arch", ["t5", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_gives_the_same_gradients(method: str, arch: str) -> None:
    """Recomputed blocks route exactly as the first forward did, for every routing family."""
    import torch
    from adapter_fixtures import BUILDERS, TASKS, make_batch, perturb

    from orchmoe_cli.adapters import MethodConfig
    from orchmoe_cli.core.fit import enable_checkpointing

    extra = {"n_heads": 2} if method.startswith("mhr") else {}
    model = attach_adapters(BUILDERS[arch](), MethodConfig(name=method, rank=4, n_skills=2, **extra), TASKS)
    perturb(model, scale=0.2)
    model.train()
    batch = make_batch(model.base)
    routing = {"task_ids": torch.tensor([0, 2, 1])} if model.task_index is not None else {}
    params = [p for p in model.parameters() if p.requires_grad]

    def gradients() -> list[torch.Tensor]:
        torch.manual_seed(11)
        return list(torch.autograd.grad(model(**batch, **routing).loss, params, allow_unused=True))

    plain = gradients()
    enable_checkpointing(model)
    assert model.base.is_activation_checkpointing
    for with_checkpoints, without in zip(gradients(), plain):
        if without is None:
            assert with_checkpoints is None
        else:
            assert_close_scaled(with_checkpoints, without)
