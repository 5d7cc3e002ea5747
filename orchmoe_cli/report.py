"""Result artifacts in the lm-evaluation-harness style: results JSON, per-sample JSONL, tables."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import platform
import subprocess
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

import orchmoe_cli
from orchmoe_cli.metrics import group_name

_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "rouge-score")


def git_hash() -> str | None:
    """The commit of the orchmoe source tree, when it runs from a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(orchmoe_cli.__file__).parent,
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment_info() -> dict[str, Any]:
    """Versions, commit and date recorded next to every result."""
    versions = {"orchmoe": orchmoe_cli.__version__, "python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "versions": versions,
        "git_hash": git_hash(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def task_rows(rows: Sequence[dict], metrics: dict[str, float]) -> list[dict[str, Any]]:
    """One summary row per task, in first-seen order, from the official grouped metrics."""
    seen: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[row["task"]] += 1
        seen.setdefault(row["task"], {"task": row["task"], "category": row["category"]})
    return [
        {**info, "n": counts[task], "exact_match": metrics[f"exact_match_for_{task}"],
         "rougeL": metrics[f"rougeL_for_{task}"]}
        for task, info in seen.items()
    ]


def category_rows(rows: Sequence[dict], metrics: dict[str, float]) -> list[dict[str, Any]]:
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[row["category"]] += 1
    return [
        {"category": cat, "n": n, "exact_match": metrics[f"exact_match_for_{group_name(cat)}"],
         "rougeL": metrics[f"rougeL_for_{group_name(cat)}"]}
        for cat, n in sorted(counts.items())
    ]


def results_table(title: str, columns: dict[str, list[dict[str, Any]]], overall: dict[str, dict[str, float]]) -> Table:
    """Per-task ROUGE-L / EM table; ``columns`` maps a run label to its task rows (several runs side by side)."""
    table = Table(title=title, title_justify="left")
    table.add_column("Task")
    table.add_column("Category")
    table.add_column("N", justify="right")
    for label in columns:
        table.add_column(f"{label} EM", justify="right")
        table.add_column(f"{label} ROUGE-L", justify="right")
    first = next(iter(columns.values()))
    for i, row in enumerate(first):
        cells = [row["task"], row["category"], str(row["n"])]
        for runs in columns.values():
            cells += [f"{runs[i]['exact_match']:.2f}", f"{runs[i]['rougeL']:.2f}"]
        table.add_row(*cells)
    cells = ["[bold]all[/bold]", "", str(sum(r["n"] for r in first))]
    for label in columns:
        cells += [f"[bold]{overall[label]['exact_match']:.2f}[/bold]", f"[bold]{overall[label]['rougeL']:.2f}[/bold]"]
    table.add_row(*cells, end_section=True)
    return table


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(f"{c:.2f}" if isinstance(c, float) else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def results_markdown(title: str, rows: Sequence[dict], metrics: dict[str, float]) -> str:
    tasks = task_rows(rows, metrics)
    cats = category_rows(rows, metrics)
    parts = [f"# {title}\n", f"Overall: ROUGE-L **{metrics['rougeL']:.2f}**, exact match **{metrics['exact_match']:.2f}** "
             f"over {len(rows)} instances (SNI official scorer).\n", "## Per task\n",
             markdown_table(["task", "category", "n", "exact_match", "rougeL"],
                            [[r["task"], r["category"], r["n"], r["exact_match"], r["rougeL"]] for r in tasks]),
             "\n## Per category\n",
             markdown_table(["category", "n", "exact_match", "rougeL"],
                            [[r["category"], r["n"], r["exact_match"], r["rougeL"]] for r in cats])]
    return "".join(parts)


def jsonl(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def routing_table(report: Any) -> Table:
    """Each row's top skills and nearest training tasks by routing (``orchmoe inspect-routing``)."""
    view = report.view
    table = Table(title=f"{report.method} routing · {report.checkpoint}", title_justify="left")
    table.add_column(view.row_kind)
    if report.categories:
        table.add_column("category")
    if view.probs is not None:
        table.add_column("top skills (weight)")
    table.add_column("nearest training tasks (cosine)")
    for i in report.order:
        name = view.rows[i]
        held_out = "" if i in report.training_rows or view.row_kind != "task" else " (held out)"
        cells = [name + (" (adapted)" if name in report.adapted else held_out)]
        if report.categories:
            cells.append(report.categories.get(name, ""))
        if view.probs is not None:
            cells.append(", ".join(f"s{s} {w:.2f}" for s, w in report.top_skills(i)))
        cells.append(", ".join(f"{t} {c:.2f}" for t, c in report.nearest(i)))
        table.add_row(*cells)
    return table


def routing_summary(report: Any) -> list[str]:
    """The statistics as a few lines, warnings last."""
    lines = []
    if report.overall is not None:
        o = report.overall
        lines.append(f"all layers: discreteness {o.discreteness:.3f} (0 one skill per row, 1 uniform) · sparsity "
                     f"{o.sparsity:.3f} (share of allocations > 0.5) · skill usage {o.skill_usage:.3f} (1 even)")
    if report.classifier is not None:
        c = report.classifier
        lines.append(f"classifier: router entropy {c.router_entropy:.3f} (1 = uniform) · marginal usage "
                     f"{c.marginal_entropy:.3f} · mean max p {c.mean_max_probability:.3f} · abstract tasks used "
                     f"{c.used_abstract_tasks}/{len(c.argmax_counts)} by prompts, "
                     f"{report.abstract_tasks_preferred_by_tasks}/{len(c.argmax_counts)} by tasks · purity by "
                     f"category {c.purity:.3f} · NMI {c.nmi:.3f}")
    if report.coherence is not None:
        h = report.coherence
        lines.append(f"same-category tasks: mean routing similarity {h.within:+.3f} over {h.pairs_within} pairs, "
                     f"other pairs {h.between:+.3f} (permutation p = {h.p_value:.3f})")
    lines += [f"[yellow]warning:[/yellow] {w}" for w in report.warnings]
    return lines
