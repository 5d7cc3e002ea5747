"""Task-aware sampling: pure functions of (seed, batch index), so resume and sharding are exact."""

from collections import Counter

import pytest

from orchmoe_cli.core.sampling import TaskBatchSampler

ROW_TASKS = [0] * 40 + [1] * 10 + [2] * 2


@pytest.mark.parametrize("mode", ["mixed", "temperature", "single_task"])
def test_batches_are_reproducible_and_index_addressed(mode: str) -> None:
    a = TaskBatchSampler(ROW_TASKS, 4, mode, seed=7, temperature=10.0)
    b = TaskBatchSampler(ROW_TASKS, 4, mode, seed=7, temperature=10.0)
    forward = [a.batch(i) for i in range(30)]
    backward = [b.batch(i) for i in reversed(range(30))][::-1]
    assert forward == backward
    assert all(len(batch) <= 4 for batch in forward)
    assert TaskBatchSampler(ROW_TASKS, 4, mode, seed=8, temperature=10.0).batch(0) != a.batch(0) or mode == "single_task"


def test_mixed_epoch_covers_every_row_once() -> None:
    sampler = TaskBatchSampler(ROW_TASKS, 4, "mixed", seed=1)
    rows = [r for i in range(len(ROW_TASKS) // 4) for r in sampler.batch(i)]
    assert sorted(rows) == list(range(len(ROW_TASKS)))


def test_single_task_batches_never_mix_tasks() -> None:
    sampler = TaskBatchSampler(ROW_TASKS, 4, "single_task", seed=1)
    for i in range(20):
        assert len({ROW_TASKS[r] for r in sampler.batch(i)}) == 1


def test_temperature_flattens_task_distribution() -> None:
    def share_of_small_task(temperature: float) -> float:
        sampler = TaskBatchSampler(ROW_TASKS, 8, "temperature", seed=3, temperature=temperature)
        counts = Counter(ROW_TASKS[r] for i in range(300) for r in sampler.batch(i))
        return counts[2] / sum(counts.values())

    proportional, flat = share_of_small_task(1.0), share_of_small_task(100.0)
    assert proportional == pytest.approx(2 / 52, abs=0.02)
    assert flat == pytest.approx(1 / 3, abs=0.05)
