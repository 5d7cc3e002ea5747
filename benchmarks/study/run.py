"""The comparison study: every method at one trainable budget on the SNI development set, zero-shot,
in-distribution and few-shot, with paired-bootstrap intervals; `docs/results/study.md` is generated from the
small result files this driver writes.

    export ORCHMOE_SNI_DIR=/path/to/natural-instructions     # the 62 + 12 task development set
    python benchmarks/study/run.py --scale cpu                # about 2 hours on 2 CPU cores
    python benchmarks/study/run.py --scale cpu-10x            # 1000 training steps, three few-shot seeds
    python benchmarks/study/run.py --scale cpu --only report  # rewrite the report from the result files
    python benchmarks/study/run.py --scale cpu-10x --plan     # what is left, with time estimates; trains nothing
    python benchmarks/study/run.py --scale cpu --results new/results --runs new/runs --report new/study.md

Scales: `tiny` (a random tiny model on the bundled sample: the plumbing in a minute), `cpu` (100 steps),
`cpu-10x` (1000 steps; routing at steps 100, 300 and 1000), `gpu` (a hub model: run `huggingface-cli login`
first when it is gated). The committed results make a rerun on a fresh clone recompute nothing: give new
`--results`, `--runs` and `--report` paths to reproduce a scale from scratch.

Resumable piece by piece: a training run, an evaluation or an adaptation cell whose result file exists under
`benchmarks/study/results/<scale>/` is never recomputed (commit those files and a fresh machine continues);
an interrupted training run resumes from its last checkpoint (`train.resume: auto`), an interrupted
evaluation from its predictions, an interrupted sweep at its first unfinished cell. Checkpoints live in
`runs/study-<scale>/` (not committed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
from estimate import Estimator, Piece, plan_table, read_object, result_lines
from report import write_report

from orchmoe_cli.analysis.adaptation_report import POOL_SHIFT, RESULTS
from orchmoe_cli.core.results import check_vouched
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.fsutil import atomic_write_json, atomic_write_text
from orchmoe_cli.recipe import Recipe, load_recipe, override_sets

# method -> extra overrides; every method trains at the recipe's budget and LoRA scale
METHODS: dict[str, list[str]] = {"lora": [], "poly": [], "mhr": ["method.n_heads=4"], "orchmoe": [],
                                 "hyperloader": []}
# checkpoint method -> its adaptation modes (lora_scratch needs no checkpoint but the budget of one), in the
# order they run: OrchMoE and its two references first, so a run cut short already has that comparison
ADAPT_MODES: dict[str, list[str]] = {"orchmoe": ["orchmoe"], "lora": ["lora_scratch", "lora"],
                                     "mhr": ["mhr", "mhr_z", "mhr_mu"], "hyperloader": ["hyperloader"]}
# modes adapted with the recipe's first seed only when it lists several (the others get every seed)
ONE_SEED_MODES = ("lora", "mhr_z", "hyperloader")
# methods whose routing is inspected at a scale's routing steps (the others route nothing or by task id only)
ROUTED = ("poly", "mhr", "orchmoe")
# MHR-µ's zero-shot variant (Caccia et al.): the trained MHR collapsed to the average of its skills, then a few
# more multi-task steps (a tenth of the training run's)
MU_RUN = "mhr_mu_avg"
SNI_VARIABLE = "ORCHMOE_SNI_DIR"  # where the recipes find the data (expanded when a recipe is read)


@dataclass(frozen=True)
class Scale:
    """What a scale runs beyond its recipe: which methods it trains (MHR-µ follows MHR), per-method overrides,
    the earlier checkpoints lora and orchmoe are also scored zero-shot at, the steps whose routing is recorded."""
    methods: tuple[str, ...] = ("orchmoe", "lora", "mhr", "poly", "hyperloader")
    overrides: dict[str, list[str]] = field(default_factory=dict)
    early_zero_shot: tuple[int, ...] = ()
    routing_steps: tuple[int, ...] = ()
    left_out: str = ""  # why a method is not trained at this scale and where its results are, for the report


# at CPU scale every method adapts the top six layers only (backpropagation stops there): HyperLoader's LoRA
# targets are q and v there, which also places its bottleneck adapters there, and its layer norms stay frozen
TOP_SIX = {"hyperloader": ['method.target_modules=["layers.2[4-9].self_attn.[qv]_proj"]',
                           "method.train_layer_norms=false"]}
SCALES: dict[str, Scale] = {
    "tiny": Scale(routing_steps=(1, 2), early_zero_shot=(1,)),
    "cpu": Scale(overrides=TOP_SIX),
    # ten times the training: HyperLoader (the slowest to train, and given the task id) stays at the cpu scale
    "cpu-10x": Scale(methods=("orchmoe", "lora", "mhr", "poly"), early_zero_shot=(300,),
                     routing_steps=(100, 300, 1000),
                     left_out="HyperLoader is not trained at this scale: at the `cpu` scale's pace (885 s per 100 "
                              "steps, the slowest method) its 1000 steps, evaluations and sweep would add about 3 "
                              "hours on 2 cores. Its results are in the `cpu` study (`docs/results/study.md`)."),
    "gpu": Scale(),
}
STAGES = ("train", "zero-shot", "in-distribution", "routing", "adapt", "report")
console = Console()


def shown(args: list[str]) -> str:
    """An `orchmoe` command as the report prints it, quoted for the shell so it can be pasted: paths inside the
    repository made relative to it."""
    return shlex.join(["orchmoe", *(arg.replace(f"{REPO}/", "") for arg in args)])


def orchmoe(*args: str) -> None:
    """One CLI command, its output shown; a failure stops the study with the command's own message."""
    line = shlex.join(["orchmoe", *args])
    console.print(f"$ {line}", style="dim", highlight=False, markup=False)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if subprocess.run([sys.executable, "-m", "orchmoe_cli", *args], cwd=REPO, env=env, check=False).returncode:
        raise SystemExit(f"study: `{line}` failed; fix it and rerun (finished pieces are kept)")


