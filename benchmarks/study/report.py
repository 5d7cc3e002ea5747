"""`docs/results/study.md` from the study's result files: one table per setting with 95% paired-bootstrap
intervals, parameter counts and LoRA scales, the sample-efficiency plot, routing figures, wall-clock per
stage, the machine, the versions and the commands. Only what is on disk is reported; missing pieces are
listed as missing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from orchmoe_cli.analysis.adaptation_report import POOL_SHIFT, merge_results, plot, summarise
from orchmoe_cli.analysis.bootstrap import InstanceKey, paired_bootstrap
from orchmoe_cli.analysis.comparison import compare_runs, forest_plot
from orchmoe_cli.core.figures import pyplot
from orchmoe_cli.core.results import recorded_score_gap, text_sha256


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _checked_rows(stage_dir: Path, method: str, run: dict[str, Any]) -> list[dict[str, Any]]:
    """``<method>.predictions.jsonl``, read once and refused unless it is what ``<method>.json`` was computed from:
    the digest it records (when it has one) and the scores and instance count it records."""
    predictions, fix = stage_dir / f"{method}.predictions.jsonl", "restore the two files together or rerun that piece"
    text = predictions.read_text(encoding="utf-8")
    recorded = run.get("predictions_sha256")
    if recorded is not None and text_sha256(text) != recorded:
        raise SystemExit(f"{predictions}: changed since its evaluation (predictions_sha256 differs from "
                         f"{stage_dir / method}.json); restore it or rerun that piece")
    rows = [json.loads(line) for line in text.splitlines()]
    try:
        scores = {m: [float(row[m]) for row in rows] for m in ("rougeL", "exact_match")}
    except (KeyError, TypeError, ValueError):
        raise SystemExit(f"{predictions}: a row without a number for rougeL or exact_match; {fix}") from None
    gap = recorded_score_gap(run.get("results") or {}, scores)
    if gap is None and run.get("n_instances") != len(rows):
        gap = f"n_instances {run.get('n_instances')} is recorded, but there are {len(rows)} rows"
    if gap is not None:
        raise SystemExit(f"{stage_dir / method}.json: {gap} in {predictions.name}; {fix}")
    return rows


def _evaluation_table(results: Path, stage: str, reference: str, figures: Path | None = None) -> list[str]:
    """Each method's scores and its differences from the references, computed by `orchmoe compare`'s
    :func:`compare_runs` (which refuses runs scored on different instances); with ``figures``, also its forest
    plot of every method minus ``reference``, overall and per task."""
    runs = {p.stem: _read(p) for p in sorted((results / stage).glob("*.json"))}
    if not runs:
        return [f"_No {stage} results yet._"]
    rows = {method: _checked_rows(results / stage, method, run) for method, run in runs.items()}
    references = [r for r in (reference, "orchmoe", "base") if r in rows]
    comparisons = {r: compare_runs({r: rows[r], **{m: v for m, v in rows.items() if m != r}}) for r in references}
    overall = {r: {c.run: c for c in found.cells_for(found.overall)} for r, found in comparisons.items()}
    lines = ["| method | ROUGE-L | EM | " + " | ".join(f"minus {r} [95% CI]" for r in references) + " | instances |",
             "|---|---:|---:|" + "---:|" * len(references) + "---:|"]
    for method, run in sorted(runs.items(), key=lambda kv: -kv[1]["results"]["rougeL"]):
        versus = [str(overall[r][method].differences["rougeL"]) if method != r else "" for r in references]
        lines.append(f"| {method} | {run['results']['rougeL']:.2f} | {run['results']['exact_match']:.2f} | "
                     + " | ".join(versus) + f" | {run['n_instances']} |")
    if figures is not None and reference in comparisons and len(rows) > 1:
        figures.mkdir(parents=True, exist_ok=True)
        plot = forest_plot(comparisons[reference], figures / f"{stage}-minus-{reference}.png")
        lines += ["", f"![{stage} minus {reference}]({figures.name}/{plot.name})"]
    return lines


def _per_seed_mean(rows: list[dict], mode: str, k: int) -> dict[InstanceKey, float]:
    """(task, id) -> ROUGE-L (points) averaged over the seeds of (mode, k) (``scores`` as ``read_results`` keys
    them)."""
    pooled: dict[InstanceKey, list[float]] = defaultdict(list)
    for row in rows:
        if row["mode"] == mode and row["shots"] == k:
            for instance, value in row["scores"].items():
                pooled[instance].append(100 * value)
    return {i: statistics.fmean(v) for i, v in pooled.items()}


def _adaptation_section(results: Path, figures: Path) -> list[str]:
    paths = sorted((results / "adapt").glob("*/adapt_results.jsonl"))
    if not paths:
        return ["_No adaptation results yet._"]
    rows = merge_results(paths)
    summary = summarise(rows)
    common = set(summary["overall_tasks"])
    rows = [r for r in rows if r["task"] in common]
    references = ("lora_scratch", "orchmoe")
    lines = [f"Tasks (one per category, the largest adaptation pool): {', '.join(sorted(common))}.", "",
             "| mode | k | ROUGE-L (mean ± std over seeds) | seeds | "
             + " | ".join(f"minus {r} at the same k [95% CI]" for r in references) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(references)]
    ran = {(r["mode"], r["shots"]) for r in rows}
    for column in sorted(summary["overall"].values(), key=lambda c: (c["shots"], c["mode"])):
        mode, k = column["mode"], column["shots"]
        versus = [str(paired_bootstrap(_per_seed_mean(rows, mode, k), _per_seed_mean(rows, other, k)))
                  if k > 0 and mode != other and (other, k) in ran else "" for other in references]
        lines.append(f"| {mode} | {k} | {column['mean']:.2f} ± {column['std']:.2f} | {column['seeds']} | "
                     + " | ".join(versus) + " |")
    figures.mkdir(parents=True, exist_ok=True)
    plot(summary, figures / "sample_efficiency.png")
    trainable = ", ".join(f"{mode} {n:,}" for mode, n in sorted(summary["trainable"].items()) if n)
    return [*lines, "", f"Trainable parameters per mode: {trainable}.", "",
            f"![sample efficiency]({figures.name}/sample_efficiency.png)", "", *_per_task(summary, results)]


def _per_task(summary: dict[str, Any], results: Path) -> list[str]:
    """Each task's scores (mean over seeds) beside how unlike its evaluation set its adaptation pool is: a row per
    (task, k) with every zero-shot column (one per checkpoint) and every adapted mode at that k."""
    shifts_file = results / "adapt" / POOL_SHIFT
    shifts = _read(shifts_file) if shifts_file.is_file() else {}
    zero = sorted({c["mode"] for c in summary["columns"] if c["shots"] == 0})
    modes = sorted({c["mode"] for c in summary["columns"] if c["shots"] > 0})
    shots = sorted({c["shots"] for c in summary["columns"] if c["shots"] > 0})
    lines = ["### Per task", "", ("ROUGE-L, mean over seeds. Pool mismatch: max(|top-answer share pool - evaluation|, "
             "|log of the mean answer lengths' ratio|), `unlike` from 0.1 on (`orchmoe_cli/analysis/pool_shift.py`)."),
             "", "| task | pool mismatch | k | " + " | ".join([*zero, *modes]) + " |",
             "|---|---:|---:|" + "---:|" * (len(zero) + len(modes))]

    def cell(cells: dict[str, Any], key: str) -> str:
        return f"{cells[key]['mean']:.2f}" if key in cells else ""

    for task, cells in sorted(summary["by_task"].items()):
        shift = shifts.get(task)
        shown = "" if shift is None else f"{shift['mismatch']:.2f}" + (" unlike" if shift["shifted"] else "")
        for k in shots:
            values = [cell(cells, f"{m}@0") for m in zero] + [cell(cells, f"{m}@{k}") for m in modes]
            lines.append(f"| {task} | {shown} | {k} | " + " | ".join(values) + " |")
    return lines


def _training_table(results: Path) -> list[str]:
    runs = {p.stem: _read(p) for p in sorted((results / "train").glob("*.json"))}
    lines = ["| method | trainable (adapters / routers / hypernetwork) | rank | LoRA scale alpha/r | train s |",
             "|---|---:|---:|---:|---:|"]
    for method, run in runs.items():
        p = run["parameters"]
        lines.append(f"| {method} | {p['total_trainable']:,} ({p['adapters']:,} / {p['routers']:,} / "
                     f"{p['hypernetwork']:,}) | {run['rank']} | {run['lora_scale']:g} | {run['wall_s']:.0f} |")
    return lines if runs else ["_No training results yet._"]


def _wall_clock(results: Path) -> list[str]:
    """Recorded wall-clock per method and stage (minutes), with the total: a piece's method is its file or sweep
    name up to ``@`` (an earlier checkpoint) or ``-`` (``lora-one-seed``)."""
    minutes: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for path in results.glob("*/*.json"):
        if path.parent.name != "adapt":
            minutes[path.stem.split("@")[0]][path.parent.name] += _read(path).get("wall_s", 0.0) / 60
    for path in results.glob("adapt/*/done.json"):
        minutes[path.parent.name.split("-")[0]]["adapt"] += _read(path)["wall_s"] / 60
    if not minutes:
        return ["_No pieces finished yet._"]
    stages = [s for s in ("train", "zero-shot", "in-distribution", "routing", "adapt")
              if any(s in row for row in minutes.values())]
    lines = ["| method | " + " | ".join(f"{s} min" for s in stages) + " | total min |",
             "|---|" + "---:|" * (len(stages) + 1)]
    for method, row in sorted(minutes.items()):
        lines.append(f"| {method} | " + " | ".join(f"{row[s]:.1f}" if s in row else "" for s in stages)
                     + f" | {sum(row.values()):.1f} |")
    total = sum(sum(row.values()) for row in minutes.values())
    lines += ["", f"Total recorded wall-clock: {total / 60:.1f} hours on the machine below."]
    return lines


def _routing_figures(results: Path, runs: Path, repo: Path, figures: Path) -> list[str]:
    lines = []
    for method in ("mhr", "orchmoe"):
        run = runs / method
        out = figures / f"routing-{method}"
        trained = (results / "train" / f"{method}.json").is_file() and run.is_dir()
        if trained and not (out / "heatmap.png").is_file():
            where = os.path.relpath(run, repo)  # routing.json names the checkpoint as given: no machine's path
            data = ["--data", os.path.join(where, "recipe.yaml")] if method == "orchmoe" else []
            subprocess.run([sys.executable, "-m", "orchmoe_cli", "inspect-routing", where, *data, "--out",
                            str(out)], cwd=repo, check=True, capture_output=True)
        if (out / "heatmap.png").is_file():
            lines.append(f"![{method} routing]({figures.name}/{out.name}/heatmap.png)")
    return lines or ["_No routing figures yet (they need the trained mhr and orchmoe checkpoints)._"]


ROUTING_COLUMNS = {"discreteness": ("overall", "discreteness"), "sparsity": ("overall", "sparsity"),
                   "skill usage": ("overall", "skill_usage"), "router entropy": ("classifier", "router_entropy"),
                   "marginal entropy": ("classifier", "marginal_entropy"),
                   "abstract tasks used": ("classifier", "used_abstract_tasks"), "purity": ("classifier", "purity"),
                   "NMI": ("classifier", "nmi"), "same-category cosine": ("category_coherence", "within"),
                   "other-category cosine": ("category_coherence", "between"),
                   "p (categories)": ("category_coherence", "p_value")}


def _routing_along_training(results: Path, figures: Path) -> list[str]:
    """`inspect-routing` statistics at each kept checkpoint (results/routing/<method>@<step>.json): a table and a
    plot of how far allocations leave uniform (discreteness 1) as training goes on."""
    found = [_read(p) for p in results.glob("routing/*.json")]
    if not found:
        return []
    found.sort(key=lambda r: (r["method"], r["step"]))
    lines = ["| method | step | " + " | ".join(ROUTING_COLUMNS) + " |", "|---|---:|" + "---:|" * len(ROUTING_COLUMNS)]
    for record in found:
        cells = []
        for part, key in ROUTING_COLUMNS.values():
            value = (record.get(part) or {}).get(key)
            digits = 4 if key == "p_value" else 3  # a permutation p-value's floor is 1/2001
            cells.append("" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value))
        lines.append(f"| {record['method']} | {record['step']} | " + " | ".join(cells) + " |")
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for method in sorted({r["method"] for r in found}):
        mine = [r for r in found if r["method"] == method]
        axes[0].plot([r["step"] for r in mine], [r["overall"]["discreteness"] for r in mine], marker="o", label=method)
        if mine[0].get("classifier"):
            axes[1].plot([r["step"] for r in mine], [r["classifier"]["router_entropy"] for r in mine], marker="o",
                         label=f"{method} H(t|x)")
            axes[1].plot([r["step"] for r in mine], [r["classifier"]["marginal_entropy"] for r in mine], marker="s",
                         label=f"{method} H(t)")
    axes[0].set(xlabel="training step", ylabel="discreteness (1 = uniform)", title="skill allocations")
    axes[1].set(xlabel="training step", ylabel="entropy (nats)", title="task classifier")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    figures.mkdir(parents=True, exist_ok=True)
    fig.savefig(figures / "routing_along_training.png", dpi=120)
    plt.close(fig)
    return ["## Routing along training", "", "`orchmoe inspect-routing` on the checkpoints kept at each step "
            "(discreteness: 0 one skill per row, 1 uniform; sparsity: share of allocations above 0.5; skill usage: 1 "
            "even; the classifier columns are OrchMoE's, over every real task's first prompts; the category columns "
            "are the mean centred cosine between the routing of two tasks of one SNI category and of two categories, "
            "and the permutation p-value of the first being that high by chance).", "", *lines, "",
            f"![routing along training]({figures.name}/routing_along_training.png)", ""]


def _validation_curves(results: Path, figures: Path) -> list[str]:
    """Validation loss on the held-back rows at each evaluation step of every run that recorded it."""
    runs = {p.stem: _read(p).get("validation_loss") for p in sorted(results.glob("train/*.json"))}
    runs = {m: v for m, v in runs.items() if v and len(v) > 1}
    if not runs:
        return []
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for method, curve in runs.items():
        ax.plot(*zip(*curve), marker="o", markersize=3, label=method)
    ax.set(xlabel="training step", ylabel="validation loss", title="held-back rows of the training tasks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    figures.mkdir(parents=True, exist_ok=True)
    fig.savefig(figures / "validation_loss.png", dpi=120)
    plt.close(fig)
    steps = sorted({step for curve in runs.values() for step, _ in curve})
    shown = [s for s in steps if s in (steps[0], steps[len(steps) // 3], steps[-1])] or steps
    lines = ["| method | " + " | ".join(f"step {s}" for s in shown) + " | lowest (step) |",
             "|---|" + "---:|" * (len(shown) + 1)]
    for method, curve in runs.items():
        at = dict(curve)
        best = min(curve, key=lambda point: point[1])
        lines.append(f"| {method} | " + " | ".join(f"{at[s]:.4f}" if s in at else "" for s in shown)
                     + f" | {best[1]:.4f} ({best[0]}) |")
    return ["## Validation loss along training", "", *lines, "", f"![validation loss]({figures.name}/validation_loss.png)",
            ""]


def _reading(results: Path) -> list[str]:
    """The hand-written reading of these numbers (`reading.md` beside the result files), when there is one:
    kept with the results it reads, so regenerating the tables keeps it."""
    path = results / "reading.md"
    return ["## Reading", "", path.read_text(encoding="utf-8").strip(), ""] if path.is_file() else []


def _machine() -> str:
    """CPU model and core count (Linux reads /proc/cpuinfo), and the GPU when torch sees one."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu} ({os.cpu_count()} cores){gpu}, {platform.system()}"


