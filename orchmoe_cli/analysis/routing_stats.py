"""Statistics of routing, as in Polytropon's analysis (Ponti et al., section 6), on plain numpy arrays.

Allocation arrays are ``(rows, heads, skills)``: ``probs`` are the eval-mode Bernoulli probabilities
(sigmoid of the logits), ``weights`` the skill mixture each row actually uses (``probs`` normalised
over skills). Rows are real tasks for Poly/MHR and abstract tasks (or real tasks through the
classifier) for OrchMoE. Everything here is a pure function, so the numbers are testable on
hand-built matrices and reusable while training (routing diagnostics).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

EPS = 1e-12
UNUSED_SHARE = 0.1  # a skill (or abstract task) with under a tenth of its fair share counts as unused
COLLAPSE_SHARE = 0.9  # an abstract task preferred by 90% of prompts has taken (nearly) everything


def normalised_entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Entropy of distributions along ``axis`` divided by its maximum log(n): 0 = one-hot, 1 = uniform."""
    p = np.asarray(p, dtype=np.float64)
    n = p.shape[axis]
    if n < 2:
        return np.zeros(np.delete(p.shape, axis % p.ndim))
    p = p / np.clip(p.sum(axis=axis, keepdims=True), EPS, None)
    return -(p * np.log(np.clip(p, EPS, None))).sum(axis=axis) / np.log(n)


def normalise(probs: np.ndarray) -> np.ndarray:
    """Skill weights of each (row, head): probabilities made to sum to one, as the layers do."""
    probs = np.asarray(probs, dtype=np.float64)
    return probs / (probs.sum(axis=-1, keepdims=True) + EPS)


@dataclass
class AllocationStats:
    """Polytropon's three numbers for one allocation (a layer, or all layers together)."""

    discreteness: float  # mean normalised entropy of routing rows: 0 = every row picks one skill, 1 = uniform
    sparsity: float  # share of binarised allocations (probability > 0.5) at 1
    skill_usage: float  # normalised entropy of the skills' total weight: 1 = skills used evenly
    unused_skills: list[int] = field(default_factory=list)  # skills with under a tenth of their fair share

    def as_dict(self) -> dict[str, float | list[int]]:
        return {"discreteness": self.discreteness, "sparsity": self.sparsity, "skill_usage": self.skill_usage,
                "unused_skills": self.unused_skills}


def allocation_stats(probs: np.ndarray) -> AllocationStats:
    """Statistics of ``probs`` shaped (rows, heads, skills) or (layers, rows, heads, skills)."""
    probs = np.asarray(probs, dtype=np.float64)
    weights = normalise(probs)
    columns = weights.reshape(-1, weights.shape[-1]).sum(axis=0)
    share = columns / max(columns.sum(), EPS)
    n_skills = weights.shape[-1]
    return AllocationStats(
        discreteness=float(normalised_entropy(weights).mean()),
        sparsity=float((probs > 0.5).mean()),
        skill_usage=float(normalised_entropy(columns)),
        unused_skills=[int(s) for s in np.flatnonzero(share < UNUSED_SHARE / n_skills)],
    )


def centred(vectors: np.ndarray) -> np.ndarray:
    """Rows minus their mean row: what sets a task's routing apart. Skill weights share a large common part
    (near-uniform mixtures), which would make every pair look alike (cosine near 1)."""
    vectors = np.asarray(vectors, dtype=np.float64).reshape(len(vectors), -1)
    return vectors - vectors.mean(axis=0, keepdims=True)


def cosine_similarity(vectors: np.ndarray) -> np.ndarray:
    """Rows' pairwise cosine similarity (rows x rows); a zero row is similar to nothing (0)."""
    vectors = np.asarray(vectors, dtype=np.float64).reshape(len(vectors), -1)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.clip(norms, EPS, None)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def cluster_order(vectors: np.ndarray) -> tuple[list[int], np.ndarray | None]:
    """Leaf order of average-linkage hierarchical clustering by cosine distance, and its linkage matrix
    (None with fewer than 3 rows, where there is nothing to cluster)."""
    from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
    from scipy.spatial.distance import pdist

    vectors = np.asarray(vectors, dtype=np.float64).reshape(len(vectors), -1)
    if len(vectors) < 3:
        return list(range(len(vectors))), None
    distances = np.clip(np.nan_to_num(pdist(vectors + EPS, metric="cosine"), nan=1.0), 0.0, 2.0)
    tree = optimal_leaf_ordering(linkage(distances, method="average"), distances)
    return [int(i) for i in leaves_list(tree)], tree


