"""A routing family defined here, outside the package, and registered with one call: the whole command line
works with it (train, eval, adapt, inspect-routing) without a line of the package knowing it.

The toy is a global router: every layer learns one skill mixture (1, h*S) that all inputs share, a
hard top-1 choice in the forward pass with straight-through gradients. It reads no task id and no prompt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from cli_runner import run_cli
from tiny_recipe import tiny_recipe
from torch import Tensor, nn

from orchmoe_cli.adapters.family import AdaptMode, Routing, RoutingFamily
from orchmoe_cli.adapters.registry import SPECS, MethodSpec, register
from orchmoe_cli.adapters.skill_weights import normalise, relaxed_sigmoid

TOY = "toy_global_top1"


class GlobalTop1Router(nn.Module):
    """One learned mixture per layer for every input; the forward pass keeps only each head's best skill."""

    def __init__(self, n_heads: int, n_skills: int) -> None:
        super().__init__()
        self.n_heads, self.n_skills = n_heads, n_skills
        self.logits = nn.Parameter(torch.empty(1, n_heads * n_skills).uniform_(-0.1, 0.1))

    def forward(self, state: object) -> Tensor:
        soft = normalise(relaxed_sigmoid(self.logits.view(1, self.n_heads, self.n_skills), 1.0, False, False))
        hard = torch.nn.functional.one_hot(soft.argmax(-1), self.n_skills).to(soft.dtype)
        return hard + soft - soft.detach()


class GlobalTop1Routing(RoutingFamily):
    allocation_tensor: ClassVar[str | None] = "logits"
    allocation_rows: ClassVar[str] = "global mixture"
    adapt_modes: ClassVar[dict[str, AdaptMode]] = {"toy_skills": AdaptMode((TOY,), ("adapters",))}

    def make_router(self, method: object, n_tasks: int) -> nn.Module:
        return GlobalTop1Router(method.n_heads or 1, method.n_skills)  # type: ignore[attr-defined]

    def route(self, model: object, inputs: object) -> Routing:
        return Routing(None)  # nothing per batch: the layers' routers hold everything


@pytest.fixture()
def toy_registered():
    register(TOY, MethodSpec(GlobalTop1Routing, heads=2, several_heads=None))
    try:
        yield
    finally:
        del SPECS[TOY]


def test_a_family_defined_outside_the_package_runs_every_command(toy_registered, sni_dir: Path,
                                                                 tmp_path: Path) -> None:
    from conftest import _SNI_TEST_TASKS

    run = tmp_path / "run"
    recipe = tiny_recipe(
        tmp_path / "toy.yaml", sni_dir, run, f"{{name: {TOY}, rank: 4, n_skills: 3}}",
        train="{steps: 3, batch_size: 4, lr: 0.03, router_lr: 0.1}",
        eval="{max_instances: 2, batch_size: 2, max_new_tokens: 4, checkpoint: latest}",
        adapt="{steps: 2, batch_size: 2, val_instances: 0, modes: [zero_shot, toy_skills], shots: [2], seeds: [1]}")
    assert run_cli(["train", str(recipe)]) == 0
    checkpoint = run / "checkpoints" / "step-000003"
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert config["method"]["name"] == TOY and config["method"]["n_heads"] == 2  # the registry row's default
    assert config["parameters"]["routers"] == 2 * 3 * 14  # one (1, h*S) mixture in each of the 14 linears

    assert run_cli(["eval", str(recipe)]) == 0
    results = next(run.glob("eval-step-000003-*/results.json"))
    assert json.loads(results.read_text())["n_instances"] == 4

    assert run_cli(["adapt", str(recipe), "--tasks", _SNI_TEST_TASKS[0]]) == 0
    lines = [json.loads(line) for line in (run / "adapt" / "adapt_results.jsonl").read_text().splitlines()]
    assert sorted(line["mode"] for line in lines) == ["toy_skills", "zero_shot"]
    assert all(line["method"] == TOY for line in lines)

    out = tmp_path / "routing"
    assert run_cli(["inspect-routing", str(run), "--out", str(out), "--format", "json"]) == 0
    report = json.loads((out / "routing.json").read_text())
    assert report["method"] == TOY and report["row_kind"] == "global mixture"
    assert [row["name"] for row in report["rows"]] == ["global-0"]
    assert len(report["layers"]) == 14


def test_an_unknown_family_is_an_error_not_a_default() -> None:
    from orchmoe_cli.adapters.method_config import MethodConfig
    from orchmoe_cli.errors import FieldError

    with pytest.raises(FieldError, match="'toy_unknown' is not one of"):
        MethodConfig(name="toy_unknown")
    with pytest.raises(ValueError, match="already registered"):
        register("lora", MethodSpec(GlobalTop1Routing))
