"""Summaries of an adaptation sweep: mean ± std over seeds per mode and k (overall and per task), as a rich
table, ``adapt_summary.md`` / ``adapt_summary.json``, and a sample-efficiency plot (ROUGE-L against k)."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.table import Table

from orchmoe_cli.analysis.bootstrap import instance_scores
from orchmoe_cli.fsutil import atomic_write, atomic_write_json, atomic_write_text

RESULTS = "adapt_results.jsonl"  # one line per finished cell: its settings and aggregate scores
PREDICTIONS = "predictions"  # <cell>.jsonl per cell: prompt digest, prediction, references, scores


def cell_file_name(key: str) -> str:
    """A cell key (task/mode/kK/sS) as one path component."""
    return key.replace("/", "-")


def read_results(path: Path) -> list[dict[str, Any]]:
    """The cells of a sweep's ``adapt_results.jsonl``, each with ``scores`` ((task, id) -> ROUGE-L in [0, 1]) read
    from its ``predictions/<cell>.jsonl``, the one per-instance record. Older sweeps kept them in the line, keyed
    by id alone: a cell is one task, so such an id is read as (the cell's task, id)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.open(encoding="utf-8") if line.strip()]
    for row in rows:
        if "scores" in row:
            row["scores"] = {(row["task"], instance): value for instance, value in row["scores"].items()}
        else:
            predictions = path.parent / PREDICTIONS / f"{cell_file_name(row['key'])}.jsonl"
            row["scores"] = instance_scores(map(json.loads, predictions.open(encoding="utf-8")))
    return rows


def merge_results(paths: list[Path]) -> list[dict[str, Any]]:
    """The cells of several sweeps (one per trained checkpoint) as one table: zero-shot cells are named after
    their checkpoint's method (``zero_shot (mhr)``), the only mode two checkpoints share; a cell key twice is
    an error, since the two sweeps would then be answering the same question differently."""
    rows = [row for path in paths for row in read_results(path)]
    methods = {row.get("method") for row in rows if row["mode"] == "zero_shot"}
    seen: set[tuple[str, str]] = set()
    for row in rows:
        if row["mode"] == "zero_shot" and len(methods) > 1:
            row["mode"] = f"zero_shot ({row.get('method', 'base')})"
        key = (row["mode"], row["key"])
        if key in seen:
            raise ValueError(f"cell {row['key']} ({row['mode']}) is in more than one of {[str(p) for p in paths]}")
        seen.add(key)
    return rows


def _overall_per_seed(rows: list[dict]) -> dict[tuple[str, int], list[float]]:
    """(mode, k) -> one overall ROUGE-L per seed: the mean over every evaluation instance ((task, id)) of every
    task."""
    pooled: dict[tuple[str, int, int], dict[tuple[str, str], float]] = defaultdict(dict)
    for row in rows:
        column = pooled[(row["mode"], row["shots"], row["seed"])]
        for instance, value in row["scores"].items():
            if instance in column:
                raise ValueError(f"task {instance[0]}: instance id '{instance[1]}' is in two cells of "
                                 f"{row['mode']} k={row['shots']} seed {row['seed']}")
            column[instance] = 100 * value
    out: dict[tuple[str, int], list[float]] = defaultdict(list)
    for (mode, k, _), values in sorted(pooled.items()):
        out[(mode, k)].append(sum(values.values()) / len(values))
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _common_tasks(rows: list[dict]) -> set[str]:
    """Tasks every (mode, k) column has: overall numbers compare columns on the same tasks only."""
    columns: dict[tuple[str, int], set[str]] = defaultdict(set)
    for row in rows:
        columns[(row["mode"], row["shots"])].add(row["task"])
    return set.intersection(*columns.values()) if columns else set()


def summarise(rows: list[dict]) -> dict[str, Any]:
    common = _common_tasks(rows)
    overall = {f"{mode}@{k}": dict(zip(("mean", "std"), _mean_std(v)), seeds=len(v), mode=mode, shots=k)
               for (mode, k), v in _overall_per_seed([r for r in rows if r["task"] in common]).items()}
    by_task: dict[str, dict[str, Any]] = defaultdict(dict)
    grouped: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for row in rows:
        grouped[(row["task"], row["mode"], row["shots"])].append(row["rougeL"])
    for (task, mode, k), values in sorted(grouped.items()):
        mean, std = _mean_std(values)
        by_task[task][f"{mode}@{k}"] = {"mean": mean, "std": std, "seeds": len(values)}
    trainable = {row["mode"]: row["trainable"] for row in rows}
    return {"overall": overall, "overall_tasks": sorted(common), "by_task": dict(by_task), "trainable": trainable,
            "cells": len(rows)}


def _label(mode: str, k: int) -> str:
    return mode if k == 0 else f"{mode} k={k}"


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="adaptation: ROUGE-L on the held-out tasks (mean ± std over seeds)", title_justify="left")
    columns = sorted(summary["overall"].values(), key=lambda c: (c["shots"], c["mode"]))
    table.add_column("task")
    for c in columns:
        table.add_column(_label(c["mode"], c["shots"]), justify="right")
    for task, cells in summary["by_task"].items():
        table.add_row(task, *(f"{cells[k]['mean']:.2f} ± {cells[k]['std']:.2f}" if (k := f"{c['mode']}@{c['shots']}")
                              in cells else "-" for c in columns))
    table.add_row(f"[bold]all ({len(summary['overall_tasks'])} common tasks)[/bold]",
                  *(f"[bold]{c['mean']:.2f} ± {c['std']:.2f}[/bold]" for c in columns))
    return table