def write_report(results: Path, scale: str, runs: Path, repo: Path, commands: list[str], missing: list[str],
                 report: Path | None = None, left_out: str = "") -> Path:
    import torch
    import transformers

    report = report or repo / "docs" / "results" / ("study.md" if scale == "cpu" else f"study-{scale}.md")
    figures = report.parent / report.stem
    lines = [f"# Comparison study ({scale} scale)", "",
             "Generated by `python benchmarks/study/run.py --scale " + scale + "` from the result files in "
             f"`benchmarks/study/results/{scale}/` (recipe `benchmarks/study/{scale}.yaml`). ROUGE-L is the SNI "
             "official scorer; every interval is a 95% paired bootstrap over evaluation instances. The per-sample "
             "predictions behind every number are beside the results: `<stage>/<method>.predictions.jsonl`, and "
             "`adapt/<checkpoint>/predictions/<cell>.jsonl` per few-shot cell.", "",
             *([f"**Incomplete**: no results yet for {', '.join(missing)}; rerun the command to add them.", ""]
               if missing else []),
             "## Trained checkpoints (one budget, one LoRA scale)", "", *_training_table(results), "",
             *([left_out, ""] if left_out else []),
             "## Zero-shot on the held-out tasks (no task id)", "",
             ("Poly and MHR route an unseen task with the average of the training tasks' routing; HyperLoader "
             "uses the mean task embedding; OrchMoE infers its routing from the prompt."), "",
             *_evaluation_table(results, "zero-shot", "lora", figures), "",
             "## In-distribution: held-back instances of the training tasks", "",
             *_evaluation_table(results, "in-distribution", "lora", figures), "",
             "## Few-shot adaptation", "", *_adaptation_section(results, figures), "",
             *_reading(results),
             *_validation_curves(results, figures), *_routing_along_training(results, figures),
             "## Routing", "", *_routing_figures(results, runs, repo, figures), "",
             "## Cost", "", *_wall_clock(results), "",
             (f"Machine: {_machine()}; Python {platform.python_version()}, torch {torch.__version__}, "
             f"transformers {transformers.__version__}."), "",
             "## Commands", "", "What the driver ran, piece by piece (`ORCHMOE_SNI_DIR` set to the data):", "",
             "```bash", *commands, "```"]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report
