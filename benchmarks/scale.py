"""Wall time and peak memory of `orchmoe prepare` / `orchmoe train` on a full-size synthetic SNI corpus.

The corpus has the English SNI split sizes (756 training and 119 test tasks, 100 instances each) and
realistic text lengths, so it shows how the data path scales before anyone downloads the real thing.
Each phase runs in its own subprocess, reaped with ``os.wait4``, so its peak RSS is its own. The full
corpus is compared with its first quarter of tasks; the model is tiny-llama, so data handling dominates.

``--format table`` does the same for a multi-task table (``data.source`` a JSONL file, read by
``orchmoe_cli/data/tables.py``): 1,000 tasks x 1,000 rows of short text (one row per instance: task, a
~20-word input, a ~3-word output, the task's instruction on every row, one of 20 categories, and a split
column holding out every tenth task), compared with a quarter of the tasks (250 x 1,000) and a quarter of the
rows (1,000 x 250), with the recipe defaults that matter (``max_train_instances: 100``,
``max_test_instances: 100``, ``max_pool_instances: 300``). A "tiny" table (8 tasks x 20 rows) is prepared
too: its peak RSS is the fixed cost (interpreter, imports, tokenizer) that the growth is measured above. Train
is stopped once its first step is logged (``--whole-train`` lets it finish: validation and a checkpoint).

    python benchmarks/scale.py                      # full size (minutes)
    python benchmarks/scale.py --tasks-scale 0.05   # a 5% corpus, for a quick check of the script
    python benchmarks/scale.py --format table       # 1M-row JSONL table (writes results/scale-table.json)
    python benchmarks/scale.py --format table --tasks-scale 0.05 --rows-per-task 100   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

N_TRAIN, N_TEST, PER_TASK = 756, 119, 100
CATEGORIES = [
    "Question Answering", "Question Generation", "Sentiment Analysis", "Text Categorization", "Title Generation",
    "Summarization", "Program Execution", "Wrong Candidate Generation", "Text Matching", "Fill in The Blank",
    "Commonsense Classification", "Information Extraction", "Toxic Language Detection", "Textual Entailment",
    "Text Completion", "Coreference Resolution", "Dialogue Generation", "Named Entity Recognition", "Paraphrasing",
    "Answer Verification", "Data to Text", "Grammar Error Detection", "Keyword Tagging", "Story Composition",
    "Word Semantics", "Cause Effect Classification", "Text Quality Evaluation", "Sentence Ordering",
    "Answerability Classification", "Pos Tagging", "Question Rewriting", "Mathematics", "Stance Detection",
    "Spelling Error Detection", "Misc.",
]
COMMON = ("the of and to a in is that for it as with was on be by this are or from at an not which you "
          "but have one all will each if can has given task sentence answer question text output input")
CHILD_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
CLI = [sys.executable, "-m", "orchmoe_cli"]
MODEL_BYTES = ("import json, sys; from orchmoe_cli.recipe import load_recipe; from orchmoe_cli.core.base_models import "
               "load_model; m = load_model(load_recipe(sys.argv[1]).model).model; "
               "print(json.dumps(sum(p.numel() * p.element_size() for p in m.parameters())))")


class Words:
    """Zipf-distributed pseudo-English: realistic byte and token lengths without shipping any text."""

    def __init__(self, rng: random.Random, size: int = 4000) -> None:
        syllables = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
        invented = {"".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(size)}
        self.vocab = COMMON.split() + sorted(invented)
        weights, total = [1 / (rank + 1) for rank in range(len(self.vocab))], 0.0
        self.cumulative = [total := total + w for w in weights]
        self.rng = rng

    def text(self, low: int, high: int, mode: int | None = None) -> str:
        """``low``..``high`` words (triangular around ``mode`` if given) in sentences of 6-20 words."""
        n = self.rng.randint(low, high) if mode is None else round(self.rng.triangular(low, high, mode))
        words = self.rng.choices(self.vocab, cum_weights=self.cumulative, k=n)
        sentences, i = [], 0
        while i < len(words):
            n = self.rng.randint(6, 20)
            sentences.append(" ".join(words[i:i + n]).capitalize() + ".")
            i += n
        return " ".join(sentences)


def make_task(name: str, category: str, words: Words) -> dict[str, Any]:
    """One task in the upstream schema: 60-120-word definition (mean 80; SNI ~70), 50-150-word inputs,
    1-20-word outputs, 2-3 positive and 2 negative examples."""
    rng = words.rng

    def example() -> dict[str, str]:
        return {"input": words.text(50, 150), "output": words.text(1, 20), "explanation": words.text(10, 30)}

    return {
        "Contributors": ["scale benchmark"], "Source": ["synthetic"], "URL": ["https://example.org"],
        "Categories": [category], "Reasoning": [], "Definition": [words.text(60, 120, mode=60)],
        "Input_language": ["English"], "Output_language": ["English"], "Instruction_language": ["English"],
        "Domains": ["Synthetic"],
        "Positive Examples": [example() for _ in range(rng.randint(2, 3))],
        "Negative Examples": [example() for _ in range(2)],
        "Instances": [{"id": f"{name}-{i}", "input": words.text(50, 150),
                       "output": [words.text(1, 20) for _ in range(rng.choice((1, 1, 1, 2)))]}
                      for i in range(PER_TASK)],
        "Instance License": ["Apache 2.0"],
    }


def quarter_of(n: int) -> int:
    """How many tasks of an n-task split the quarter-size run keeps (the first ones)."""
    return max(1, round(n / 4))


def generate(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """Task files in ``root/tasks`` and split files (full and first quarter) next to them; skipped if present."""
    marker = root / "corpus.json"
    spec = {"train": n_train, "test": n_test, "per_task": PER_TASK, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return
    rng = random.Random(seed)
    words, names = Words(rng), []
    (root / "tasks").mkdir(parents=True, exist_ok=True)
    numbers = rng.sample(range(1, 10 * (n_train + n_test)), n_train + n_test)
    for number in numbers:
        category = rng.choice(CATEGORIES)
        slug = category.lower().replace(" ", "_").replace(".", "")
        names.append(name := f"task{number:04d}_{rng.choice(words.vocab[60:600])}_{slug}")
        (root / "tasks" / f"{name}.json").write_text(json.dumps(make_task(name, category, words), indent=4))
    for split, listed in (("train", names[:n_train]), ("test", names[n_train:])):
        (root / f"{split}_tasks.txt").write_text("\n".join(listed) + "\n")
        (root / f"{split}_tasks_quarter.txt").write_text("\n".join(listed[: quarter_of(len(listed))]) + "\n")
    marker.write_text(json.dumps(spec))


def write_recipe(path: Path, corpus: Path, work: Path, quarter: bool, val_instances: int) -> None:
    suffix = "_quarter" if quarter else ""
    recipe = {
        "data": {"source": str(corpus), "train_split": f"train_tasks{suffix}.txt",
                 "test_split": f"test_tasks{suffix}.txt", "num_pos_examples": 2, "max_source_length": 1024,
                 "max_target_length": 128, "max_train_instances": PER_TASK, "max_test_instances": PER_TASK,
                 "cache_dir": str(work / "cache")},
        "model": {"name": "tiny-llama"},
        "method": {"name": "orchmoe", "n_skills": 8, "n_abstract_tasks": 16},
        "train": {"steps": 2, "batch_size": 8, "log_every": 1, "val_instances": val_instances},
        "output": {"dir": str(work / "run")},
    }
    part = "the first quarter of " if quarter else ""
    header = (f"# benchmarks/scale.py: the recipes/sni settings on tiny-llama, {part}the synthetic corpus."
              "\n#\n#   orchmoe prepare THIS && orchmoe train THIS train.steps=2\n")
    path.write_text(header + yaml.safe_dump(recipe, sort_keys=False))


def run_phase(argv: list[str], log: Path, timeout: float, metrics: Path | None = None,
              stop_at_first_step: bool = False) -> dict[str, Any]:
    """Run one child to the end (or kill it at ``timeout``, or after its first step if asked): wall s, its own
    peak RSS, first-step time."""
    started = time.perf_counter()
    first_step = None
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=CHILD_ENV)
        timed_out = stopped = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            now = time.perf_counter() - started
            if first_step is None and metrics is not None and metrics.is_file() and metrics.stat().st_size:
                first_step = now  # train.log_every=1: the first row is written right after the first step
            if pid:
                break
            if now > timeout and not timed_out:
                proc.kill()
                timed_out = True
            if stop_at_first_step and first_step is not None and not stopped:
                proc.kill()
                stopped = True
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    if stopped and not timed_out:
        state = "ok" if proc.returncode in (0, -9) else f"exit {proc.returncode}"
    else:
        state = "timed out" if timed_out else ("ok" if proc.returncode == 0 else f"exit {proc.returncode}")
    return {"wall_s": round(now, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: kB
            "first_step_s": None if first_step is None else round(first_step, 2), "status": state}


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


# --------------------------------------------------------------------------- --format table

TABLE_TASKS, TABLE_ROWS = 1000, 1000
TABLE_CATEGORIES = CATEGORIES[:20]
TABLE_LIMITS = {"max_train_instances": 100, "max_test_instances": 100, "max_pool_instances": 300}
TINY_TASKS, TINY_ROWS = 8, 20
RSS_LIMIT_MB = 2048


def quarter_rows(n: int) -> int:
    return max(1, round(n / 4))


def table_sizes(n_tasks: int, n_rows: int, quarter: str) -> dict[str, tuple[int, int]]:
    """size name -> (tasks, rows per task) of each table the run prepares, smallest first (so a full size that
    runs into --timeout comes last)."""
    sizes = {"tiny": (TINY_TASKS, TINY_ROWS)}
    if quarter in ("tasks", "both"):
        sizes["quarter-tasks"] = (quarter_of(n_tasks), n_rows)
    if quarter in ("rows", "both"):
        sizes["quarter-rows"] = (n_tasks, quarter_rows(n_rows))
    sizes["full"] = (n_tasks, n_rows)
    return sizes


def generate_table(root: Path, n_tasks: int, n_rows: int, seed: int = 0) -> dict[str, Path]:
    """JSONL tables in ``root``, one row per instance, rows of a task together (table order = task order):
    full (n_tasks x n_rows), quarter-tasks (its first quarter of tasks), quarter-rows (every task's first
    quarter of rows) and tiny (7 training tasks and 1 held-out task, 20 rows each). One task in every block of
    ten is held out (split "test"), so every prefix of whole blocks holds out 10%. Skipped if present."""
    paths = {name: root / f"{name}.jsonl" for name in ("full", "quarter-tasks", "quarter-rows", "tiny")}
    marker = root / "table.json"
    spec = {"tasks": n_tasks, "rows_per_task": n_rows, "seed": seed, "version": 1}
    if marker.is_file() and json.loads(marker.read_text()) == spec and all(p.is_file() for p in paths.values()):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    words = Words(rng)
    held = {block + rng.randrange(min(10, n_tasks - block)) for block in range(0, n_tasks, 10)}
    tiny = set([i for i in range(n_tasks) if i not in held][: TINY_TASKS - 1] + [min(held)])
    n_quarter_tasks, n_quarter_rows = quarter_of(n_tasks), quarter_rows(n_rows)
    handles = {name: path.open("w", encoding="utf-8", buffering=1 << 20) for name, path in paths.items()}
    try:
        for index in range(n_tasks):
            category = rng.choice(TABLE_CATEGORIES)
            slug = category.lower().replace(" ", "_").replace(".", "")
            name = f"task{index:04d}_{rng.choice(words.vocab[60:600])}_{slug}"
            head = {"task": name, "instruction": words.text(20, 50, mode=30), "category": category,
                    "split": "test" if index in held else "train"}
            for row in range(n_rows):
                line = json.dumps({**head, "input": words.text(15, 25), "output": words.text(1, 5)},
                                  ensure_ascii=False) + "\n"
                handles["full"].write(line)
                if index < n_quarter_tasks:
                    handles["quarter-tasks"].write(line)
                if row < n_quarter_rows:
                    handles["quarter-rows"].write(line)
                if index in tiny and row < TINY_ROWS:
                    handles["tiny"].write(line)
    finally:
        for handle in handles.values():
            handle.close()
    marker.write_text(json.dumps(spec))
    return paths


def write_table_recipe(path: Path, table: Path, work: Path, val_instances: int) -> None:
    recipe = {
        "data": {"source": str(table), "format": "table", "num_pos_examples": 0, "max_source_length": 1024,
                 "max_target_length": 128, **TABLE_LIMITS, "cache_dir": str(work / "cache")},
        "model": {"name": "tiny-llama"},
        "method": {"name": "orchmoe", "n_skills": 8, "n_abstract_tasks": 16},
        "train": {"steps": 2, "batch_size": 8, "log_every": 1, "val_instances": val_instances},
        "output": {"dir": str(work / "run")},
    }
    header = (f"# benchmarks/scale.py --format table: {table.name} on tiny-llama, the recipe defaults for the "
              "instance caps.\n#\n#   orchmoe prepare THIS && orchmoe train THIS train.steps=2\n")
    path.write_text(header + yaml.safe_dump(recipe, sort_keys=False))


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def encoded_totals(work: Path) -> dict[str, int]:
    """The prepared manifest's instance counts (what was encoded), if prepare finished."""
    for manifest in sorted((work / "cache").glob("*/manifest.json")):
        totals = json.loads(manifest.read_text())["totals"]
        return {k: totals[k] for k in ("train_tasks", "test_tasks", "train_instances", "test_instances",
                                       "pool_instances")}
    return {}


