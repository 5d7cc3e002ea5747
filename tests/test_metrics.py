"""The official SNI scorer, checked against hand-computed values."""

import pytest

from orchmoe_cli.core.metrics import aggregate, exact_match, label_clash, normalize_answer, rouge_l, score_instance
from orchmoe_cli.data.sni_task import group_name
from orchmoe_cli.errors import OrchmoeError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Cat, sat!", "the cat sat"),
        ("  many   spaces\n", "many spaces"),
        ("an apple", "an apple"),  # articles are kept (unlike SQuAD)
        ("Ünïcode—dash", "ünïcode—dash"),  # only ASCII punctuation is removed
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_exact_match_cases() -> None:
    assert exact_match("The answer.", ["the answer"]) == 1.0
    assert exact_match("answer", ["the answer"]) == 0.0
    assert exact_match("Paris", ["London", "paris!"]) == 1.0
    assert exact_match("", ["x"]) == 0.0


def test_rouge_l_hand_computed() -> None:
    # LCS("the cat sat on the mat", "the cat on the mat") = 5; P = 5/6, R = 1 -> F = 10/11
    assert rouge_l("the cat sat on the mat", ["the cat on the mat"]) == pytest.approx(10 / 11)
    # disjoint
    assert rouge_l("alpha beta", ["gamma delta"]) == 0.0


def test_rouge_l_stems_only_long_tokens_and_lowercases() -> None:
    # "running" -> "run", "dogs" -> "dog" (tokens longer than 3 characters are Porter-stemmed)
    assert rouge_l("Running DOGS", ["run dog"]) == pytest.approx(1.0)
    # punctuation becomes a separator: "well-known" == "well known"
    assert rouge_l("well-known", ["well known"]) == pytest.approx(1.0)


def test_rouge_l_max_over_references_and_empty() -> None:
    assert rouge_l("a b", ["x", "a b", "a"]) == pytest.approx(1.0)
    assert rouge_l("", ["something"]) == 0.0
    assert rouge_l("日本", ["日本"]) == 0.0  # non-ASCII vanishes under the default tokenizer


def test_score_instance_missing_prediction_is_empty() -> None:
    assert score_instance(None, ["x"]) == {"exact_match": 0.0, "rougeL": 0.0}
    with pytest.raises(ValueError):
        score_instance("x", [])


def test_aggregate_is_instance_micro_average_with_groups() -> None:
    rows = [
        {"task": "task1_a", "category": "Title Generation", "exact_match": 1.0, "rougeL": 1.0},
        {"task": "task1_a", "category": "Title Generation", "exact_match": 0.0, "rougeL": 0.5},
        {"task": "task2_b", "category": "Data to Text", "exact_match": 1.0, "rougeL": 0.25},
    ]
    result = aggregate(rows)
    assert result["exact_match"] == pytest.approx(66.6667)
    assert result["rougeL"] == pytest.approx(58.3333)
    assert result["exact_match_for_task1_a"] == 50.0
    assert result["rougeL_for_task2_b"] == 25.0
    assert result["rougeL_for_title_generation"] == 75.0
    assert group_name("Data to Text") == "data_to_text"


def test_every_score_key_names_one_group() -> None:
    """``_for_<task>`` and ``_for_<category key>`` share one key space: a task named as a category that holds other
    tasks, or two categories with one key, would mix scores; a task alone in a category of its own name is fine."""
    assert label_clash([("sentiment", "Sentiment"), ("sentiment_fr", "Sentiment")]) == \
        "task 'sentiment' has the name the category 'Sentiment' (of other tasks too) is scored under"
    assert "differ only in case or spaces" in label_clash([("a", "Title Generation"), ("b", "title_generation")])
    assert label_clash([("qa", "qa"), ("task001", "Title Generation")]) is None
    rows = [{"task": "sentiment", "category": "Sentiment", "exact_match": 1.0, "rougeL": 1.0},
            {"task": "other", "category": "Sentiment", "exact_match": 0.0, "rougeL": 0.0}]
    with pytest.raises(OrchmoeError, match="cannot score these rows apart"):
        aggregate(rows)
