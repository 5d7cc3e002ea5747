"""Comparing two evaluations of the same instances: a paired bootstrap over instances.

ROUGE-L on a few dozen instances of a task moves by several points from the choice of instances
alone; resampling instances (the same ones for both systems) gives an interval for the difference. Instances
are paired by (task, id): ids are unique only within a task.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchmoe_cli.core.results import instance_key

InstanceKey = tuple[str, str]  # (task, id)
RESAMPLES = 10_000  # another seed moves the interval's ends by about 1% of its half-width
SEED = 0  # fixed: the same evaluations always give the same interval


@dataclass(frozen=True)
class Difference:
    mean: float  # mean of (a - b) over the shared instances
    low: float  # 2.5th percentile of the bootstrapped mean difference
    high: float  # 97.5th percentile
    n: int  # shared instances

    def __str__(self) -> str:
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def instance_scores(rows: Iterable[Mapping[str, Any]], metric: str = "rougeL",
                    scale: float = 1.0) -> dict[InstanceKey, float]:
    """(task, id) -> ``scale`` x ``metric`` of per-instance rows (``predictions.jsonl`` lines); a pair twice is an
    error, not a silent overwrite."""
    scores: dict[InstanceKey, float] = {}
    for row in rows:
        key = instance_key(row)
        if key in scores:
            raise ValueError(f"task {key[0]}: instance id '{key[1]}' is scored twice")
        scores[key] = scale * row[metric]
    return scores


def paired_bootstrap(a: Mapping[InstanceKey, float], b: Mapping[InstanceKey, float], resamples: int = RESAMPLES,
                     seed: int = SEED) -> Difference:
    """Mean of a - b over the (task, id) pairs both score (see :func:`instance_scores`), with a 95% percentile
    interval from resampling the instances with replacement. A key that is not a (task, id) pair is refused:
    ids alone would pair instances of different tasks."""
    for scores in (a, b):
        bad = next((k for k in scores if not (isinstance(k, tuple) and len(k) == 2)), None)
        if bad is not None:
            raise TypeError(f"per-instance scores must be keyed by (task, id), got the key {bad!r}")
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError("the two evaluations share no (task, id) instances")
    diff = np.array([a[i] - b[i] for i in shared], dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Difference(float(diff.mean()), float(low), float(high), len(shared))
