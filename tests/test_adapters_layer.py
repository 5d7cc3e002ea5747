"""The skill-LoRA layer, routers, OrchMoE's classifier and the HyperLoader wrappers, in isolation."""

from __future__ import annotations

import math

import pytest
import torch
from tolerance import assert_close_scaled
from torch import nn

from orchmoe_cli.adapters.context import RoutingSlot, RoutingState
from orchmoe_cli.adapters.layer import SkillLoRALinear, add_low_rank
from orchmoe_cli.adapters.orchmoe import AllocationRouter, TaskClassifier, load_balance_loss, supervision_loss
from orchmoe_cli.adapters.skill_weights import AverageRouter, relaxed_sigmoid
from orchmoe_cli.adapters.task_routing import TaskRouter
from orchmoe_cli.errors import OrchmoeError


def _layer(heads: int, skills: int = 3, rank: int = 2, alpha: float = 2.0, n_tasks: int = 4) -> SkillLoRALinear:
    torch.manual_seed(0)
    slot = RoutingSlot()
    layer = SkillLoRALinear(nn.Linear(8, 12), TaskRouter(n_tasks, heads, skills), slot, rank, alpha, skills, heads)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.router.logits.normal_()
    return layer.eval()


def _reference(layer: SkillLoRALinear, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Row by row, head by head: A_b = sum_k w_k A_k, B_b = sum_k w_k B_k, y = W0 x + b + scale x A_b B_b."""
    heads = layer.lora_A.shape[0]
    rows = []
    for i in range(x.shape[0]):
        w = weights[i * weights.shape[0] // x.shape[0]]
        a = torch.cat([sum(w[q, k] * layer.lora_A[q, k] for k in range(w.shape[1])) for q in range(heads)], dim=0)
        b = torch.cat([sum(w[q, k] * layer.lora_B[q, k] for k in range(w.shape[1])) for q in range(heads)], dim=1)
        rows.append(layer.base_layer(x[i]) + layer.scale * (x[i] @ a) @ b)
    return torch.stack(rows)


@pytest.mark.parametrize("heads", [1, 4])
def test_layer_mixes_parameters_per_row_and_head(heads: int) -> None:
    layer = _layer(heads)
    x = torch.randn(6, 5, 8)
    state = RoutingState(3, task_ids=torch.tensor([0, 3, -1]))
    layer.slot.state = state
    with torch.no_grad():
        weights = layer.router(state)
        out = layer(x)  # 6 rows for 3 sequences: beam-style interleaved copies
        expected = _reference(layer, x, weights)
    assert weights.shape == (3, heads, 3)
    assert_close_scaled(out, expected)
    assert_close_scaled(weights[2], torch.full((heads, 3), 1 / 3))  # unseen task: average of skills


def test_shared_routing_uses_one_mixture_and_matches_per_row_path() -> None:
    layer = _layer(2)
    x = torch.randn(4, 5, 8)
    layer.slot.state = RoutingState(4, task_ids=torch.tensor([1, 1, 1, 1]))
    with torch.no_grad():
        shared = layer.router(layer.slot.state)
        fast = layer(x)
        slow = add_low_rank(layer.base_layer(x), x, *layer.mix(shared.expand(4, -1, -1)), layer.scale)
    assert shared.shape[0] == 1
    assert_close_scaled(fast, slow)


def test_fresh_layer_is_the_base_layer_and_merge_is_exact() -> None:
    torch.manual_seed(0)
    fresh = SkillLoRALinear(nn.Linear(8, 12), AverageRouter(1, 2), RoutingSlot(), 4, 1.0, 2, 1)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(fresh(x), fresh.base_layer(x), atol=0, rtol=0)
    bound = 1 / math.sqrt(8)
    assert fresh.lora_A.abs().max() <= bound and fresh.lora_A.abs().max() > 0.5 * bound
    layer = _layer(2)
    original = layer.base_layer.weight.clone()
    layer.slot.state = RoutingState(1, task_ids=torch.tensor([2]))
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge(layer.router(layer.slot.state)[0])
        merged = layer(x)
    assert_close_scaled(merged, unmerged)
    with pytest.raises(OrchmoeError, match="already merged"):
        layer.merge(torch.ones(2, 3) / 3)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)
    assert layer.weight is layer.base_layer.weight


def test_task_router_relaxation_temperature_and_straight_through() -> None:
    torch.manual_seed(0)
    router = TaskRouter(3, 2, 4, temperature=0.5)
    state = RoutingState(2, task_ids=torch.tensor([0, 2]))
    eval_weights = router.eval()(state)
    expected = torch.sigmoid(router.logits[[0, 2]].view(2, 2, 4))
    assert_close_scaled(eval_weights, expected / expected.sum(-1, keepdim=True))
    router.train()
    draws = torch.stack([router(state) for _ in range(5)])
    assert draws.std(0).mean() > 1e-3  # Gumbel noise in training
    assert_close_scaled(draws.sum(-1), torch.ones(5, 2, 2))
    draws.sum().backward()
    assert router.logits.grad is not None
    hard = relaxed_sigmoid(torch.tensor([-2.0, 3.0], requires_grad=True), 1.0, False, True)
    assert hard.tolist() == [0.0, 1.0]
    hard.sum().backward()
    with pytest.raises(OrchmoeError, match="task_ids"):
        router(None)


def test_average_and_allocation_routers() -> None:
    assert torch.equal(AverageRouter(2, 4)(None), torch.full((1, 2, 4), 0.25))
    torch.manual_seed(0)
    router = AllocationRouter(3, 2, 4).eval()
    with torch.no_grad():
        router.allocation.normal_()
    probs = torch.softmax(torch.randn(5, 3), -1)
    weights = router(RoutingState(5, task_probs=probs))
    mix = torch.einsum("bt,ths->bhs", probs, torch.sigmoid(router.allocation))
    assert_close_scaled(weights, mix / mix.sum(-1, keepdim=True))
    router.train()
    assert router(RoutingState(5, task_probs=probs)).shape == (5, 2, 4)
    with pytest.raises(OrchmoeError, match="input_ids"):
        router(RoutingState(5, task_ids=torch.zeros(5, dtype=torch.long)))


def test_task_classifier_ignores_padding_and_losses() -> None:
    torch.manual_seed(0)
    classifier = TaskClassifier(16, 4)
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    changed = x.clone()
    changed[0, 4:] = torch.randn(2, 16)
    assert_close_scaled(classifier(changed, mask)[0], classifier(x, mask)[0])
    empty = classifier(x, torch.zeros_like(mask))
    assert torch.isfinite(empty).all()
    assert load_balance_loss(torch.full((3, 4), 0.25)).item() == pytest.approx(1.0)
    assert load_balance_loss(torch.eye(4)[[1, 1, 1]]).item() == pytest.approx(4.0)
    logits = torch.randn(3, 4)
    assert supervision_loss(logits, torch.tensor([-1, -1, -1])) is None
    loss = supervision_loss(logits, torch.tensor([2, -1, 0]))
    assert_close_scaled(loss, torch.nn.functional.cross_entropy(logits[[0, 2]], torch.tensor([2, 0])))
    with pytest.raises(OrchmoeError, match="n_abstract_tasks"):
        supervision_loss(logits, torch.tensor([4, 0, 0]))


def test_routing_state_refuses_rows_that_do_not_fold() -> None:
    layer = _layer(1)
    layer.slot.state = RoutingState(2, task_ids=torch.tensor([0, 1]))
    with pytest.raises(OrchmoeError, match="3 rows"):
        layer(torch.randn(3, 2, 8))
