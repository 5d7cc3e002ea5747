"""PNG figures of a routing report: heatmaps in clustering order, per-layer small multiples, a dendrogram,
the task similarity matrix and, for OrchMoE, which abstract tasks the classifier infers for real tasks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from orchmoe_cli.core.figures import pyplot
from orchmoe_cli.fsutil import atomic_write

if TYPE_CHECKING:
    from orchmoe_cli.analysis.routing_report import RoutingReport

ROW_INCHES = 0.17  # height per labelled row, so 62 task names stay readable


def _save(fig: Any, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    pyplot().close(fig)
    return path


def _label(report: RoutingReport, name: str) -> str:
    category = report.categories.get(name)
    return f"{name} [{category}]" if category else name


def _skill_labels(heads: int, skills: int) -> list[str]:
    return [f"s{s}" if heads == 1 else f"h{h}s{s}" for h in range(heads) for s in range(skills)]


def _heatmap(ax: Any, matrix: np.ndarray, rows: list[str], columns: list[str], title: str,
             probabilities: bool = False) -> Any:
    """Probabilities on a fixed 0-1 scale; skill weights scaled to their own range (the colour bar gives it),
    since near-uniform mixtures would otherwise all look alike."""
    limits = {"vmin": 0.0, "vmax": 1.0} if probabilities else {}
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest", **limits)
    ax.set_yticks(range(len(rows)), rows, fontsize=6)
    ax.set_xticks(range(len(columns)), columns, fontsize=6, rotation=90)
    ax.set_title(title, fontsize=9)
    return image


def plot_task_skill(report: RoutingReport, path: Path) -> Path:
    """Rows in clustering order x skills (per head), mean weight over layers."""
    plt = pyplot()
    view, order = report.view, report.order
    weights = view.weights
    assert weights is not None
    _, _, heads, skills = weights.shape
    matrix = weights.mean(axis=0)[order].reshape(len(order), heads * skills)
    fig, ax = plt.subplots(figsize=(2.5 + 0.3 * heads * skills, 1.5 + ROW_INCHES * len(order)))
    image = _heatmap(ax, matrix, [_label(report, view.rows[i]) for i in order], _skill_labels(heads, skills),
                     f"{report.method}: skill weights per {view.row_kind}, mean over {len(view.layers)} layers")
    fig.colorbar(image, ax=ax, shrink=0.5, label="weight")
    return _save(fig, path)


def plot_layers(report: RoutingReport, path: Path) -> Path:
    """One small heatmap per layer, rows in the same clustering order."""
    plt = pyplot()
    weights = report.view.weights
    assert weights is not None
    n_layers, _, heads, skills = weights.shape
    cols = min(6, n_layers)
    grid_rows = math.ceil(n_layers / cols)
    height = 0.4 + 0.04 * len(report.order) * grid_rows + grid_rows
    fig, axes = plt.subplots(grid_rows, cols, figsize=(1.6 * cols, height), squeeze=False)
    low, high = float(weights.min()), float(weights.max())
    for index, ax in enumerate(axes.flat):
        if index >= n_layers:
            ax.axis("off")
            continue
        matrix = weights[index][report.order].reshape(len(report.order), heads * skills)
        ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=low, vmax=high, interpolation="nearest")
        ax.set_title(report.view.layers[index].removeprefix("model."), fontsize=5)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{report.method}: skill weights per layer ({report.view.row_kind}s in clustering order; "
                 f"colours span {low:.3f}-{high:.3f})", fontsize=8)
    return _save(fig, path)


def plot_dendrogram(report: RoutingReport, path: Path) -> Path:
    from scipy.cluster.hierarchy import dendrogram

    plt = pyplot()
    rows = report.view.rows
    fig, ax = plt.subplots(figsize=(6, 1.0 + ROW_INCHES * len(rows)))
    dendrogram(report.linkage, orientation="left", labels=[_label(report, r) for r in rows], ax=ax,
               leaf_font_size=6, color_threshold=0.7 * float(np.max(report.linkage[:, 2])))
    ax.set_xlabel("cosine distance of routing (average linkage)", fontsize=7)
    ax.set_title(f"{report.method}: {report.view.row_kind}s clustered by routing", fontsize=9)
    return _save(fig, path)


def plot_similarity(report: RoutingReport, path: Path) -> Path:
    plt = pyplot()
    order, rows = report.order, report.view.rows
    size = 2.5 + 0.7 * ROW_INCHES * len(order)  # a square of cells: smaller rows than the heatmaps need
    fig, ax = plt.subplots(figsize=(size, size))
    matrix = report.similarity[np.ix_(order, order)]
    image = ax.imshow(matrix, cmap="magma", vmin=min(0.0, float(matrix.min())), vmax=1.0, interpolation="nearest")
    labels = [_label(report, rows[i]) for i in order]
    ax.set_yticks(range(len(order)), labels, fontsize=4)
    ax.set_xticks(range(len(order)), labels, fontsize=4, rotation=90)
    what = "generated adapters" if report.view.probs is None else "routing"
    ax.set_title(f"{report.method}: cosine similarity of {what}", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.4)
    return _save(fig, path)


def plot_abstract_tasks(report: RoutingReport, directory: Path) -> list[Path]:
    """OrchMoE with data: real task x abstract task and SNI category x abstract task (mean p(t|x))."""
    plt = pyplot()
    assert report.task_abstract is not None
    rows, order = report.view.rows, report.order
    columns = [f"t{t}" for t in range(report.task_abstract.shape[1])]
    fig, ax = plt.subplots(figsize=(2.5 + 0.3 * len(columns), 1.5 + ROW_INCHES * len(order)))
    image = _heatmap(ax, report.task_abstract[order], [_label(report, rows[i]) for i in order], columns,
                     "orchmoe: mean p(abstract task | prompt) per task", probabilities=True)
    fig.colorbar(image, ax=ax, shrink=0.5)
    paths = [_save(fig, directory / "task_abstract_tasks.png")]
    categories = sorted({report.categories[r] for r in rows if r in report.categories})
    if categories:
        matrix = np.stack([report.task_abstract[[i for i, r in enumerate(rows) if report.categories.get(r) == c]]
                           .mean(axis=0) for c in categories])
        fig, ax = plt.subplots(figsize=(2.5 + 0.3 * len(columns), 1.5 + ROW_INCHES * len(categories)))
        image = _heatmap(ax, matrix, categories, columns, "orchmoe: mean p(abstract task | prompt) per SNI category",
                         probabilities=True)
        fig.colorbar(image, ax=ax, shrink=0.5)
        paths.append(_save(fig, directory / "category_abstract_tasks.png"))
    if report.abstract is not None and report.abstract.weights is not None:
        weights = report.abstract.weights.mean(axis=0)
        heads, skills = weights.shape[1:]
        fig, ax = plt.subplots(figsize=(2.5 + 0.3 * heads * skills, 1.5 + 0.3 * len(report.abstract.rows)))
        image = _heatmap(ax, weights.reshape(len(weights), -1), report.abstract.rows, _skill_labels(heads, skills),
                         "orchmoe: allocation Z (abstract task -> skill weights), mean over layers")
        fig.colorbar(image, ax=ax, shrink=0.5)
        paths.append(_save(fig, directory / "allocation.png"))
    return paths


def plot_all(report: RoutingReport, directory: Path) -> list[Path]:
    """Every figure that applies to the report's method and data."""
    paths = []
    if report.view.probs is not None:
        paths += [plot_task_skill(report, directory / "heatmap.png"), plot_layers(report, directory / "layers.png")]
    if report.linkage is not None:
        paths.append(plot_dendrogram(report, directory / "dendrogram.png"))
    paths.append(plot_similarity(report, directory / "similarity.png"))
    if report.task_abstract is not None:
        paths += plot_abstract_tasks(report, directory)
    return paths
