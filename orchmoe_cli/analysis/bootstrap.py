"""Comparing two evaluations of the same instances: a paired bootstrap over instances.

ROUGE-L on a few dozen instances of a task moves by several points from the choice of instances
alone; resampling instances (the same ones for both systems) gives an interval for the difference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Difference:
    mean: float  # mean of (a - b) over the shared instances
    low: float  # 2.5th percentile of the bootstrapped mean difference
    high: float  # 97.5th percentile
    n: int  # shared instances

    def __str__(self) -> str:
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def paired_bootstrap(a: Mapping[str, float], b: Mapping[str, float], resamples: int = 10_000,
                     seed: int = 0) -> Difference:
    """Mean of a - b over the instance ids both score, with a 95% percentile interval from resampling the
    instances with replacement."""
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError("the two evaluations share no instance ids")
    diff = np.array([a[i] - b[i] for i in shared], dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Difference(float(diff.mean()), float(low), float(high), len(shared))
