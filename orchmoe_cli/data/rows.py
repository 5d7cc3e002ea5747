"""Training rows read from a prepared split's memory-mapped Arrow table, a batch at a time.

Only the row positions and a small integer code per row (its task) live in Python; prompt and
reference ids stay in the Arrow file until a batch asks for them, so memory does not grow with the
corpus (75,600 rows of the full SNI training split hold a few hundred KB here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# the columns a training batch needs
COLUMNS = ("task", "category", "prompt_ids", "reference_ids")


def _encode_column(dataset: Any, column: str) -> tuple[list[str], np.ndarray]:
    """(distinct values, per-row index into them) of a string column, read straight from Arrow."""
    values = dataset.with_format("arrow")[column]
    if hasattr(values, "combine_chunks"):
        values = values.combine_chunks()
    encoded = values.dictionary_encode()
    return encoded.dictionary.to_pylist(), encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32)


class TaskRows:
    """A view of some rows of a prepared split (all of them by default), in split order."""

    def __init__(self, dataset: Any, positions: Sequence[int] | np.ndarray | None = None) -> None:
        self._dataset = dataset
        self.task_vocabulary, codes = _encode_column(dataset, "task")
        self._positions = np.arange(len(dataset)) if positions is None else np.asarray(positions, dtype=np.int64)
        self.task_codes = codes[self._positions]  # per row: index into task_vocabulary

    def _view(self, positions: np.ndarray) -> TaskRows:
        view = object.__new__(TaskRows)
        view._dataset, view.task_vocabulary = self._dataset, self.task_vocabulary
        view._positions = self._positions[positions]
        view.task_codes = self.task_codes[positions]
        return view

    def __len__(self) -> int:
        return len(self._positions)

    @property
    def task_names(self) -> list[str]:
        """The tasks present, in order of their first row."""
        _, first = np.unique(self.task_codes, return_index=True)
        return [self.task_vocabulary[self.task_codes[i]] for i in sorted(first)]

    def task_counts(self) -> dict[str, int]:
        codes, counts = np.unique(self.task_codes, return_counts=True)
        return {self.task_vocabulary[c]: int(n) for c, n in zip(codes, counts)}

    def categories(self) -> list[str]:
        """Distinct categories of these rows, sorted."""
        vocabulary, codes = _encode_column(self._dataset, "category")
        return sorted(vocabulary[i] for i in np.unique(codes[self._positions]))

    def lengths(self) -> np.ndarray:
        """Per row, prompt tokens + first reference's tokens (what a training batch pads to), read from Arrow."""
        import pyarrow.compute as pc

        table = self._dataset.with_format("arrow")
        prompt = pc.list_value_length(table["prompt_ids"]).to_numpy(zero_copy_only=False)
        first = pc.list_value_length(pc.list_element(table["reference_ids"], 0)).to_numpy(zero_copy_only=False)
        return (prompt + first)[self._positions]

    def rows(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """The rows at ``indices`` (positions in this view) as dicts of :data:`COLUMNS`."""
        wanted = [int(self._positions[i]) for i in indices]
        batch = self._dataset.select_columns(list(COLUMNS))[wanted]
        return [dict(zip(COLUMNS, values)) for values in zip(*(batch[c] for c in COLUMNS))]

    def select(self, indices: Sequence[int]) -> TaskRows:
        """The rows at ``indices`` (positions in this view), in that order."""
        return self._view(np.asarray(indices, dtype=np.int64))

    def positions(self) -> list[int]:
        """Row numbers of this view in the underlying split (to read other columns of the same rows)."""
        return self._positions.tolist()

    def of_tasks(self, names: Sequence[str]) -> TaskRows:
        """Only the rows of these tasks (e.g. one new task to adapt to)."""
        wanted = [self.task_vocabulary.index(n) for n in names if n in self.task_vocabulary]
        return self._view(np.flatnonzero(np.isin(self.task_codes, wanted)))

    def hold_out_first(self, per_task: int) -> tuple[TaskRows, TaskRows]:
        """(the rest, the first ``per_task`` rows of each task): a validation slice in one pass."""
        seen = np.zeros(len(self.task_vocabulary), dtype=np.int64)
        held = np.zeros(len(self), dtype=bool)
        for i, code in enumerate(self.task_codes):
            if seen[code] < per_task:
                held[i] = True
                seen[code] += 1
        return self._view(np.flatnonzero(~held)), self._view(np.flatnonzero(held))
