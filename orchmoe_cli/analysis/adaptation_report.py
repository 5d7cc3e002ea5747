"""An adaptation sweep's records and summaries. Records: ``sweep.json`` (what every cell's numbers depend on) and
``adapt_results.jsonl`` (a line per finished cell, bound to the base model and checkpoint), read through the one
validating reader (:mod:`orchmoe_cli.core.records`). Summaries: mean ± std over seeds per mode and k (overall
and per task), as a rich table, ``adapt_summary.md`` / ``adapt_summary.json``, and a sample-efficiency plot
(ROUGE-L against k)."""

from __future__ import annotations

import logging
import statistics
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.table import Table

from orchmoe_cli.analysis.bootstrap import instance_scores
from orchmoe_cli.analysis.pool_shift import read_shifts
from orchmoe_cli.core.figures import pyplot
from orchmoe_cli.core.records import (
    NOT_RECORDED,
    JsonLines,
    base_identity,
    first_difference,
    read_json_object,
    read_jsonl,
    shown,
)
from orchmoe_cli.core.results import markdown_table, recorded_score_gap
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.fsutil import atomic_write, atomic_write_json, atomic_write_text
from orchmoe_cli.recipe import Recipe

log = logging.getLogger(__name__)

RESULTS = "adapt_results.jsonl"  # one line per finished cell: its settings and aggregate scores
PREDICTIONS = "predictions"  # <cell>.jsonl per cell: prompt digest, prediction, references, scores
POOL_SHIFT = "pool_shift.json"  # per adapted task: how unlike its evaluation set its pool is (analysis.pool_shift)
# what every results line is bound to: the base model, the checkpoint's digest, the checkpoint's own origin
BINDING = ("base", "checkpoint_sha256", "init_from")
_LINE_FIELDS = {"key": str, "task": str, "mode": str, "shots": int, "seed": int, "trainable": int,
                "rougeL": (int, float)}
_PREDICTION_FIELDS = {"task": str, "id": str, "rougeL": (int, float)}
_REDO = "; remove that line to run its cell again, or choose another adapt.output_dir"
_REDO_CELL = f" (a finished cell's per-instance scores); remove its line from {RESULTS} to run it again"


def cell_file_name(key: str) -> str:
    """A cell key (task/mode/kK/sS) as one path component."""
    return key.replace("/", "-")


def _field_problem(row: Mapping[str, Any], fields: Mapping[str, Any]) -> str | None:
    """The first of ``fields`` (name -> type) that ``row`` lacks or holds as another type (a bool is no number)."""
    for name, kind in fields.items():
        value = row.get(name)
        if isinstance(value, bool) or not isinstance(value, kind):
            return f"'{name}' is {'missing' if name not in row else repr(value)}, expected a " + (
                "number" if kind == (int, float) else f"{kind.__name__}")
    return None


def _line_problem(row: Mapping[str, Any]) -> str | None:
    """What is wrong with one results line, or None: the fields the summary reads, a key that is its own cell,
    per-instance scores (older lines) that are a mapping."""
    problem = _field_problem(row, _LINE_FIELDS)
    if problem is not None:
        return problem
    own = f"{row['task']}/{row['mode']}/k{row['shots']}/s{row['seed']}"
    if row["key"] != own:
        return f"'key' is {row['key']!r} but its task, mode, shots and seed make {own!r}"
    scores = row.get("scores", {})
    if not isinstance(scores, dict) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                           for v in scores.values()):
        return f"'scores' is {scores!r:.60}, expected an object of per-instance scores"
    return None


def read_result_lines(path: Path, binding: Mapping[str, Any] | None = None,
                      against: str = "this sweep's") -> JsonLines:
    """The lines of ``adapt_results.jsonl``, each checked; every line bound to ``binding`` (default: the first
    line's), so cells of another checkpoint or base model are refused, never summarised with these. A final line
    cut short is dropped (``JsonLines.cut``)."""
    expected = dict(binding) if binding is not None else None
    seen: set[str] = set()

    def check(row: dict[str, Any]) -> str | None:
        nonlocal expected
        problem = _line_problem(row)
        if problem is not None:
            return problem
        if row["key"] in seen:  # two writers, or a line appended twice: its cell would count twice
            return f"cell {row['key']} is already recorded on an earlier line"
        seen.add(row["key"])
        if expected is None:
            expected = {name: row.get(name, NOT_RECORDED) for name in BINDING}
            return None
        found = first_difference(row, expected)
        if found is None:
            return None
        name, recorded, current = found
        return f"its cell was made with {name}={shown(recorded)}, but {against} is {shown(current)}"

    return read_jsonl(path, check, cut_ok=True, fix=_REDO)


