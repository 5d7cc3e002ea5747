"""Is a held-out task's adaptation pool like its evaluation set?

Few-shot adaptation trains on a task's pool (its instances after the evaluation ones) and is scored on its
evaluation instances. When the two differ, adapting teaches the pool's answers: in the SNI release "five stars" is
15% of task1342's pool titles against 2% of its evaluation titles (24% in the bundled sample's pool, where a
16-step adaptation scored below the checkpoint's own zero-shot). Two score-free measures over the reference
answers (lower-cased, stripped): how much of each set its most frequent repeated answer takes (0 when no answer
repeats, so a small set of distinct answers does not count as skewed), and the mean answer length in words. The
mismatch is max(|top share pool - top share eval|, |log(mean words pool / mean words eval)|); from ``SHIFTED`` on
(ten points of one answer's share, or about a tenth in length), with at least ``MIN_ANSWERS`` answers on each side
to tell, a sweep warns that the task's few-shot scores measure this shift too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.fsutil import read_json
from orchmoe_cli.recipe import Recipe

log = logging.getLogger(__name__)

SHIFTED = 0.1
MIN_ANSWERS = 10  # fewer answers on a side say too little about its distribution to warn
_REDO = "; remove it and run the sweep again (it measures every task a cell trained on)"


@dataclass(frozen=True)
class AnswerShift:
    top_evaluation: float  # share of the evaluation answers taken by its most frequent repeated one
    top_pool: float
    words_evaluation: float  # mean answer length in words
    words_pool: float
    n_evaluation: int
    n_pool: int

    @property
    def mismatch(self) -> float:
        if min(self.words_pool, self.words_evaluation) == 0:  # empty answers on one side only: unlike (a finite
            length = 0.0 if self.words_pool == self.words_evaluation else 1.0  # value: results are JSON)
        else:
            length = abs(math.log(self.words_pool / self.words_evaluation))
        return max(abs(self.top_pool - self.top_evaluation), length)

    @property
    def shifted(self) -> bool:
        return self.mismatch >= SHIFTED and min(self.n_evaluation, self.n_pool) >= MIN_ANSWERS

    def describe(self) -> str:
        return (f"most frequent answer {self.top_pool:.0%} of the pool vs {self.top_evaluation:.0%} of the evaluation "
                f"set, mean answer {self.words_pool:.1f} vs {self.words_evaluation:.1f} words "
                f"(mismatch {self.mismatch:.2f})")

    def as_dict(self) -> dict[str, float]:
        return {"top_evaluation": self.top_evaluation, "top_pool": self.top_pool,
                "words_evaluation": self.words_evaluation, "words_pool": self.words_pool,
                "n_evaluation": self.n_evaluation, "n_pool": self.n_pool, "mismatch": self.mismatch,
                "shifted": self.shifted}


def _normalised(answers: Iterable[str]) -> list[str]:
    return [answer.strip().lower() for answer in answers]


def answer_shift(evaluation: Sequence[str], pool: Sequence[str]) -> AnswerShift:
    """The two measures for one task, from its evaluation answers and its pool answers (neither empty)."""
    if not evaluation or not pool:
        raise ValueError("both the evaluation answers and the pool answers must be non-empty")
    sets = {"evaluation": _normalised(evaluation), "pool": _normalised(pool)}
    top = {}
    for name, answers in sets.items():
        most = Counter(answers).most_common(1)[0][1]
        top[name] = most / len(answers) if most > 1 else 0.0
    words = {name: sum(len(a.split()) for a in answers) / len(answers) for name, answers in sets.items()}
    return AnswerShift(top["evaluation"], top["pool"], words["evaluation"], words["pool"], len(sets["evaluation"]),
                       len(sets["pool"]))


def first_references(rows: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    """task -> the first reference of each of its rows (a prepared split's ``task`` and ``references``)."""
    found: dict[str, list[str]] = {}
    for row in rows:
        found.setdefault(row["task"], []).append(row["references"][0] if row["references"] else "")
    return found


def task_shifts(evaluation_rows: Iterable[dict[str, Any]], pool_rows: Iterable[dict[str, Any]],
                tasks: Iterable[str]) -> dict[str, AnswerShift]:
    """The shift of every task in ``tasks`` that has rows on both sides."""
    evaluation, pool = first_references(evaluation_rows), first_references(pool_rows)
    return {task: answer_shift(evaluation[task], pool[task]) for task in tasks
            if evaluation.get(task) and pool.get(task)}


def pool_shifts(recipe: Recipe, prepared: Any, tasks: list[str], warn_for: list[str]) -> dict[str, Any]:
    """How unlike the instances it is scored on (``recipe.eval``) each of ``tasks``' adaptation pool is, from the
    prepared data; a shifted task of ``warn_for`` gets a warning line, since its few-shot scores then measure the
    shift as well as the method."""
    if not tasks:
        return {}
    # here, not at the top: the measures and read_shifts serve the summaries, which need no torch or datasets
    from orchmoe_cli.core.evaluation import select_instances
    from orchmoe_cli.data.dataset_cache import POOL

    evaluated = select_instances(prepared.dataset["test"], dataclasses.replace(recipe.eval, tasks=tasks))
    shifts = task_shifts(evaluated, prepared.dataset[POOL].select_columns(["task", "references"]), tasks)
    for task, shift in shifts.items():
        if shift.shifted and task in warn_for:
            log.warning(f"{task}: its adaptation pool is unlike its evaluation set ({shift.describe()}); its "
                        "few-shot scores measure that shift as well as the method")
    return {task: shift.as_dict() for task, shift in shifts.items()}


_MEASURES = ("top_evaluation", "top_pool", "words_evaluation", "words_pool", "mismatch")


def read_shifts(path: Path) -> dict[str, dict[str, Any]]:
    """A sweep's ``pool_shift.json`` (task -> the measures of :meth:`AnswerShift.as_dict`), checked, since the
    summary tables read every field of it."""
    found = read_json(path, damaged=_REDO)

    def measured(entry: Any) -> bool:
        return isinstance(entry, dict) and isinstance(entry.get("shifted"), bool) and all(
            isinstance(entry.get(key), (int, float)) and not isinstance(entry.get(key), bool) for key in _MEASURES)

    if not isinstance(found, dict) or not all(isinstance(task, str) and measured(v) for task, v in found.items()):
        raise OrchmoeError(f"{path}: not the pool measures orchmoe adapt writes (task -> {', '.join(_MEASURES)}, "
                           f"shifted){_REDO}")
    return found