def _markdown(summary: dict[str, Any]) -> str:
    columns = sorted(summary["overall"].values(), key=lambda c: (c["shots"], c["mode"]))
    head = "| task | " + " | ".join(_label(c["mode"], c["shots"]) for c in columns) + " |"
    lines = ["# Adaptation results", "", "ROUGE-L (SNI official scorer) on each held-out task's evaluation instances, "
             "mean ± std over seeds. Trainable parameters per mode: "
             + ", ".join(f"{m} {n:,}" for m, n in summary["trainable"].items()) + ".", "", head,
             "|---|" + "---:|" * len(columns)]
    for task, cells in summary["by_task"].items():
        lines.append(f"| {task} | " + " | ".join(
            f"{cells[k]['mean']:.2f} ± {cells[k]['std']:.2f}" if (k := f"{c['mode']}@{c['shots']}") in cells else "-"
            for c in columns) + " |")
    lines.append(f"| **all ({len(summary['overall_tasks'])} tasks every column has)** | "
                 + " | ".join(f"**{c['mean']:.2f} ± {c['std']:.2f}**" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> Path:
    """ROUGE-L against k (log axis), a line per mode with seed error bars; zero-shot as a dashed level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    by_mode: dict[str, list[dict]] = defaultdict(list)
    for c in summary["overall"].values():
        by_mode[c["mode"]].append(c)
    # zero-shot levels in greys, told apart by dash pattern, so no level shares a colour with a mode's line
    levels = iter([("black", "--"), ("dimgrey", ":"), ("grey", "-."), ("darkgrey", (0, (5, 2, 1, 2)))])
    for mode, cells in sorted(by_mode.items()):
        cells.sort(key=lambda c: c["shots"])
        if cells[0]["shots"] == 0:
            colour, dashes = next(levels, ("grey", "--"))
            ax.axhline(cells[0]["mean"], linestyle=dashes, color=colour, label=f"{mode} ({cells[0]['mean']:.1f})")
            continue
        ax.errorbar([c["shots"] for c in cells], [c["mean"] for c in cells], yerr=[c["std"] for c in cells],
                    marker="o", capsize=3, label=mode)
    ax.set_xscale("log")
    shots = sorted({c["shots"] for c in summary["overall"].values() if c["shots"] > 0})
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.minorticks_off()
    ax.set_xlabel("training examples per task (k)")
    ax.set_ylabel("ROUGE-L, held-out tasks")
    n_tasks = len(summary["overall_tasks"])
    ax.set_title(f"sample efficiency ({n_tasks} held-out task{'s' if n_tasks != 1 else ''} every mode has)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the plot: lines stay visible
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


def write_summary(out: Path, rows: list[dict]) -> dict[str, Any]:
    summary = summarise(rows)
    atomic_write_json(out / "adapt_summary.json", summary)
    atomic_write_text(out / "adapt_summary.md", _markdown(summary))
    if any(c["shots"] > 0 for c in summary["overall"].values()):
        plot(summary, out / "sample_efficiency.png")
    return summary