@dataclass
class CategoryCoherence:
    """Do tasks of one SNI category route alike? Mean similarity of same-category pairs against other pairs,
    with a permutation p-value (how often shuffled categories give a within-category mean at least as high)."""

    within: float
    between: float
    p_value: float
    pairs_within: int

    def as_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def category_coherence(similarity: np.ndarray, categories: Sequence[str], permutations: int = 2000,
                       seed: int = 0) -> CategoryCoherence | None:
    """None when no two rows share a category (nothing to compare)."""
    labels = np.asarray(categories)
    upper = np.triu_indices(len(labels), k=1)
    values = np.asarray(similarity)[upper]

    def within_mean(perm: np.ndarray) -> float:
        same = perm[upper[0]] == perm[upper[1]]
        return float(values[same].mean())

    same = labels[upper[0]] == labels[upper[1]]
    if not same.any() or same.all():
        return None
    observed = within_mean(labels)
    rng = np.random.default_rng(seed)
    at_least = sum(within_mean(rng.permutation(labels)) >= observed for _ in range(permutations))
    return CategoryCoherence(observed, float(values[~same].mean()), (at_least + 1) / (permutations + 1),
                             int(same.sum()))


def nearest(similarity: np.ndarray, row: int, candidates: Sequence[int], k: int = 3) -> list[tuple[int, float]]:
    """The ``k`` candidates most similar to ``row`` (itself excluded), most similar first."""
    scored = [(int(c), float(similarity[row, c])) for c in candidates if c != row]
    return sorted(scored, key=lambda item: -item[1])[:k]


@dataclass
class ClassifierStats:
    """How OrchMoE's task classifier spreads prompts over abstract tasks, against known categories."""

    router_entropy: float  # mean normalised entropy of p(t|x) over prompts: 1 = uniform, the collapse
    marginal_entropy: float  # normalised entropy of the batch-marginal usage: 1 = every abstract task used
    mean_max_probability: float
    argmax_counts: list[int]  # prompts preferring each abstract task
    used_abstract_tasks: int  # abstract tasks some prompt prefers
    # weighted share of the most common category within each abstract task's prompts, and the normalised mutual
    # information between preferred abstract task and category; None when the data names fewer than two
    # categories (a table without a category column), where both would be 1 for any classifier
    purity: float | None
    nmi: float | None
    purity_by_abstract_task: list[float | None]
    warnings: list[str]

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def mutual_information_normalised(a: Sequence[int], b: Sequence[str]) -> float:
    """NMI with the arithmetic-mean normaliser (sklearn's default); 0 for no shared information, 1 for a
    relabelling; 1 as well when both labelings are constant, 0 when only one is."""
    n = len(a)
    joint = Counter(zip(a, b))
    pa, pb = Counter(a), Counter(b)
    mi = sum(c / n * np.log(c * n / (pa[x] * pb[y])) for (x, y), c in joint.items())
    ha = -sum(c / n * np.log(c / n) for c in pa.values())
    hb = -sum(c / n * np.log(c / n) for c in pb.values())
    if ha == 0 and hb == 0:
        return 1.0
    return float(max(0.0, mi) / max((ha + hb) / 2, EPS))


def classifier_stats(task_probs: np.ndarray, categories: Sequence[str]) -> ClassifierStats:
    """Statistics of p(t|x) shaped (prompts, abstract tasks), with each prompt's SNI category."""
    probs = np.asarray(task_probs, dtype=np.float64)
    n_prompts, n_abstract = probs.shape
    preferred = probs.argmax(axis=1)
    counts = np.bincount(preferred, minlength=n_abstract)
    purity_by: list[float | None] = []
    for t in range(n_abstract):
        members = [categories[i] for i in np.flatnonzero(preferred == t)]
        purity_by.append(Counter(members).most_common(1)[0][1] / len(members) if members else None)
    purity = sum(p * c for p, c in zip(purity_by, counts) if p is not None) / max(n_prompts, 1)
    warnings = []
    unused = [t for t in range(n_abstract) if counts[t] == 0]
    if unused:
        warnings.append(f"{len(unused)} of {n_abstract} abstract tasks are preferred by no prompt: {unused}")
    if n_abstract > 1 and counts.max() >= COLLAPSE_SHARE * n_prompts:
        warnings.append(f"abstract task {int(counts.argmax())} is preferred by {counts.max()} of {n_prompts} "
                        "prompts: the classifier has collapsed onto it")
    router_entropy = float(normalised_entropy(probs).mean())
    if n_abstract > 1 and router_entropy > 0.95:
        warnings.append(f"p(t|x) is nearly uniform (mean normalised entropy {router_entropy:.3f}): the classifier "
                        "does not separate inputs, so every input gets the same skill mixture")
    by_category = len(set(categories)) > 1
    return ClassifierStats(
        router_entropy=router_entropy,
        marginal_entropy=float(normalised_entropy(probs.mean(axis=0))),
        mean_max_probability=float(probs.max(axis=1).mean()),
        argmax_counts=[int(c) for c in counts],
        used_abstract_tasks=int((counts > 0).sum()),
        purity=float(purity) if by_category else None,
        nmi=mutual_information_normalised(preferred.tolist(), list(categories)) if by_category else None,
        purity_by_abstract_task=purity_by if by_category else [None] * n_abstract,
        warnings=warnings,
    )


def allocation_warnings(stats: AllocationStats, what: str) -> list[str]:
    """Human-readable warnings for one allocation's statistics."""
    if not stats.unused_skills:
        return []
    return [f"{what}: skills {stats.unused_skills} receive under a tenth of their fair share of the weight (unused)"]
