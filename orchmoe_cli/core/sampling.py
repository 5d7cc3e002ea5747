"""Task-aware batch sampling whose every batch is a pure function of (seed, batch index).

Because nothing but the batch index carries state, resuming is exact (the checkpoint stores one
integer) and every process of a distributed run computes the same global batch and keeps its
own slice of it, with no sampler to synchronise.

With row lengths given, batches are length-grouped: each group of :data:`GROUP` batches' worth of randomly
drawn rows is sorted by length before it is cut, and the batches' order is shuffled, so a batch still mixes
tasks but pads little (on the quickstart data: 0.49 useful tokens per computed token at batch 8 without
grouping, about 0.98 with it).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

Mode = Literal["mixed", "temperature", "single_task"]
GROUP = 50  # batches whose rows are sorted by length together


class TaskBatchSampler:
    """Global batches of row indices drawn from rows grouped by task.

    - ``mixed``: an epoch is a seeded permutation of all rows, cut into consecutive batches.
    - ``temperature``: each row of a batch picks its task with p ~ n_task^(1/T), then a row of
      that task (T=1 is proportional to size, large T approaches uniform over tasks).
    - ``single_task``: each task's rows are shuffled and cut into batches, a short last one filled up with the
      task's first rows; an epoch visits those batches in a seeded order (HyperLoader-style single-task
      batches).

    Every batch holds ``batch_size`` rows, so each process of a distributed run gets the same number.
    """

    def __init__(self, row_tasks: Sequence[int], batch_size: int, mode: Mode, seed: int, temperature: float = 1.0,
                 lengths: Sequence[int] | None = None):
        """``lengths``: each row's token count; given, mixed and temperature batches are length-grouped."""
        if not row_tasks:
            raise ValueError("no training rows to sample from")
        self.batch_size = batch_size
        self.mode = mode
        self.seed = seed
        self.by_task: dict[int, list[int]] = {}
        for row, task in enumerate(row_tasks):
            self.by_task.setdefault(task, []).append(row)
        self.tasks = sorted(self.by_task)
        self.n_rows = len(row_tasks)
        sizes = [len(self.by_task[t]) for t in self.tasks]
        self.task_weights = [n ** (1.0 / temperature) for n in sizes]
        self.lengths = None if lengths is None else list(lengths)
        if self.lengths is not None and len(self.lengths) != self.n_rows:
            raise ValueError(f"{len(self.lengths)} lengths for {self.n_rows} rows")
        self._epoch_cache: tuple[int, list[list[int]]] | None = None
        self._group_cache: tuple[int, list[list[int]]] | None = None

    def _rng(self, *keys: int) -> random.Random:
        return random.Random(f"{self.seed}:" + ":".join(map(str, keys)))

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = self._rng(epoch)
        if self.mode == "single_task":
            batches = []
            for task in self.tasks:
                rows = list(self.by_task[task])
                rng.shuffle(rows)
                batches += [_full(rows[i : i + self.batch_size], rows, self.batch_size)
                            for i in range(0, len(rows), self.batch_size)]
            rng.shuffle(batches)
        else:
            rows = list(range(self.n_rows))
            rng.shuffle(rows)
            if len(rows) < self.batch_size:  # fewer rows than one batch: repeat them
                rows = (rows * (self.batch_size // len(rows) + 1))[: self.batch_size]
            rows = rows[: len(rows) - len(rows) % self.batch_size]
            size = GROUP * self.batch_size
            batches = [b for start in range(0, len(rows), size) for b in self._cut(rows[start : start + size])]
            if self.lengths is not None:
                rng.shuffle(batches)
        self._epoch_cache = (epoch, batches)
        return batches

    def _cut(self, rows: list[int]) -> list[list[int]]:
        """``rows`` cut into batches, longest first when grouping by length (ties keep their random order)."""
        if self.lengths is not None:
            rows = sorted(rows, key=lambda row: -self.lengths[row])  # type: ignore[index]
        return [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

    def _temperature_batch(self, index: int) -> list[int]:
        if self.lengths is None:
            rng = self._rng(-1, index)
            tasks = rng.choices(self.tasks, weights=self.task_weights, k=self.batch_size)
            return [rng.choice(self.by_task[t]) for t in tasks]
        group, position = divmod(index, GROUP)
        if self._group_cache is None or self._group_cache[0] != group:
            rng = self._rng(-3, group)
            tasks = rng.choices(self.tasks, weights=self.task_weights, k=GROUP * self.batch_size)
            batches = self._cut([rng.choice(self.by_task[t]) for t in tasks])
            rng.shuffle(batches)
            self._group_cache = (group, batches)
        return self._group_cache[1][position]

    def batch(self, index: int) -> list[int]:
        """Row indices of global batch ``index`` (0-based)."""
        if self.mode == "temperature":
            return self._temperature_batch(index)
        per_epoch = len(self._epoch_batches(0))  # the same count every epoch
        epoch, position = divmod(index, per_epoch)
        return self._epoch_batches(epoch)[position]

    def reference_rng(self, index: int) -> random.Random:
        """The generator that picks each row's training reference in batch ``index`` (Tk-Instruct samples one)."""
        return self._rng(-2, index)


def _full(batch: list[int], rows: list[int], size: int) -> list[int]:
    """``batch`` filled up to ``size`` by cycling through ``rows`` (a task's short last batch)."""
    return batch + [rows[i % len(rows)] for i in range(size - len(batch))]