def main_table(args: argparse.Namespace, console: Console, root: Path) -> None:
    n_tasks = max(10, round(TABLE_TASKS * args.tasks_scale))
    n_rows = args.rows_per_task
    started = time.perf_counter()
    tables = generate_table(root / "table", n_tasks, n_rows)
    elapsed = time.perf_counter() - started
    size_mb = tables["full"].stat().st_size / 2**20
    console.print(f"table: {n_tasks} tasks x {n_rows} rows in {tables['full']} ({size_mb:.0f} MB, {elapsed:.0f} s)")
    rows: list[dict[str, Any]] = []
    load_start = load_average()
    console.print(f"load average at start: {load_start}")
    for size, (tasks, per_task) in table_sizes(n_tasks, n_rows, args.quarter).items():
        work = root / size
        shutil.rmtree(work, ignore_errors=True)  # a fresh cache (prepared data and the datasets JSON cache)
        work.mkdir(parents=True)
        recipe = work / "recipe.yaml"
        write_table_recipe(recipe, tables[size], work, args.val_instances)
        phases = {"prepare": (CLI + ["prepare", str(recipe)], None)}
        if size != "tiny" and not args.no_train:
            phases["train"] = (CLI + ["train", str(recipe), "train.steps=2", "model.name=tiny-llama"],
                               work / "run" / "metrics.jsonl")
        for phase, (argv, metrics) in phases.items():
            if phase == "train" and rows[-1]["status"] != "ok":  # train would prepare again, from scratch
                rows.append({"size": size, "tasks": tasks, "rows_per_task": per_task, "rows": tasks * per_task,
                             "phase": phase, "wall_s": None, "peak_rss_mb": None, "first_step_s": None,
                             "status": "skipped (prepare did not finish)", "load_before": load_average(),
                             "load_after": load_average()})
                continue
            console.print(f"[bold]{size}[/bold] {phase} ({tasks} x {per_task}) ...")
            before = load_average()
            result = run_phase(argv, work / f"{phase}.log", args.timeout, metrics,
                               stop_at_first_step=not args.whole_train)
            if phase == "train" and not args.whole_train:
                result["stopped_after_first_step"] = True
            row = {"size": size, "tasks": tasks, "rows_per_task": per_task, "rows": tasks * per_task,
                   "phase": phase, **result, "load_before": before, "load_after": load_average()}
            if phase == "prepare":
                row["encoded"] = encoded_totals(work)
            rows.append(row)
            args.out.parent.mkdir(parents=True, exist_ok=True)  # so far, in case the run is cut short
            args.out.write_text(json.dumps({"partial": True, "command": " ".join(["python", *sys.argv]),
                                            "load_average_start": load_start, "results": rows}, indent=2) + "\n")
            console.print(f"  {result['status']}: {result['wall_s']} s, peak RSS {result['peak_rss_mb']} MB"
                          + (f", first step {result['first_step_s']} s" if result["first_step_s"] else ""),
                          highlight=False)
            if result["status"] != "ok":
                for line in (work / f"{phase}.log").read_text(errors="replace").splitlines()[-5:]:
                    console.print("  " + line, markup=False, highlight=False)
    load_end = load_average()
    console.print(f"load average at end: {load_end}")
    report_table(console, rows, args, n_tasks, n_rows, size_mb, load_start, load_end)


