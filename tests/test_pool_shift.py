"""How unlike its evaluation set a task's adaptation pool is: the measures, and `orchmoe adapt`'s warning."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest

from orchmoe_cli.analysis.pool_shift import MIN_ANSWERS, SHIFTED, answer_shift, pool_shifts, task_shifts
from orchmoe_cli.data.dataset_cache import POOL
from orchmoe_cli.fsutil import json_text
from orchmoe_cli.recipe import EvalConfig


def test_a_pool_skewed_to_one_answer_is_shifted_and_a_like_one_is_not() -> None:
    evaluation = [f"title {i}" for i in range(48)] + ["Five Stars"] * 2
    skewed = answer_shift(evaluation, ["Five Stars"] * 15 + [f"other {i}" for i in range(85)])
    assert (skewed.top_evaluation, skewed.top_pool) == (pytest.approx(0.04), pytest.approx(0.15))
    assert skewed.mismatch == pytest.approx(0.11) and skewed.shifted
    alike = answer_shift(evaluation, [f"Title {i}" for i in range(60, 160)])  # case and spaces do not count
    assert alike.mismatch == pytest.approx(0.04) and not alike.shifted
    assert "15% of the pool vs 4% of the evaluation set" in skewed.describe()


def test_distinct_answers_are_not_a_skew_and_a_few_answers_are_too_few_to_tell() -> None:
    distinct = answer_shift([f"t{i}" for i in range(5)], [f"u{i}" for i in range(300)])  # 1/5 is no skew
    assert (distinct.top_evaluation, distinct.top_pool, distinct.mismatch) == (0.0, 0.0, 0.0)
    few = answer_shift(["x"] * 4, [f"u{i}" for i in range(300)])  # skewed, but 4 answers say too little
    assert few.mismatch == 1.0 and not few.shifted and few.as_dict()["n_evaluation"] == 4
    assert answer_shift(["x"] * 10, [f"u{i}" for i in range(300)]).shifted and MIN_ANSWERS == 10


def test_length_counts_as_a_log_ratio_and_empty_answers_on_one_side_only_are_unlike() -> None:
    longer = answer_shift([f"a{i} b" for i in range(10)], [f"a{i} b c" for i in range(10)])  # 3 words against 2
    assert longer.mismatch == pytest.approx(math.log(1.5)) and longer.shifted
    empty = answer_shift([f"a{i}" for i in range(10)], [" "] * 10)
    assert empty.mismatch == 1.0 and empty.shifted
    json_text(empty.as_dict(), Path("pool_shift.json"))  # finite: the JSON writer takes it
    assert answer_shift([""], [""]).mismatch == 0.0
    with pytest.raises(ValueError):
        answer_shift([], ["a"])
    assert SHIFTED == 0.1


def _prepared(evaluation: dict[str, list[str]], pool: dict[str, list[str]]) -> SimpleNamespace:
    def split(answers: dict[str, list[str]]) -> datasets.Dataset:
        rows = [(task, i, answer) for task, values in answers.items() for i, answer in enumerate(values)]
        return datasets.Dataset.from_dict({
            "task": [t for t, _, _ in rows], "category": ["c"] * len(rows), "id": [f"{t}-{i}" for t, i, _ in rows],
            "prompt": ["p"] * len(rows), "prompt_ids": [[1]] * len(rows), "references": [[a] for _, _, a in rows]})
    return SimpleNamespace(dataset={"test": split(evaluation), POOL: split(pool)})


def test_adapt_warns_for_a_shifted_pool_and_measures_only_the_evaluated_instances(caplog) -> None:
    evaluation = {"skewed": [f"t{i}" for i in range(10)] + ["Five Stars"] * 90, "alike": ["x y"] * 4}
    pool = {"skewed": ["Five Stars"] * 5 + ["u v"] * 5, "alike": ["x y"] * 4}
    prepared = _prepared(evaluation, pool)
    recipe = SimpleNamespace(eval=dataclasses.replace(EvalConfig(), max_instances=10))
    with caplog.at_level(logging.WARNING):
        found = pool_shifts(recipe, prepared, ["skewed", "alike"], ["skewed", "alike"])
    # the first 10 evaluation rows (what cells are scored on) hold no "Five Stars"; half the pool does
    assert found["skewed"]["top_pool"] == 0.5 and found["skewed"]["top_evaluation"] == 0.0
    assert found["skewed"]["shifted"] and not found["alike"]["shifted"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith("skewed: its adaptation pool is unlike its evaluation set")
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # measured, but no cell of it left to run: no warning
        assert pool_shifts(recipe, prepared, ["skewed"], [])["skewed"]["shifted"]
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert pool_shifts(recipe, prepared, [], []) == {}
    assert set(task_shifts(prepared.dataset["test"], prepared.dataset[POOL], ["alike", "absent"])) == {"alike"}
