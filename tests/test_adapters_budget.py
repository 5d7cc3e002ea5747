"""Parameter budgets and the meta-device accounting behind them."""

from __future__ import annotations

import pytest
from adapter_fixtures import BUILDERS, METHODS, TASKS

from orchmoe_cli.adapters import MethodConfig, attach_adapters
from orchmoe_cli.adapters.budget import adapter_layout, count_by_group, hidden_size, resolve
from orchmoe_cli.adapters.method_config import parse_budget
from orchmoe_cli.errors import OrchmoeError


@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize("method", METHODS)
def test_meta_accounting_matches_the_built_model(arch: str, method: str) -> None:
    base = BUILDERS[arch]()
    config = MethodConfig(name=method)  # type: ignore[arg-type]
    layout = adapter_layout(base, resolve(config, hidden_size(base)), len(TASKS))
    model = attach_adapters(base, config, TASKS)
    state = model.adapter_state_dict()
    assert {k: tuple(shape) for k, (shape, _) in layout.items()} == {k: tuple(t.shape) for k, t in state.items()}
    counts = model.count_parameters()
    assert count_by_group(layout) == {g: counts[g] for g in ("adapters", "routers", "hypernetwork", "other")}


@pytest.mark.parametrize("method", METHODS)
def test_budget_picks_a_rank_within_five_percent(method: str) -> None:
    at_rank_5 = attach_adapters(BUILDERS["t5"](), MethodConfig(name=method, rank=5), TASKS)  # type: ignore[arg-type]
    budget = round(at_rank_5.count_parameters()["total_trainable"] * 1.03)
    model = attach_adapters(BUILDERS["t5"](), MethodConfig(name=method, budget=str(budget)), TASKS)  # type: ignore[arg-type]
    trained = model.count_parameters()["total_trainable"]
    assert abs(trained - budget) <= 0.05 * budget
    assert model.method.rank == 5 and model.method.budget == str(budget)


def test_budget_errors_name_the_field() -> None:
    with pytest.raises(OrchmoeError, match=r"method.budget: 1,000 parameters is too small for poly at rank 1"):
        attach_adapters(BUILDERS["llama"](), MethodConfig(name="poly", budget="1k"), TASKS)
    with pytest.raises(OrchmoeError, match=r"method.budget: no rank lands within 5%"):
        attach_adapters(BUILDERS["llama"](), MethodConfig(name="lora", budget="3000"), TASKS)


def test_budget_strings() -> None:
    assert parse_budget("2.5M") == 2_500_000
    assert parse_budget("800k") == 800_000
    assert parse_budget("120000") == 120_000
    assert parse_budget("1.5e5") == 150_000
    assert parse_budget("1B") == 1_000_000_000
    for bad in ("lots", "0", "1e999", "-5k"):
        with pytest.raises(ValueError):
            parse_budget(bad)


def test_equal_budgets_train_at_equal_lora_scale() -> None:
    """A budget that picks rank 32 for lora and 5 for mhr keeps alpha / rank as written (here 8 / 8 = 1),
    so the methods differ in routing, not in how strongly their updates are scaled."""
    methods = {name: MethodConfig(name=name, rank=8, alpha=8, budget="60k", n_skills=4,
                                  n_heads=2 if name == "mhr" else None) for name in ("lora", "poly", "mhr", "orchmoe")}
    scales, ranks = {}, {}
    for name, method in methods.items():
        model = attach_adapters(BUILDERS["llama"](), method, TASKS)
        scales[name], ranks[name] = model.lora_scale, model.method.rank
        assert model.method.alpha == pytest.approx(model.method.rank)  # alpha moved with the rank
    assert len(set(ranks.values())) > 1 and set(scales.values()) == {1.0}, (ranks, scales)
    default_alpha = attach_adapters(BUILDERS["llama"](), MethodConfig(name="lora", budget="60k"), TASKS)
    assert default_alpha.lora_scale == pytest.approx(1 / 8)  # alpha 1 at the written rank 8: scale 1/8
