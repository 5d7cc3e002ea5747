"""Task-aware batch sampling whose every batch is a pure function of (seed, batch index).

Because nothing but the batch index carries state, resuming is exact (the checkpoint stores one
integer) and every process of a distributed run computes the same global batch and keeps its
own slice of it, with no sampler to synchronise.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

Mode = Literal["mixed", "temperature", "single_task"]


class TaskBatchSampler:
    """Global batches of row indices drawn from rows grouped by task.

    - ``mixed``: an epoch is a seeded permutation of all rows, cut into consecutive batches.
    - ``temperature``: each row of a batch picks its task with p ~ n_task^(1/T), then a row of
      that task (T=1 is proportional to size, large T approaches uniform over tasks).
    - ``single_task``: each task's rows are shuffled and cut into batches; an epoch visits those
      batches in a seeded order (HyperLoader-style single-task batches).
    """

    def __init__(self, row_tasks: Sequence[int], batch_size: int, mode: Mode, seed: int, temperature: float = 1.0):
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
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

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
                batches += [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
            rng.shuffle(batches)
        else:
            rows = list(range(self.n_rows))
            rng.shuffle(rows)
            batches = [rows[i : i + self.batch_size] for i in range(0, len(rows) - self.batch_size + 1, self.batch_size)]
            if not batches:  # fewer rows than one batch: repeat them
                batches = [(rows * (self.batch_size // len(rows) + 1))[: self.batch_size]]
        self._epoch_cache = (epoch, batches)
        return batches

    def batch(self, index: int) -> list[int]:
        """Row indices of global batch ``index`` (0-based)."""
        if self.mode == "temperature":
            rng = self._rng(-1, index)
            tasks = rng.choices(self.tasks, weights=self.task_weights, k=self.batch_size)
            return [rng.choice(self.by_task[t]) for t in tasks]
        per_epoch = len(self._epoch_batches(0))  # the same count every epoch
        epoch, position = divmod(index, per_epoch)
        return self._epoch_batches(epoch)[position]

    def reference_rng(self, index: int) -> random.Random:
        """The generator that picks each row's training reference in batch ``index`` (Tk-Instruct samples one)."""
        return self._rng(-2, index)
