"""Rich tables for the terminal: a prepared dataset, an export,
evaluation results side by side, and a checkpoint's routing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.table import Table

if TYPE_CHECKING:  # prepare and eval print tables without importing torch through the routing report
    from orchmoe_cli.analysis.routing_report import RoutingReport


def prepared_table(title: str, manifest: dict[str, Any]) -> Table:
    """Tasks, instances, adaptation pool and categories of each split of a prepared dataset's manifest."""
    table = Table(title=title, title_justify="left")
    for column in ("split", "tasks", "instances", "adaptation pool", "categories"):
        table.add_column(column, justify="left" if column in ("split", "categories") else "right")
    for split in ("train", "test"):
        tasks = [t for t in manifest["tasks"] if t["split"] == split]
        cats = sorted({t["category"] for t in tasks})
        pool = f"{sum(t.get('n_pool', 0) for t in tasks)}" if split == "test" else ""
        table.add_row(split, str(len(tasks)), str(sum(t["n_instances"] for t in tasks)), pool,
                      f"{len(cats)}: " + ", ".join(cats[:4]) + (" ..." if len(cats) > 4 else ""))
    return table


def exported_table(title: str, manifest: dict[str, Any]) -> Table:
    """The adapters an export wrote: name, path, what routes to it and what it is exact for."""
    table = Table(title=title, title_justify="left")
    for column in ("adapter", "path", "routes", "exact for"):
        table.add_column(column)
    for entry in manifest["adapters"]:
        table.add_row(entry["name"], entry["path"], entry["routes"], entry["exact_for"])
    return table


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


def routing_table(report: RoutingReport) -> Table:
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


def routing_summary(report: RoutingReport) -> list[str]:
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
                     f"{report.abstract_tasks_preferred_by_tasks}/{len(c.argmax_counts)} by tasks · "
                     + (f"purity by category {c.purity:.3f} · NMI {c.nmi:.3f}" if c.purity is not None and
                        c.nmi is not None else "purity and NMI: none (the data names fewer than two categories)"))
    if report.coherence is not None:
        h = report.coherence
        lines.append(f"same-category tasks: mean routing similarity {h.within:+.3f} over {h.pairs_within} pairs, "
                     f"other pairs {h.between:+.3f} (permutation p = {h.p_value:.3f})")
    lines += [f"[yellow]warning:[/yellow] {w}" for w in report.warnings]
    return lines