def report_table(console: Console, rows: list[dict[str, Any]], args: argparse.Namespace, n_tasks: int, n_rows: int,
                 size_mb: float, load_start: list[float], load_end: list[float]) -> None:
    by = {(r["size"], r["phase"]): r for r in rows}
    table = Table(title=f"orchmoe scale, JSONL table: {n_tasks} tasks x {n_rows} rows, tiny-llama")
    for column in ("size", "tasks", "rows", "phase", "status", "wall s", "peak RSS MB", "1st step s",
                   "full/this wall", "full/this RSS", "load before/after"):
        table.add_column(column, justify="left" if column in ("size", "phase", "status") else "right")
    for r in rows:
        full = by.get(("full", r["phase"])) if r["size"] != "full" else None
        done = full is not None and full["status"] == "ok" and r["status"] == "ok"
        table.add_row(r["size"], str(r["tasks"]), f"{r['rows']:,}", r["phase"], r["status"], fmt(r["wall_s"]),
                      fmt(r["peak_rss_mb"]), fmt(r["first_step_s"]),
                      fmt(full["wall_s"] / r["wall_s"], ".2f") if done else "",
                      fmt(full["peak_rss_mb"] / r["peak_rss_mb"], ".2f") if done else "",
                      f"{r['load_before'][0]:.2f} / {r['load_after'][0]:.2f}")
    Console(width=None if sys.stdout.isatty() else 170).print(table)  # a wider table than the sni one
    prep, train, tiny = by.get(("full", "prepare")), by.get(("full", "train")), by.get(("tiny", "prepare"))
    full_peak = max(r["peak_rss_mb"] or 0.0 for r in rows if r["size"] == "full")
    targets = [
        {"target": f"prepare, full table ({n_tasks * n_rows:,} rows) < 120 s", "value": prep["wall_s"],
         "pass": prep["status"] == "ok" and prep["wall_s"] < 120},
        {"target": f"peak RSS, full table (prepare and train) < {RSS_LIMIT_MB} MB", "value": full_peak,
         "pass": all(r["status"] == "ok" for r in rows if r["size"] == "full") and full_peak < RSS_LIMIT_MB},
    ]
    unfinished = [f"{r['phase']} {r['status']}" for r in rows if r["size"] == "full" and r["status"] != "ok"]
    if unfinished:
        targets[1]["note"] = f"the peak until it stopped ({', '.join(unfinished)})"
    for size in ("quarter-tasks", "quarter-rows"):
        quarter = by.get((size, "prepare"))
        if quarter is None or quarter["status"] != "ok" or prep["status"] != "ok":
            if quarter is not None:
                targets.append({"target": f"prepare peak RSS grows sub-linearly, full vs {size}", "value": None,
                                "pass": False, "note": "not measured: a prepare did not finish"})
            continue
        growth = prep["rows"] / quarter["rows"]
        ratio = prep["peak_rss_mb"] / quarter["peak_rss_mb"]
        above = (prep["peak_rss_mb"] - tiny["peak_rss_mb"]) / max(quarter["peak_rss_mb"] - tiny["peak_rss_mb"], 1e-9)
        targets.append({"target": f"prepare peak RSS grows sub-linearly, full vs {size} ({growth:.0f}x the rows): "
                                  f"above the tiny table's {tiny['peak_rss_mb']:.0f} MB", "value": round(above, 2),
                        "raw_ratio": round(ratio, 2), "limit": round(growth, 2), "pass": above < growth})
    if train is not None:
        targets.append({"target": "train, full table: first optimizer step < 30 s after launch",
                        "value": train["first_step_s"],
                        "pass": train["first_step_s"] is not None and train["first_step_s"] < 30})
    for t in targets:
        mark = "[green]pass[/green]" if t["pass"] else "[red]FAIL[/red]"
        extra = "".join(f" ({k.replace('_', ' ')} {t[k]})" for k in ("raw_ratio", "limit", "note") if k in t)
        console.print(f"{mark}  {t['target']}: {t['value']}{extra}", highlight=False)
    console.print(f"load average (1, 5, 15 min) at start {load_start}, at end {load_end}, on {os.cpu_count()} CPUs")
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", *sys.argv]), "format": "table",
            "machine": platform.processor() or platform.machine(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": version("torch"), "datasets": version("datasets"),
            "tasks": n_tasks, "rows_per_task": n_rows, "held_out_tasks": len(range(0, n_tasks, 10)),
            "categories": len(TABLE_CATEGORIES), "table_mb": round(size_mb, 1), **TABLE_LIMITS,
            "model": "tiny-llama (byte-level tokenizer)", "val_instances": args.val_instances,
            "timeout_s": args.timeout, "load_average_start": load_start, "load_average_end": load_end}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows, "targets": targets}, indent=2) + "\n")
    console.print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks-scale", type=float, default=1.0, metavar="S",
                        help="shrink both splits by this factor (e.g. 0.05 for a quick check); 1 = the full SNI sizes")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="work in DIR and keep it (reuses its corpus)")
    parser.add_argument("--timeout", type=float, metavar="S",
                        help="kill a phase after S seconds (default 300; --format table: 900)")
    parser.add_argument("--val-instances", type=int, default=5, metavar="N", help="train.val_instances (sni: 5)")
    parser.add_argument("--out", type=Path, help="JSON results file (default benchmarks/results/scale.json; "
                        "--format table: benchmarks/results/scale-table.json)")
    parser.add_argument("--format", choices=("sni", "table"), default="sni",
                        help="sni: SNI task files (the default); table: one JSONL table, 1,000 tasks x 1,000 rows")
    parser.add_argument("--rows-per-task", type=int, default=TABLE_ROWS, metavar="N",
                        help=f"--format table: rows per task (default {TABLE_ROWS}); --tasks-scale scales the "
                        f"{TABLE_TASKS} tasks")
    parser.add_argument("--quarter", choices=("tasks", "rows", "both"), default="both",
                        help="--format table: the quarter-size run(s): a quarter of the tasks, of each task's rows, "
                        "or both")
    parser.add_argument("--no-train", action="store_true", help="--format table: prepare only")
    parser.add_argument("--whole-train", action="store_true",
                        help="--format table: let train finish (2 steps, then validation over every training task "
                        "and a checkpoint: minutes) instead of stopping it after its first step")
    args = parser.parse_args()
    table_mode = args.format == "table"
    if args.timeout is None:
        args.timeout = 900 if table_mode else 300
    if args.out is None:
        args.out = Path("benchmarks/results/scale-table.json" if table_mode else "benchmarks/results/scale.json")
    console = Console(width=None if sys.stdout.isatty() else 130)  # rich falls back to 80 columns in a pipe
    root = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="orchmoe-scale-"))
    if table_mode:
        try:
            main_table(args, console, root)
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        return
    n_train, n_test = max(4, round(N_TRAIN * args.tasks_scale)), max(4, round(N_TEST * args.tasks_scale))
    try:
        started = time.perf_counter()
        generate(root / "corpus", n_train, n_test)
        elapsed = time.perf_counter() - started
        console.print(f"corpus: {n_train} + {n_test} tasks in {root / 'corpus'} ({elapsed:.0f} s)")
        rows: list[dict[str, Any]] = []
        model_bytes = 0
        for size in ("full", "quarter"):
            work = root / size
            shutil.rmtree(work, ignore_errors=True)  # a fresh cache: prepare must really encode
            work.mkdir(parents=True)
            recipe = work / "recipe.yaml"
            write_recipe(recipe, root / "corpus", work, size == "quarter", args.val_instances)
            tasks = (n_train, n_test) if size == "full" else (quarter_of(n_train), quarter_of(n_test))
            phases = {"prepare": (CLI + ["prepare", str(recipe)], None),
                      "train": (CLI + ["train", str(recipe), "train.steps=2", "model.name=tiny-llama"],
                                work / "run" / "metrics.jsonl")}
            for phase, (argv, metrics) in phases.items():
                console.print(f"[bold]{size}[/bold] {phase} ...")
                result = run_phase(argv, work / f"{phase}.log", args.timeout, metrics)
                rows.append({"size": size, "tasks": sum(tasks), "rows": sum(tasks) * PER_TASK, "phase": phase,
                             **result})
                if result["status"] != "ok":
                    console.print(f"  [red]{result['status']}[/red] after {result['wall_s']} s; log tail:")
                    for line in (work / f"{phase}.log").read_text(errors="replace").splitlines()[-5:]:
                        console.print("  " + line, markup=False, highlight=False)
            if not model_bytes:
                done = subprocess.run(CLI[:1] + ["-c", MODEL_BYTES, str(recipe)], capture_output=True, text=True,
                                      env=CHILD_ENV, check=False)
                model_bytes = int((done.stdout.split() or ["0"])[-1])
        report(console, rows, model_bytes, args, n_train, n_test)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def report(console: Console, rows: list[dict[str, Any]], model_bytes: int, args: argparse.Namespace,
           n_train: int, n_test: int) -> None:
    """The table, the targets (stated, never an exit status) and the JSON file."""
    by = {(r["size"], r["phase"]): r for r in rows}
    table = Table(title=f"orchmoe scale: {n_train} + {n_test} tasks x {PER_TASK} instances, tiny-llama")
    for column in ("size", "tasks", "rows", "phase", "status", "wall s", "peak RSS MB", "first step s",
                   "wall full/¼", "RSS full/¼"):
        table.add_column(column, justify="left" if column in ("size", "phase", "status") else "right")
    for r in rows:
        other = by.get(("quarter", r["phase"])) if r["size"] == "full" else None
        table.add_row(r["size"], str(r["tasks"]), f"{r['rows']:,}", r["phase"], r["status"], fmt(r["wall_s"]),
                      fmt(r["peak_rss_mb"]), fmt(r["first_step_s"]),
                      fmt(r["wall_s"] / other["wall_s"], ".2f") if other else "",
                      fmt(r["peak_rss_mb"] / other["peak_rss_mb"], ".2f") if other else "")
    console.print(table)
    model_mb = model_bytes / 2**20
    prep, train = by.get(("full", "prepare")), by.get(("full", "train"))
    peak = {size: max(r["peak_rss_mb"] for r in rows if r["size"] == size) for size in ("full", "quarter")}
    targets = [
        {"target": "prepare, full corpus < 120 s", "value": prep["wall_s"],
         "pass": prep["status"] == "ok" and prep["wall_s"] < 120},
        {"target": "train, full corpus: first optimizer step < 30 s after launch", "value": train["first_step_s"],
         "pass": train["first_step_s"] is not None and train["first_step_s"] < 30},
        {"target": f"peak RSS full < 2 x quarter + model weights ({model_mb:.1f} MB)", "value": peak["full"],
         "limit": round(2 * peak["quarter"] + model_mb, 1), "pass": peak["full"] < 2 * peak["quarter"] + model_mb},
    ]
    for t in targets:
        mark = "[green]pass[/green]" if t["pass"] else "[red]FAIL[/red]"
        limit = f" (limit {t['limit']})" if "limit" in t else ""
        console.print(f"{mark}  {t['target']}: {t['value']}{limit}")
    console.print("first step s: launch to the first metrics.jsonl row (train.log_every=1), polled every 50 ms; "
                  "it includes imports, loading the cached data and building the model")
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", *sys.argv]),
            "machine": platform.processor() or platform.machine(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": version("torch"), "tasks_scale": args.tasks_scale,
            "train_tasks": n_train, "test_tasks": n_test, "instances_per_task": PER_TASK,
            "val_instances": args.val_instances, "timeout_s": args.timeout, "model_weights_mb": round(model_mb, 3)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows, "targets": targets}, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
