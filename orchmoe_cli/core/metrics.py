"""The official Super-NaturalInstructions metric: ROUGE-L and exact match.

Reproduces ``eval/automatic/evaluation.py`` of allenai/natural-instructions (identical to
Tk-Instruct's ``compute_metrics.py`` for the English track): per instance the maximum over the
reference list, then the mean over instances times 100, rounded to 4 decimals. Groups (tasks,
categories) use the same function on their instances, under keys ``{metric}_for_{group}``.
"""

from __future__ import annotations

import string
from collections import defaultdict
from collections.abc import Iterable, Sequence
from functools import lru_cache

from rouge_score import rouge_scorer

from orchmoe_cli.data.sni_task import group_name, label_clash
from orchmoe_cli.errors import OrchmoeError

METRICS = ("exact_match", "rougeL")
_PUNCTUATION = set(string.punctuation)


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation without article removal: lower case, drop ASCII punctuation, fold spaces."""
    return " ".join("".join(ch for ch in text.lower() if ch not in _PUNCTUATION).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(ref) for ref in references))


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Max over references of ROUGE-L F1 (rouge_score, Porter stemmer), in [0, 1]."""
    scorer = _scorer()
    return max(scorer.score(target=ref, prediction=prediction)["rougeL"].fmeasure for ref in references)


def score_instance(prediction: str | None, references: Sequence[str]) -> dict[str, float]:
    """Both metrics for one instance, in [0, 1]; a missing prediction counts as the empty string."""
    if not references:
        raise ValueError("an instance needs at least one reference")
    pred = prediction or ""
    return {"exact_match": exact_match(pred, references), "rougeL": rouge_l(pred, references)}


def _mean100(values: Sequence[float]) -> float:
    return round(100.0 * sum(values) / len(values), 4) if values else 0.0


def aggregate(rows: Iterable[dict]) -> dict[str, float]:
    """Official keys from scored rows (each with ``task``, ``category``, ``exact_match``, ``rougeL``).

    Returns ``exact_match``, ``rougeL`` (micro-averaged over all instances, as upstream) and
    ``{metric}_for_{task}`` / ``{metric}_for_{category}`` for every group.
    """
    overall: dict[str, list[float]] = defaultdict(list)
    grouped: dict[str, list[float]] = defaultdict(list)
    rows = list(rows)
    clash = label_clash((row["task"], row["category"]) for row in rows)
    if clash:  # one key for two groups would mix their scores
        raise OrchmoeError(f"cannot score these rows apart: {clash}")
    for row in rows:
        for metric in METRICS:
            overall[metric].append(row[metric])
            grouped[f"{metric}_for_{row['task']}"].append(row[metric])
            grouped[f"{metric}_for_{group_name(row['category'])}"].append(row[metric])
    results = {metric: _mean100(overall[metric]) for metric in METRICS}
    results.update({key: _mean100(values) for key, values in sorted(grouped.items())})
    return results
