"""OrchMoE must really route: the mutual-information objective on hand-built p(t|x), and a tiny model that
separates two clearly different synthetic tasks with the defaults (and collapses with the old ones)."""

from __future__ import annotations

import io
import math
import random
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
from rich.console import Console

from orchmoe_cli.adapters import attach_adapters
from orchmoe_cli.adapters.orchmoe import load_balance_loss, mutual_information
from orchmoe_cli.adapters.registry import spec_of
from orchmoe_cli.core.base_models import load_model
from orchmoe_cli.core.fit import fit, make_accelerator
from orchmoe_cli.core.training_log import read_metrics
from orchmoe_cli.data.rows import TaskRows
from orchmoe_cli.recipe import load_recipe

T = 4


def test_mutual_information_on_hand_built_distributions() -> None:
    uniform = torch.full((8, T), 1 / T)
    balanced = torch.eye(T).repeat(2, 1)  # sharp, every abstract task used equally
    collapsed = torch.eye(T)[[0] * 8]  # sharp, all on one
    assert mutual_information(uniform).item() == pytest.approx(0.0, abs=1e-6)
    assert mutual_information(balanced).item() == pytest.approx(1.0, abs=1e-6)
    assert mutual_information(collapsed).item() == pytest.approx(0.0, abs=1e-6)
    half = torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])  # two of four used, each input split over two
    assert mutual_information(half).item() == pytest.approx((math.log(4) - math.log(2)) / math.log(4), abs=1e-6)
    # the old balance term cannot tell the uniform collapse from a good routing: both score its minimum
    assert load_balance_loss(uniform).item() == pytest.approx(load_balance_loss(balanced).item())


def _two_tasks(n: int, seed: int) -> datasets.Dataset:
    """Task a: prompts of token ids 10-59 answered 5; task b: ids 200-249 answered 6."""
    rng = random.Random(seed)
    rows: dict[str, list] = {"task": [], "category": [], "prompt_ids": [], "reference_ids": []}
    for i in range(n):
        low, answer, name = (10, 5, "a") if i % 2 == 0 else (200, 6, "b")
        rows["task"].append(name)
        rows["category"].append(name.upper())
        rows["prompt_ids"].append([rng.randrange(low, low + 50) for _ in range(rng.randint(8, 16))])
        rows["reference_ids"].append([[answer, 1]])
    return datasets.Dataset.from_dict(rows)


def _train_and_classify(tmp_path: Path, overrides: list[str]) -> tuple[float, Counter, Counter, list[dict]]:
    defaults = ["model.name=tiny-llama", "method.name=orchmoe", "method.rank=4", "method.n_skills=4",
                f"method.n_abstract_tasks={T}", "train.steps=40", "train.batch_size=8", "train.lr=0.01",
                "train.router_lr=0.1", "train.schedule=constant", "train.log_every=10"]
    given = {item.partition("=")[0] for item in overrides}  # a field is set once
    recipe = load_recipe(None, [d for d in defaults if d.partition("=")[0] not in given] + overrides)
    accelerator = make_accelerator(recipe.train, spec_of(recipe.method.name))
    model = attach_adapters(load_model(recipe.model).model, recipe.method, [])
    fit(model, TaskRows(_two_tasks(64, seed=0)), recipe.train, tmp_path, accelerator, pad_id=0, causal=True,
        recipe_yaml="{}\n", console=Console(file=io.StringIO()))
    model.eval()
    held_out = _two_tasks(40, seed=1)
    probs = torch.cat([model.task_distribution(torch.tensor([ids])) for ids in held_out["prompt_ids"]])
    entropy = float((-(probs * probs.clamp_min(1e-12).log()).sum(-1) / math.log(T)).mean())
    preferred = probs.argmax(-1).tolist()
    return entropy, Counter(preferred[0::2]), Counter(preferred[1::2]), read_metrics(tmp_path / "metrics.jsonl")


def test_defaults_separate_two_different_tasks(tmp_path: Path) -> None:
    entropy, task_a, task_b, metrics = _train_and_classify(tmp_path, [])
    assert entropy < 0.6, entropy
    assert task_a.most_common(1)[0][0] != task_b.most_common(1)[0][0], (task_a, task_b)
    assert sum(task_a[t] for t in task_b) <= 0.1 * sum(task_a.values()), (task_a, task_b)  # little overlap
    logged = [row for row in metrics if "router_entropy" in row]
    assert logged and {"marginal_entropy", "allocation_spread", "mutual_information"} <= set(logged[-1])
    assert logged[-1]["router_entropy"] < logged[0]["router_entropy"]


def test_the_old_defaults_stay_uniform(tmp_path: Path) -> None:
    """The collapse the first checkpoints showed: router_lr 0.01 and the soft balance term alone leave p(t|x)
    uniform."""
    entropy, _, _, _ = _train_and_classify(tmp_path, ["train.router_lr=0.01", "method.mutual_information_weight=0",
                                                      "method.load_balance_weight=0.01"])
    assert entropy > 0.9, entropy
