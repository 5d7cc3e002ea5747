"""Comparing evaluations of the same instances: each run minus a reference, per task and overall.

Two runs' means differ by a point or two on a few hundred instances from the choice of instances alone, so
every difference comes with a 95% paired-bootstrap interval over (task, id) instances
(:func:`~orchmoe_cli.analysis.bootstrap.paired_bootstrap`). Runs scored on different instances are refused:
their difference would mix a change of system with a change of test set.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from orchmoe_cli.analysis.bootstrap import RESAMPLES, SEED, Difference, InstanceKey, instance_scores, paired_bootstrap
from orchmoe_cli.core.figures import pyplot
from orchmoe_cli.core.results import instance_key, markdown_table
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.fsutil import atomic_write

OVERALL = "overall"
METRICS = {"rougeL": "ROUGE-L", "exact_match": "EM"}  # per-instance key -> column name
ROW_INCHES = 0.17  # forest plot height per interval, so a dozen tasks x several runs stay readable


@dataclass(frozen=True)
class Cell:
    """One run on one task (or ``overall``): its own means and, unless it is the reference, its differences."""

    run: str
    task: str
    n: int
    means: dict[str, float]  # metric -> mean in points
    differences: dict[str, Difference]  # metric -> run minus reference; empty for the reference


@dataclass(frozen=True)
class Comparison:
    reference: str
    runs: list[str]  # the reference first
    tasks: list[str]  # the overall row's name first, then the tasks in the reference's order
    cells: list[Cell]  # grouped by task in ``tasks`` order, runs in ``runs`` order
    resamples: int
    seed: int
    overall: str = OVERALL  # the row of all instances: "overall", or longer when a task has that name

    def cells_for(self, task: str) -> list[Cell]:
        return [c for c in self.cells if c.task == task]


def check_same_instances(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Every run scores exactly the reference's (task, id) instances; else one line naming the first that one
    run has and the other lacks (in file order)."""
    reference, *others = runs
    reference_keys = [instance_key(row) for row in runs[reference]]
    reference_set = set(reference_keys)
    for label in others:
        keys = [instance_key(row) for row in runs[label]]
        key_set = set(keys)
        mismatch = next(((k, reference, label) for k in reference_keys if k not in key_set), None) or next(
            ((k, label, reference) for k in keys if k not in reference_set), None)
        if mismatch is not None:
            (task, instance), has, lacks = mismatch
            raise OrchmoeError(f"{label} and {reference} are scored on different instances: task {task}, id "
                               f"'{instance}' is in {has} but not in {lacks}; compare evaluations of the same "
                               "split, tasks and max_instances")


def _subset(scores: Mapping[InstanceKey, float], task: str | None) -> dict[InstanceKey, float]:
    """The instances of ``task``; all of them for None."""
    return dict(scores) if task is None else {k: v for k, v in scores.items() if k[0] == task}


def compare_runs(runs: Mapping[str, Sequence[Mapping[str, Any]]], resamples: int = RESAMPLES,
                 seed: int = SEED) -> Comparison:
    """Each run's mean ROUGE-L and exact match (points) per task and overall, and, for every run after the first
    (the reference), the paired-bootstrap difference run minus reference. ``runs`` maps a label to its
    per-instance rows (``predictions.jsonl`` lines: task, id, rougeL, exact_match in [0, 1])."""
    if len(runs) < 2:
        raise OrchmoeError("a comparison needs at least two runs: the reference and one to compare with it")
    check_same_instances(runs)
    labels = list(runs)
    reference = labels[0]
    scores = {label: {m: instance_scores(rows, m, scale=100.0) for m in METRICS} for label, rows in runs.items()}
    names = list(dict.fromkeys(row["task"] for row in runs[reference]))
    overall = OVERALL
    while overall in names:  # a task named "overall" keeps its own row
        overall += "*"
    tasks = [overall, *names]
    cells = []
    for task in tasks:
        subsets = {label: {m: _subset(scores[label][m], None if task == overall else task) for m in METRICS}
                   for label in labels}
        for label in labels:
            mine = subsets[label]
            differences = {} if label == reference else {
                m: paired_bootstrap(mine[m], subsets[reference][m], resamples=resamples, seed=seed) for m in METRICS}
            cells.append(Cell(label, task, len(mine["rougeL"]),
                              {m: statistics.fmean(mine[m].values()) for m in METRICS}, differences))
    return Comparison(reference, labels, tasks, cells, resamples, seed, overall)


def _metric_fields(cell: Cell, metric: str) -> dict[str, float]:
    fields = {"mean": round(cell.means[metric], 4)}
    difference = cell.differences.get(metric)
    if difference is not None:
        fields.update(difference=round(difference.mean, 4), ci_low=round(difference.low, 4),
                      ci_high=round(difference.high, 4))
    return fields