SWEEP = "sweep.json"  # what every cell's numbers depend on, written before the first cell
# What makes two sweeps' cells comparable; the grid (tasks, modes, shots, seeds) may grow between runs.
_SWEEP_SETTINGS = ("steps", "batch_size", "lr", "router_lr", "val_instances", "eval_every", "with_router")
_EVAL_SETTINGS = ("max_instances", "max_new_tokens", "num_beams")


def sweep_identity(recipe: Recipe, base: Any, checkpoint_sha256: str | None, init_from: str | None,
                   data_hash: str) -> dict[str, Any]:
    """Everything a finished cell's numbers depend on besides its own (task, mode, k, seed): the base model,
    the checkpoint's digest and where its training started (:data:`BINDING`, in every results line too), the
    data and the settings."""
    return {"checkpoint_sha256": checkpoint_sha256, "base": base_identity(base, recipe.model), "init_from": init_from,
            "data": data_hash, **{f"adapt.{name}": getattr(recipe.adapt, name) for name in _SWEEP_SETTINGS},
            **{f"eval.{name}": getattr(recipe.eval, name) for name in _EVAL_SETTINGS}}


def check_same_sweep(out: Path, identity: Mapping[str, Any]) -> None:
    """Refuse to add cells to a sweep directory made with other settings, another checkpoint or base model."""
    path = out / SWEEP
    if not path.is_file():
        if (out / RESULTS).is_file():
            raise OrchmoeError(f"{out} has {RESULTS} but no {SWEEP}; its settings are unknown, so choose another "
                               "adapt.output_dir", field="adapt.output_dir")
        return
    recorded = read_json_object(path, "the sweep's settings", fix="; choose another adapt.output_dir")
    found = first_difference(recorded, identity)
    if found is not None:
        name, old, new = found
        what = "another checkpoint, " if name == "checkpoint_sha256" else ""
        raise OrchmoeError(f"{out} holds cells made with {what}{name}={shown(old)} (this run: {shown(new)}); "
                           "choose another adapt.output_dir or remove it", field="adapt.output_dir")


def read_results(path: Path) -> list[dict[str, Any]]:
    """The cells of a sweep's ``adapt_results.jsonl``, each with ``scores`` ((task, id) -> ROUGE-L in [0, 1])
    from :func:`cell_scores`."""
    lines = read_result_lines(path, against="the first line's")
    if lines.warning is not None:
        log.warning(lines.warning)
    rows = lines.records
    for row in rows:
        row["scores"] = cell_scores(path, row)
    return rows


def cell_scores(path: Path, row: Mapping[str, Any]) -> dict[tuple[str, str], float]:
    """A finished cell's per-instance ROUGE-L ((task, id) -> [0, 1]) from its ``predictions/<cell>.jsonl``, the one
    per-instance record, checked against the score its line in ``path`` records. Older sweeps kept them in the
    line, keyed by id alone: a cell is one task, so such an id is read as (the cell's task, id)."""
    if "scores" in row:
        scores = {(row["task"], instance): value for instance, value in row["scores"].items()}
        source = "its own 'scores'"
    else:
        cell = path.parent / PREDICTIONS / f"{cell_file_name(row['key'])}.jsonl"
        if not cell.is_file():
            raise OrchmoeError(f"{cell}: not found{_REDO_CELL}")
        lines = read_jsonl(cell, lambda line: _field_problem(line, _PREDICTION_FIELDS), fix=_REDO_CELL)
        try:
            scores, source = instance_scores(lines.records), str(cell)
        except ValueError as exc:  # an instance twice
            raise OrchmoeError(f"{cell}: {exc}{_REDO_CELL}") from None
    gap = recorded_score_gap(row, {"rougeL": list(scores.values())})
    if gap is not None:
        raise OrchmoeError(f"{path}: cell {row['key']}: {gap} ({source}){_REDO}")
    return scores


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
    columns = [{"mode": mode, "shots": k} for k, mode in sorted({(row["shots"], row["mode"]) for row in rows})]
    return {"overall": overall, "overall_tasks": sorted(common), "by_task": dict(by_task), "columns": columns,
            "trainable": trainable, "cells": len(rows)}