class Study:
    def __init__(self, scale: str, results: Path | None = None, runs: Path | None = None,
                 methods: tuple[str, ...] | None = None, overrides: tuple[str, ...] = ()) -> None:
        self.scale = scale
        self.overrides = overrides  # recipe overrides for every train, eval and adapt command (--set)
        self.plan = SCALES[scale] if methods is None else dataclasses.replace(SCALES[scale], methods=methods)
        self.recipe = HERE / f"{scale}.yaml"
        self.results = results or HERE / "results" / scale
        self.runs = runs or REPO / "runs" / f"study-{scale}"

    def settings(self, method: str) -> list[str]:
        if method == MU_RUN:
            return [*self.settings("mhr_mu")[:-1], f"output.dir={self.runs / method}"]
        return [f"method.name={method}", *METHODS.get(method, []), *self.plan.overrides.get(method, []),
                *self.overrides, f"output.dir={self.runs / method}"]

    def checkpoint(self, method: str, step: int | None = None) -> Path:
        """A method's run directory (its newest checkpoint), or its checkpoint of ``step``."""
        run = self.runs / method
        return run if step is None else run / "checkpoints" / f"step-{step:06d}"

    # ------------------------------------------------------------------ pieces

    def train(self, method: str) -> Piece:
        command = ["train", str(self.recipe), *self.settings(method)]
        steps = self.config.train.steps
        if method == MU_RUN:
            steps = max(1, self.config.train.steps // 10)
            own = [f"train.init_from={self.runs / 'mhr'}", f"train.steps={steps}", "train.warmup_steps=0"]
            if self.config.train.keep_steps:  # the long run's kept steps lie beyond these few
                own.append("train.keep_steps=[]")
            fields = [item.partition("=")[0] for item in own]  # these, not the --set ones (a field is set once)
            command = [c for c in command if "=" not in c or not any(override_sets(c, f) for f in fields)] + own

        def run() -> None:
            started = time.perf_counter()
            orchmoe(*command)
            summary = json.loads((self.runs / method / "train_summary.json").read_text())
            # the checkpoint relative to the runs directory: result files name no machine's paths
            summary["checkpoint"] = os.path.relpath(summary["checkpoint"], self.runs)
            metrics = (self.runs / method / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
            validation = [[row["step"], row["val_loss"]] for row in map(json.loads, metrics) if "val_loss" in row]
            atomic_write_json(self.results / "train" / f"{method}.json",
                              {**summary, "method": method, "validation_loss": validation,
                               "wall_s": round(time.perf_counter() - started, 1)})
        return Piece("train", method, self.results / "train" / f"{method}.json", command, run, work={"steps": steps})

    def retrain(self, method: str) -> Piece:
        """A finished training run whose checkpoint this machine lacks (checkpoints are not committed): train it
        again with the same command, and go on only if the adapter is bitwise the one the results came from."""
        trained = self.train(method)

        def run() -> None:
            recorded = json.loads(trained.result.read_text())["adapter_checksums"]
            orchmoe(*trained.command)
            summary = json.loads((self.runs / method / "train_summary.json").read_text())
            if summary["adapter_checksums"] != recorded:
                shutil.rmtree(self.runs / method)  # not done: the next run retrains and checks again
                raise SystemExit(
                    f"study: the retrained {method} adapter differs from the one in {trained.result} (another CPU "
                    f"or library version?); delete that file and every result of {method} to redo them with it")
        return Piece("retrain", method, self.runs / method / "train_summary.json", trained.command, run,
                     work=trained.work)

    def evaluation(self, stage: str, method: str, step: int | None = None) -> Piece:
        """Zero-shot on the held-out tasks (no task id), or in-distribution on the training tasks' held-back
        instances (`train.val_instances`: the first rows of each task, never trained on); at the newest checkpoint
        or at ``step`` (named ``<method>@<step>``)."""
        split = ["eval.split=train", f"eval.max_instances={self.config.train.val_instances}"] if stage == "in-distribution" else []
        checkpoint = "none" if method == "base" else self.checkpoint(method, step) if step else "latest"
        name = method if step is None else f"{method}@{step}"
        out = self.results / stage / name

        where = self.runs / stage / name
        command = ["eval", str(self.recipe), *self.settings("lora" if method == "base" else method),
                   f"eval.checkpoint={checkpoint}", *split, f"eval.output_dir={where}"]

        def run() -> None:
            started = time.perf_counter()
            orchmoe(*command)
            [eval_dir] = [d for d in where.iterdir() if (d / "results.json").is_file()]
            out.parent.mkdir(parents=True, exist_ok=True)
            check_vouched(eval_dir / "predictions.jsonl")
            shutil.copy(eval_dir / "predictions.jsonl", out.with_suffix(".predictions.jsonl"))
            results = json.loads((eval_dir / "results.json").read_text())
            atomic_write_json(out.with_suffix(".json"), {"method": name, "results": results["results"],
                                                  "n_instances": results["n_instances"],
                                                  "predictions_sha256": results["predictions_sha256"],
                                                  "wall_s": round(time.perf_counter() - started, 1)})
        return Piece(stage, name, out.with_suffix(".json"), command, run, None if method == "base" else method)

    def routing(self, method: str, step: int) -> Piece:
        """`inspect-routing` statistics of one checkpoint, with the recipe's data for SNI's categories (whether
        tasks of one category route alike) and, for orchmoe, the classifier's view of every task: the figures stay
        beside the runs, the summary numbers become a result file."""
        out = self.runs / "routing" / f"{method}-{step}"
        command = ["inspect-routing", str(self.checkpoint(method, step)), "--data", str(self.recipe), "--out", str(out)]
        result = self.results / "routing" / f"{method}@{step}.json"

        def run() -> None:
            started = time.perf_counter()
            orchmoe(*command)
            report = json.loads((out / "routing.json").read_text(encoding="utf-8"))
            atomic_write_json(result, {"method": method, "step": step, "overall": report["statistics"]["overall"],
                                       "classifier": report["classifier"],
                                       "category_coherence": report["category_coherence"],
                                       "wall_s": round(time.perf_counter() - started, 1)})
        return Piece("routing", f"{method}@{step}", result, command, run, method)

    def adaptation(self, method: str, tasks: list[str], one_seed: bool = False) -> Piece | None:
        """One sweep over ``tasks`` from ``method``'s checkpoint: its modes with every seed of the recipe (and the
        zero-shot row), or with ``one_seed`` the modes adapted with its first seed only."""
        seeds = self.config.adapt.seeds
        several = len(seeds) > 1
        if one_seed and not several:
            return None
        modes = [m for m in ADAPT_MODES[method] if not several or (m in ONE_SEED_MODES) == one_seed]
        if not modes:
            return None
        name = f"{method}-one-seed" if one_seed and several else method
        cells = {mode: len(tasks) * len(self.config.adapt.shots) * (1 if one_seed else len(seeds)) for mode in modes}
        if not (one_seed and several):
            cells["zero_shot"] = len(tasks)
        out = self.results / "adapt" / name
        command = ["adapt", str(self.recipe), *self.settings(method), f"adapt.checkpoint={self.runs / method}",
                   "--modes", ",".join([*([] if one_seed and several else ["zero_shot"]), *modes]),
                   "--tasks", ",".join(tasks), *(["--seeds", str(seeds[0])] if one_seed and several else []),
                   f"adapt.output_dir={out}"]

        def run() -> None:
            started = time.perf_counter()
            orchmoe(*command)
            results = out / "adapt_results.jsonl"
            # the lines as written (per-instance scores stay in predictions/<cell>.jsonl, keyed by (task, id))
            rows = [json.loads(line) for line in results.open(encoding="utf-8") if line.strip()]
            for row in rows:  # the checkpoint relative to the runs directory, as the training results name it
                if row.get("checkpoint") and Path(row["checkpoint"]).is_absolute():
                    row["checkpoint"] = os.path.relpath(row["checkpoint"], self.runs)
            atomic_write_text(results, "".join(json.dumps(row) + "\n" for row in rows))
            used = out / "recipe.yaml"  # the recipe copy names no machine's paths: the repository's and the data's
            text = used.read_text(encoding="utf-8").replace(f"{REPO}/", "")
            if os.environ.get(SNI_VARIABLE):
                text = text.replace(os.environ[SNI_VARIABLE], f"${{{SNI_VARIABLE}}}")
            atomic_write_text(used, text)
            atomic_write_json(out / "done.json", {"modes": modes, "tasks": tasks,
                                           "wall_s": round(time.perf_counter() - started, 1)})
        return Piece("adapt", name, out / "done.json", command, run, method, cells)

    @cached_property
    def config(self) -> Recipe:
        """The scale's recipe with the --set overrides, loaded (and checked) once."""
        return load_recipe(self.recipe, self.overrides)

    @cached_property
    def prepared(self) -> Any:
        from orchmoe_cli.core.recipe_data import prepare_data

        return prepare_data(self.config, console)

    def adaptation_tasks(self) -> list[str]:
        """One held-out task per SNI category, the one with the largest adaptation pool (ties: split order);
        a rule that never looks at scores. At GPU scale, every task with a pool."""
        held_out = [t for t in self.prepared.manifest["tasks"] if t["split"] == "test" and t.get("n_pool", 0) > 0]
        if not self.scale.startswith("cpu"):
            return [t["name"] for t in held_out]
        best: dict[str, dict] = {}
        for task in held_out:
            if task["category"] not in best or task["n_pool"] > best[task["category"]]["n_pool"]:
                best[task["category"]] = task
        return [t["name"] for t in best.values()]

    def record_pool_shifts(self) -> None:
        """`orchmoe adapt`'s measure of how unlike its evaluation instances each adapted task's pool is, merged into
        ``adapt/pool_shift.json`` for the report: what the sweeps recorded, the tasks they lack computed from the
        prepared data (sweeps run before adapt measured it have none; a machine without the data leaves them out)."""
        from orchmoe_cli.analysis.pool_shift import pool_shifts, read_shifts

        path = self.results / "adapt" / POOL_SHIFT
        recorded: dict[str, Any] = {}
        for measured in [path, *sorted((self.results / "adapt").glob(f"*/{POOL_SHIFT}"))]:
            try:
                recorded.update(read_shifts(measured) if measured.is_file() else {})
            except OrchmoeError as error:  # said; its tasks are in the merged file or measured again below
                console.print(f"study: skipped, its tasks' measures taken from adapt/{POOL_SHIFT} or the prepared "
                              f"data: {error}", markup=False, highlight=False, soft_wrap=True)
        adapted = {row["task"] for sweep in (self.results / "adapt").glob(f"*/{RESULTS}")
                   for row in result_lines(sweep) if row["mode"] != "zero_shot" and isinstance(row.get("task"), str)}
        missing = sorted(adapted - set(recorded))
        if missing:
            try:
                recorded.update(pool_shifts(self.config, self.prepared, missing, []))
            except OrchmoeError as error:
                console.print(f"study: no adaptation-pool measures for {', '.join(missing)} ({error})", markup=False,
                              highlight=False, soft_wrap=True)
        if recorded and recorded != read_object(path):
            atomic_write_json(path, dict(sorted(recorded.items())))

    def pieces(self, stages: tuple[str, ...]) -> list[Piece]:
        """Method by method (the base model first): its training, then everything that reads its checkpoint, so
        a study cut short leaves whole methods and a later machine retrains only what it still needs."""
        found: list[Piece | None] = []
        tasks = self.adaptation_tasks() if "adapt" in stages else []
        methods = [m for m in self.plan.methods for m in ([m, MU_RUN] if m == "mhr" else [m])]
        for method in ["base", *methods]:
            if "train" in stages and method != "base":
                found.append(self.train(method))
            for stage in ("zero-shot", "in-distribution"):
                if stage in stages:
                    found.append(self.evaluation(stage, method))
            if "zero-shot" in stages and method in ("lora", "orchmoe"):
                found += [self.evaluation("zero-shot", method, step) for step in self.plan.early_zero_shot]
            if "routing" in stages and method in ROUTED:
                found += [self.routing(method, step) for step in self.plan.routing_steps]
            if "adapt" in stages and method in ADAPT_MODES:
                found += [self.adaptation(method, tasks), self.adaptation(method, tasks, one_seed=True)]
        done = [piece for piece in found if piece is not None]
        return [*self._retraining(done), *done]

    def _retraining(self, pieces: list[Piece]) -> list[Piece]:
        """Retrain pieces for the checkpoints that unfinished pieces read and this machine lacks (MHR-µ's run
        starts from MHR's checkpoint, so MHR comes back first)."""
        lacking: list[str] = []
        for piece in pieces:
            method = piece.reads
            if piece.result.is_file() or method is None or method in lacking:
                continue
            trained = (self.results / "train" / f"{method}.json").is_file()
            if trained and not (self.runs / method / "train_summary.json").is_file():
                lacking.append(method)
        if MU_RUN in lacking and "mhr" not in lacking and not (self.runs / "mhr" / "checkpoints").is_dir():
            lacking.insert(0, "mhr")
        return [self.retrain(m) for m in sorted(lacking, key=lambda m: m == MU_RUN)]


def _listed(choices: tuple[str, ...], what: str) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma-separated list of ``choices``."""
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(item.strip() for item in text.split(","))
        wrong = [item for item in items if item not in choices]
        if wrong:
            raise argparse.ArgumentTypeError(f"unknown {what} '{wrong[0]}' (choose from {', '.join(choices)})")
        return items
    return parse


def print_plan(todo: list[Piece], estimator: Estimator, results: Path) -> None:
    """The pieces still to run with their estimated wall-clock, before the first one starts."""
    if todo:
        console.print(plan_table([(piece.stage, piece.name, piece.estimate(estimator)) for piece in todo]))
    else:
        console.print(f"nothing left to run: every result of these stages is in {results}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=tuple(SCALES), default="cpu",
                        help="tiny: a random tiny model on the bundled sample, to try the plumbing")
    parser.add_argument("--results", type=Path, help="result files (default benchmarks/study/results/<scale>)")
    parser.add_argument("--runs", type=Path, help="checkpoints (default runs/study-<scale>)")
    parser.add_argument("--report", type=Path, help="report file (default docs/results/study.md at cpu scale, "
                        "study-<scale>.md otherwise)")
    parser.add_argument("--only", type=_listed(STAGES, "stage"),
                        help=f"run these stages, e.g. train,zero-shot (of {', '.join(STAGES)}; a stage's "
                             "prerequisites must be done or listed)")
    parser.add_argument("--methods", type=_listed(tuple(METHODS), "method"),
                        help="only these of the scale's methods, e.g. orchmoe,lora (MHR-mu follows mhr)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", dest="overrides",
                        help="a recipe override for every train, eval and adapt command (repeatable), e.g. "
                             "model.name=smollm2-135m-instruct; give new --results, --runs and --report with it")
    parser.add_argument("--plan", action="store_true",
                        help="print what is left to run, with estimates, and stop (it reads the prepared data to list "
                             "the adaptation cells, and trains and evaluates nothing)")
    args = parser.parse_args()
    methods = SCALES[args.scale].methods
    if args.methods and not set(args.methods) <= set(methods):
        parser.error(f"--methods: the {args.scale} scale trains {', '.join(methods)}")
    study = Study(args.scale, args.results and args.results.resolve(), args.runs and args.runs.resolve(),
                  tuple(m for m in methods if m in args.methods) if args.methods else None, tuple(args.overrides))
    if args.overrides:  # a bad override, or one that sets what a piece sets too, is one line now, not a failed
        try:  # command hours later
            study.config
            for piece in study.pieces(STAGES):
                if piece.command[0] in ("train", "eval", "adapt"):
                    load_recipe(study.recipe, [c for c in piece.command[2:] if "=" in c and not c.startswith("-")])
        except OrchmoeError as error:
            parser.error(f"--set: {error}")
    stages = tuple(s for s in STAGES if s in args.only) if args.only else STAGES
    todo = [p for p in study.pieces(stages) if not p.result.is_file()]
    print_plan(todo, Estimator([study.results, HERE / "results" / "cpu"]), study.results)
    if args.plan:
        return
    progress = Progress(TextColumn("[bold]study[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console)
    with progress:
        bar = progress.add_task("", total=len(todo))
        for piece in todo:
            progress.update(bar, description=f"{piece.stage} {piece.name}")
            piece.run()
            progress.advance(bar)
    if "report" in stages:
        every = [piece for piece in study.pieces(STAGES[:-1]) if piece.stage != "retrain"]
        missing = [f"{piece.stage} {piece.name}" for piece in every if not piece.result.is_file()]
        study.record_pool_shifts()
        path = write_report(study.results, study.scale, study.runs, REPO, [shown(p.command) for p in every],
                            missing, args.report, left_out=study.plan.left_out)
        console.print(f"report: {path}")


if __name__ == "__main__":
    main()
