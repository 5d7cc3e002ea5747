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
    assert all(len(batch) == 4 for batch in forward)  # every process of a distributed run gets its share
    assert TaskBatchSampler(ROW_TASKS, 4, mode, seed=8, temperature=10.0).batch(0) != a.batch(0) or mode == "single_task"


def test_mixed_epoch_covers_every_row_once() -> None:
    sampler = TaskBatchSampler(ROW_TASKS, 4, "mixed", seed=1)
    rows = [r for i in range(len(ROW_TASKS) // 4) for r in sampler.batch(i)]
    assert sorted(rows) == list(range(len(ROW_TASKS)))


def test_single_task_batches_never_mix_tasks() -> None:
    sampler = TaskBatchSampler(ROW_TASKS, 4, "single_task", seed=1)
    for i in range(20):
        assert len({ROW_TASKS[r] for r in sampler.batch(i)}) == 1


def test_a_single_task_epoch_covers_every_row_in_full_batches() -> None:
    """A task's short last batch is filled from its own rows (10 rows -> 3 batches of 4; 2 rows -> 1 of 4)."""
    sampler = TaskBatchSampler(ROW_TASKS, 4, "single_task", seed=1)
    epoch = [sampler.batch(i) for i in range(10 + 3 + 1)]
    assert {r for batch in epoch for r in batch} == set(range(len(ROW_TASKS)))
    assert all(len(batch) == 4 for batch in epoch)


def test_temperature_flattens_task_distribution() -> None:
    def share_of_small_task(temperature: float) -> float:
        sampler = TaskBatchSampler(ROW_TASKS, 8, "temperature", seed=3, temperature=temperature)
        counts = Counter(ROW_TASKS[r] for i in range(300) for r in sampler.batch(i))
        return counts[2] / sum(counts.values())

    proportional, flat = share_of_small_task(1.0), share_of_small_task(100.0)
    assert proportional == pytest.approx(2 / 52, abs=0.02)
    assert flat == pytest.approx(1 / 3, abs=0.05)


LENGTHS = [20 + (37 * r) % 280 for r in range(len(ROW_TASKS) * 10)]  # 20..299 tokens, unrelated to the task
MANY_TASKS = [r % 7 for r in range(len(LENGTHS))]


def _useful_share(sampler: TaskBatchSampler, batches: int) -> float:
    useful = computed = 0
    for i in range(batches):
        lengths = [LENGTHS[r] for r in sampler.batch(i)]
        useful, computed = useful + sum(lengths), computed + max(lengths) * len(lengths)
    return useful / computed


@pytest.mark.parametrize("mode", ["mixed", "temperature"])
def test_length_grouping_removes_padding_but_keeps_batches_mixed_and_addressed_by_index(mode: str) -> None:
    grouped = TaskBatchSampler(MANY_TASKS, 8, mode, seed=5, lengths=LENGTHS)
    plain = TaskBatchSampler(MANY_TASKS, 8, mode, seed=5)
    assert _useful_share(grouped, 100) >= 0.9 > _useful_share(plain, 100)
    again = TaskBatchSampler(MANY_TASKS, 8, mode, seed=5, lengths=LENGTHS)
    assert [grouped.batch(i) for i in range(120)] == [again.batch(i) for i in reversed(range(120))][::-1]
    mixed = sum(len({MANY_TASKS[r] for r in grouped.batch(i)}) > 1 for i in range(100))
    assert mixed >= 90  # still multi-task batches


def test_length_grouped_epoch_still_covers_every_row_once() -> None:
    sampler = TaskBatchSampler(MANY_TASKS, 8, "mixed", seed=2, lengths=LENGTHS)
    rows = [r for i in range(len(MANY_TASKS) // 8) for r in sampler.batch(i)]
    assert sorted(rows) == list(range(len(MANY_TASKS)))