def _label(mode: str, k: int) -> str:
    return mode if k == 0 else f"{mode} k={k}"


def _grid(summary: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, a row per task, the overall row) of both tables: a column for every (mode, k) some cell has, so
    every (task, mode, k) shows, however the grid grew; '-' where a task lacks a column or no task has them all."""
    keys = [f"{c['mode']}@{c['shots']}" for c in summary["columns"]]

    def shown(stats: dict[str, Any] | None) -> str:
        return "-" if stats is None else f"{stats['mean']:.2f} ± {stats['std']:.2f}"

    header = ["task", *(_label(c["mode"], c["shots"]) for c in summary["columns"])]
    rows = [[task, *(shown(cells.get(key)) for key in keys)] for task, cells in summary["by_task"].items()]
    n = len(summary["overall_tasks"])
    overall = [f"all ({n} task{'' if n == 1 else 's'} every column has)",
               *(shown(summary["overall"].get(key)) for key in keys)]
    return header, rows, overall


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="adaptation: ROUGE-L on the held-out tasks (mean ± std over seeds)", title_justify="left")
    header, rows, overall = _grid(summary)
    table.add_column(header[0])
    for label in header[1:]:
        table.add_column(label, justify="right")
    for row in rows:
        table.add_row(*row)
    table.add_row(*(f"[bold]{text}[/bold]" for text in overall))
    return table


def _markdown(summary: dict[str, Any]) -> str:
    header, rows, overall = _grid(summary)
    lines = ["# Adaptation results", "", "ROUGE-L (SNI official scorer) on each held-out task's evaluation instances, "
             "mean ± std over seeds. Trainable parameters per mode: "
             + ", ".join(f"{m} {n:,}" for m, n in summary["trainable"].items()) + ".", "",
             markdown_table(header, [*rows, [f"**{c}**" if c != "-" else c for c in overall]], numeric_from=1)]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> Path:
    """ROUGE-L against k (log axis), a line per mode with seed error bars; zero-shot as a dashed level."""
    plt = pyplot()

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


def pool_table(shifts: dict[str, dict[str, Any]]) -> str:
    """A markdown table of each task's pool-vs-evaluation measures (``analysis.pool_shift``)."""
    rows = [[task, f"{s['top_evaluation']:.2f} / {s['top_pool']:.2f}",
             f"{s['words_evaluation']:.1f} / {s['words_pool']:.1f}", f"{s['mismatch']:.3f}",
             "yes" if s["shifted"] else "no"] for task, s in shifts.items()]
    return markdown_table(["task", "top answer share (evaluation / pool)", "mean words (evaluation / pool)",
                            "mismatch", "pool unlike evaluation"], rows, numeric_from=3)


def write_summary(out: Path, rows: list[dict]) -> dict[str, Any]:
    summary = summarise(rows)
    shifts = read_shifts(out / POOL_SHIFT) if (out / POOL_SHIFT).is_file() else {}
    text = _markdown(summary)
    if shifts:
        summary["pool_shift"] = shifts
        text += ("\n\n## Adaptation pools\n\nIs each task's pool (what cells train on) like its evaluation set? "
                 "A pool unlike it teaches its own answers, and that task's few-shot scores measure the shift too.\n\n"
                 + pool_table(shifts))
    atomic_write_json(out / "adapt_summary.json", summary)
    atomic_write_text(out / "adapt_summary.md", text + "\n")
    if any(c["shots"] > 0 for c in summary["overall"].values()):
        plot(summary, out / "sample_efficiency.png")
    return summary
