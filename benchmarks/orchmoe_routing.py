"""Ablation: does OrchMoE's classifier route, and does routing that discriminates beat LoRA at equal budget?

Each variant trains `recipes/sni/orchmoe.yaml` at CPU scale on the SNI development set (62 training
tasks), is evaluated zero-shot with no task id on the 12 held-out tasks, and (orchmoe) inspected with
`orchmoe inspect-routing --data`: router entropy, marginal usage, abstract tasks used, purity and NMI
against SNI categories, allocation spread. LoRA at the same trainable budget and LoRA scale is the
reference; every difference comes with a 95% paired-bootstrap interval over evaluation instances.

    ORCHMOE_SNI_DIR=path/to/sni python benchmarks/orchmoe_routing.py      # about 40 minutes on 2 cores

Resumable: a finished variant's small result file (benchmarks/results/orchmoe_routing/<variant>.json) is
never recomputed; an interrupted one resumes its training (train.resume=auto) and its evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from orchmoe_cli.analysis.bootstrap import InstanceKey, instance_scores, paired_bootstrap  # noqa: E402
from orchmoe_cli.core.results import check_vouched  # noqa: E402

RECIPE = REPO / "recipes" / "sni" / "orchmoe.yaml"
RESULTS = REPO / "benchmarks" / "results" / "orchmoe_routing"
REPORT = REPO / "docs" / "results" / "orchmoe-routing.md"
# CPU scale: definition-only prompts, adapters on the top six layers, one budget and LoRA scale for all
COMMON = [
    "data.num_pos_examples=0", "data.max_source_length=256", "data.max_target_length=32",
    "data.max_train_instances=40", 'method.target_modules=["layers.2[4-9].*_proj"]', "method.rank=8",
    "method.alpha=8", "method.n_skills=8", "method.n_abstract_tasks=8", "method.budget=3.9M", "train.grad_accum=1",
    "train.warmup_steps=10", "train.label_smoothing=0", "train.val_instances=0", "train.eval_every=0",
    "train.save_every=50", "train.log_every=10", "train.resume=auto",
]
OLD = ["train.router_lr=0.01", "method.load_balance_weight=0.01", "method.mutual_information_weight=0"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "lora": ("LoRA, same budget and scale (reference)", ["method.name=lora"]),
    "old-defaults": ("router_lr 0.01, soft balance 0.01 (the collapse)", OLD),
    "router-lr-0.1": ("router_lr 0.1, soft balance 0.01", ["train.router_lr=0.1", *OLD[1:]]),
    "mi-0.1": ("router_lr 0.1, mutual information 0.1", ["train.router_lr=0.1", "method.load_balance_weight=0",
                                                         "method.mutual_information_weight=0.1"]),
    "mi-0.1-spread-1": ("router_lr 0.1, mutual information 0.1, Z init U(-1, 1)",
                        ["train.router_lr=0.1", "method.load_balance_weight=0", "method.mutual_information_weight=0.1",
                         "method.allocation_init_spread=1.0"]),
}


def orchmoe(*args: str) -> str:
    """Run one CLI command (failing loudly), returning its standard output."""
    result = subprocess.run([sys.executable, "-m", "orchmoe_cli", *args], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if result.returncode != 0:
        raise SystemExit(f"orchmoe {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


def run_variant(name: str, overrides: list[str], steps: int, instances: int) -> dict:
    run = REPO / "runs" / "orchmoe-routing" / name
    settings = [*COMMON, f"train.steps={steps}", *overrides, f"output.dir={run}"]
    started = time.perf_counter()
    orchmoe("train", str(RECIPE), *settings)
    trained = time.perf_counter()
    orchmoe("eval", str(RECIPE), *settings, "eval.checkpoint=latest", f"eval.max_instances={instances}",
            "eval.max_new_tokens=32", "eval.batch_size=10")
    evaluated = time.perf_counter()
    eval_dir = max(run.glob("eval-step-*"), key=lambda p: p.stat().st_mtime)
    results = json.loads((eval_dir / "results.json").read_text())
    check_vouched(eval_dir / "predictions.jsonl")  # the per-instance scores are the ones results.json reports
    scores: dict[str, dict[str, float]] = {}  # task -> instance id -> ROUGE-L: ids repeat across tasks
    for (task, instance), value in instance_scores(map(json.loads, (eval_dir / "predictions.jsonl").open())).items():
        scores.setdefault(task, {})[instance] = value
    summary = json.loads((run / "train_summary.json").read_text())
    out = {"variant": name, "overrides": overrides, "steps": steps, "instances_per_task": instances,
           "rougeL": results["results"]["rougeL"], "exact_match": results["results"]["exact_match"],
           "trainable": summary["parameters"]["total_trainable"], "rank": summary["rank"],
           "lora_scale": summary["lora_scale"], "train_s": round(trained - started, 1),
           "eval_s": round(evaluated - trained, 1), "scores": scores}
    if "method.name=lora" not in overrides:
        report = json.loads(orchmoe("inspect-routing", str(run), "--data", str(run / "recipe.yaml"), "--format",
                                    "json"))
        diagnostics = [r for r in map(json.loads, (run / "metrics.jsonl").open()) if "allocation_spread" in r]
        out["classifier"] = report["classifier"]
        out["preferred_by_tasks"] = report["abstract_tasks_preferred_by_tasks"]
        out["allocation_spread"] = diagnostics[-1]["allocation_spread"]
        out["inspect_s"] = round(time.perf_counter() - evaluated, 1)
    return out


def _keyed_by_id_alone(result: dict) -> bool:
    """A result file written before ``scores`` was {task: {id: ROUGE-L}}: its keys are ids alone."""
    return not all(isinstance(v, dict) for v in result["scores"].values())


def _points(result: dict) -> dict[InstanceKey, float]:
    """Per-instance ROUGE-L in points keyed by (task, id) (predictions.jsonl holds fractions; the tables hold
    x 100). A file keyed by id alone records no task: its ids are read as of task "", so it pairs only with
    another such file (main refuses to mix the two kinds)."""
    if _keyed_by_id_alone(result):
        return {("", k): 100 * v for k, v in result["scores"].items()}
    return {(task, k): 100 * v for task, by_id in result["scores"].items() for k, v in by_id.items()}


def write_report(done: dict[str, dict]) -> None:
    lora = done.get("lora")
    lines = [
        "# OrchMoE routing ablation", "",
        "Generated by `benchmarks/orchmoe_routing.py` from `benchmarks/results/orchmoe_routing/*.json`.", "",
        "SmolLM2-135M-Instruct, SNI development set (62 training tasks, 12 held-out tasks in 6 categories), "
        "definition-only prompts, adapters on the top six layers, one trainable budget (3.9M) and LoRA scale "
        "(alpha/r = 1) for every variant, T = 8 abstract tasks. Routing statistics: `orchmoe inspect-routing "
        "--data` over the first 20 prompts of each of the 74 tasks; router entropy is the mean normalised "
        "entropy of p(t|x) (1 = uniform); purity and NMI compare each prompt's preferred abstract task with its "
        "SNI category; allocation spread is the largest difference between two abstract tasks' eval-mode "
        "weights for one skill. ROUGE-L: zero-shot, no task id, the first N instances of each held-out task; "
        "the interval is a 95% paired bootstrap over instances.", "",
        "| variant | router entropy | marginal usage | abstract tasks used by prompts / by tasks | purity | NMI | "
        "allocation spread | ROUGE-L | minus LoRA [95% CI] | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (title, _) in VARIANTS.items():
        if name not in done:
            continue
        r = done[name]
        c = r.get("classifier")
        stats = (f"{c['router_entropy']:.3f} | {c['marginal_entropy']:.3f} | {c['used_abstract_tasks']} / "
                 f"{r.get('preferred_by_tasks', '?')} of {len(c['argmax_counts'])} | {c['purity']:.3f} | "
                 f"{c['nmi']:.3f} | {r['allocation_spread']:.3f}" if c else "- | - | - | - | - | -")
        delta = (str(paired_bootstrap(_points(r), _points(lora))) if lora and name != "lora" else "-")
        lines.append(f"| {name}: {title} | {stats} | {r['rougeL']:.2f} | {delta} | {r['train_s']:.0f} |")
    first = next(iter(done.values()))
    if lora is not None:
        verdicts = []
        for name, r in done.items():
            if name == "lora":
                continue
            d = paired_bootstrap(_points(r), _points(lora))
            side = "above" if d.low > 0 else "below" if d.high < 0 else "within noise of"
            verdicts.append(f"{name} {side} LoRA ({d})")
        beyond = [v for v in verdicts if " within noise of " not in v]
        reading = ("No variant differs from LoRA by more than the choice of evaluation instances: routing that "
                   "discriminates (low router entropy, allocations that differ across abstract tasks) does not, at "
                   "this scale, transfer better than one LoRA of the same size." if not beyond else
                   f"Beyond noise: {'; '.join(beyond)}.")
        lines += ["", "**Against LoRA at equal budget and scale, on unseen tasks:** " + "; ".join(verdicts) + ". "
                  + reading, "",
                  "The defaults (`MethodConfig`, `recipes/quickstart.yaml`, `recipes/sni/orchmoe.yaml`) "
                  "are those of `mi-0.1`: the routing objective with weight 0.1 and router lr 0.1, the soft balance "
                  "term off, Z initialised as Poly's U(-1e-3, 1e-3)."]
    lines += ["", f"{first['steps']} steps of batch 8, {first['instances_per_task']} instances per held-out "
              f"task ({len(_points(first))} in all). Trainable parameters and LoRA scale per variant: "
              + ", ".join(f"{k} {v['trainable']:,} (rank {v['rank']}, scale {v['lora_scale']:g})"
                          for k, v in done.items()) + ".", "", "Commands:", "", "```",
              "ORCHMOE_SNI_DIR=<SNI development set> python benchmarks/orchmoe_routing.py",
              f"# each variant: orchmoe train recipes/sni/orchmoe.yaml {' '.join(COMMON)} train.steps=N <variant>",
              "# then orchmoe eval (eval.checkpoint=latest) and orchmoe inspect-routing RUN --data RUN/recipe.yaml",
              "```", ""]
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps per variant")
    parser.add_argument("--instances", type=int, default=15, help="evaluation instances per held-out task")
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help="run only these variants")
    args = parser.parse_args()
    if "ORCHMOE_SNI_DIR" not in os.environ:
        raise SystemExit("set ORCHMOE_SNI_DIR to the SNI data (the development set or a natural-instructions clone)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    wanted = args.only or list(VARIANTS)
    console = Console()
    progress = Progress(TextColumn("[bold]ablation[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console)
    with progress:
        bar = progress.add_task("", total=len(wanted))
        for name in wanted:
            path = RESULTS / f"{name}.json"
            progress.update(bar, description=name)
            if not path.is_file():
                result = run_variant(name, VARIANTS[name][1], args.steps, args.instances)
                path.with_suffix(".tmp").write_text(json.dumps(result) + "\n")
                path.with_suffix(".tmp").replace(path)  # a result file is whole or absent
            progress.advance(bar)
    done = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}
    old = [name for name, result in done.items() if _keyed_by_id_alone(result)]
    if old and len(old) < len(done):  # their ids cannot be paired with (task, id) keys
        files = ", ".join(str(RESULTS / f"{name}.json") for name in old)
        raise SystemExit(f"{files}: scores keyed by instance id alone "
                         "(written before they were keyed by task and id); delete them to rerun those variants")
    write_report(done)
    console.print(REPORT.read_text())


if __name__ == "__main__":
    main()