def as_dict(comparison: Comparison) -> dict[str, Any]:
    """JSON-ready: per run and task, n and each metric's mean (and, but for the reference, the difference from
    the reference with its interval). Every number is finite: no task is empty, so no mean is undefined."""
    return {
        "reference": comparison.reference,
        "runs": comparison.runs,
        "interval": {"confidence": 0.95, "method": "paired bootstrap over (task, id) instances",
                     "resamples": comparison.resamples, "seed": comparison.seed},
        "results": {run: {c.task: {"n": c.n, **{m: _metric_fields(c, m) for m in METRICS}}
                          for c in comparison.cells if c.run == run} for run in comparison.runs},
    }


def to_csv(comparison: Comparison) -> str:
    """One row per (run, task); the reference's difference columns are empty."""
    columns = ["run", "task", "n"] + [f"{m}_{field}" for m in METRICS
                                      for field in ("mean", "difference", "ci_low", "ci_high")]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for cell in comparison.cells:
        writer.writerow({"run": cell.run, "task": cell.task, "n": cell.n,
                         **{f"{m}_{k}": v for m in METRICS for k, v in _metric_fields(cell, m).items()}})
    return out.getvalue()


def _row(cell: Cell, reference: str) -> list[Any]:
    """run, n, then per metric: the mean and "difference [low, high]" ("reference" for the reference)."""
    cells: list[Any] = [cell.run, cell.n]
    for metric in METRICS:
        difference = cell.differences.get(metric)
        cells += [cell.means[metric], "reference" if cell.run == reference else str(difference)]
    return cells


def _headers() -> list[str]:
    return ["n"] + [h for name in METRICS.values() for h in (name, f"{name} minus reference [95% CI]")]


def _caption(comparison: Comparison) -> str:
    n = comparison.cells_for(comparison.overall)[0].n
    return (f"Each run minus {comparison.reference}, with 95% paired-bootstrap intervals over the same {n} (task, id) "
            f"instances ({comparison.resamples:,} resamples, seed {comparison.seed}); scores in points.")


def to_markdown(comparison: Comparison) -> str:
    """An overall table (one row per run) and a per-task one, ready to paste into a README."""
    ref = comparison.reference
    overall = markdown_table(["run", *_headers()], [_row(c, ref) for c in comparison.cells_for(comparison.overall)])
    per_task = markdown_table(["task", "run", *_headers()],
                              [[c.task, *_row(c, ref)] for task in comparison.tasks[1:]
                               for c in comparison.cells_for(task)])
    return f"{_caption(comparison)}\n\n**Overall**\n\n{overall}\n**Per task**\n\n{per_task}"


def _styled(difference: Difference | None) -> str:
    """The interval, green or red when it excludes 0."""
    if difference is None:
        return "[dim]reference[/dim]"
    colour = "green" if difference.low > 0 else "red" if difference.high < 0 else None
    return f"[{colour}]{difference}[/{colour}]" if colour else str(difference)


def comparison_table(comparison: Comparison) -> Table:
    """Rich table: a section per task, ``overall`` first in bold."""
    table = Table(title=f"orchmoe compare · reference {escape(comparison.reference)}",
                  caption=escape(_caption(comparison)),
                  title_justify="left", caption_justify="left")
    table.add_column("task")
    table.add_column("run")
    for header in _headers():
        table.add_column(header, justify="right")
    for task in comparison.tasks:
        group = comparison.cells_for(task)
        for i, cell in enumerate(group):
            style = "bold" if task == comparison.overall else None
            metrics = [v for m in METRICS for v in (f"{cell.means[m]:.2f}", _styled(cell.differences.get(m)))]
            table.add_row(escape(task) if i == 0 else "", escape(cell.run), str(cell.n), *metrics, style=style,
                          end_section=i == len(group) - 1)
    return table


def forest_plot(comparison: Comparison, path: Path) -> Path:
    """One panel per metric: each run's difference from the reference with its interval, grouped by task
    (``overall`` on top), and a line at 0."""
    plt = pyplot()

    others = comparison.runs[1:]
    group_height = len(others) + 1  # one row per run and a gap
    rows = len(comparison.tasks) * group_height
    fig, axes = plt.subplots(1, len(METRICS), sharey=True, squeeze=False,
                             figsize=(5 * len(METRICS) + 3, max(3.0, ROW_INCHES * rows + 1.5)))
    colours = plt.get_cmap("tab10")
    for ax, (metric, name) in zip(axes[0], METRICS.items()):
        for j, run in enumerate(others):
            ys, means, errors = [], [], [[], []]
            for i, task in enumerate(comparison.tasks):
                cell = next(c for c in comparison.cells_for(task) if c.run == run)
                difference = cell.differences[metric]
                ys.append(i * group_height + j)
                means.append(difference.mean)
                errors[0].append(difference.mean - difference.low)
                errors[1].append(difference.high - difference.mean)
            ax.errorbar(means, ys, xerr=errors, fmt="o", markersize=3, capsize=2, color=colours(j % 10), label=run)
        ax.axvline(0.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xlabel(f"{name} minus {comparison.reference} (points, 95% CI)")
        ax.grid(axis="x", alpha=0.3)
    centres = [i * group_height + (len(others) - 1) / 2 for i in range(len(comparison.tasks))]
    axes[0][0].set_yticks(centres, comparison.tasks, fontsize=7)
    axes[0][0].set_ylim(rows - 0.5, -1.0)  # overall on top
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)
    return path
