"""`orchmoe adapt`: few-shot adaptation to held-out tasks, cell by cell (task x mode x k x seed).

Every cell starts from the pristine trained checkpoint (or the bare base model), draws its k training
examples and a validation slice from the task's adaptation pool (never from the evaluation instances),
trains in memory with the same ``fit`` as `orchmoe train` (no checkpoints: a cell is minutes), keeps the best
validation ROUGE-L, and is scored with the same generation and SNI scorer as `orchmoe eval`. Each finished
cell writes ``predictions/<cell>.jsonl`` (its per-instance scores: the one authoritative record) and appends
one line to ``adapt_results.jsonl`` (its settings, including the training it ran, and aggregate scores); it is
never recomputed, and an interrupted cell restarts from scratch. ``--keep-adapters`` keeps each cell's adapter
with the recipe it ran in ``cells/<cell>/adapter``.

The whole grid is checked before data or a model is loaded, and every mode against the checkpoint before the
first cell. One process writes a sweep directory at a time (its lock), and a continuation reads ``sweep.json``
and every results line through one validating reader: each is bound to the base model, the checkpoint and its
origin, and a difference is refused in one line.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import PartialState
from accelerate.utils.memory import clear_device_cache
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from orchmoe_cli.adapters import AdaptedModel, attach_adapters, load_adapted
from orchmoe_cli.adapters.few_shot import adapt_modes, check_mode, movable_parameter_count, prepare_for_adaptation
from orchmoe_cli.adapters.method_config import MethodConfig
from orchmoe_cli.adapters.registry import spec_of
from orchmoe_cli.analysis.adaptation_report import (
    BINDING,
    POOL_SHIFT,
    PREDICTIONS,
    RESULTS,
    SWEEP,
    cell_file_name,
    cell_scores,
    check_same_sweep,
    read_result_lines,
    sweep_identity,
)
from orchmoe_cli.analysis.pool_shift import pool_shifts
from orchmoe_cli.commands.common import RECIPE_FILE
from orchmoe_cli.core.base_models import LoadedModel, load_model, on_device
from orchmoe_cli.core.checkpoint import checkpoint_digest, find_checkpoint
from orchmoe_cli.core.evaluation import score_rows, select_instances
from orchmoe_cli.core.fit import fit, make_accelerator
from orchmoe_cli.core.generation import NewlineTable
from orchmoe_cli.core.metrics import aggregate
from orchmoe_cli.core.recipe_data import prepare_data
from orchmoe_cli.core.results import jsonl
from orchmoe_cli.core.run_lock import RunLock
from orchmoe_cli.data.collate import pad_token_id
from orchmoe_cli.data.dataset_cache import POOL
from orchmoe_cli.data.rows import TaskRows
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.fsutil import atomic_write_json, atomic_write_text, json_text
from orchmoe_cli.recipe import AdaptConfig, EvalConfig, Recipe, TrainConfig, dump_recipe

NO_TRAINING = ("zero_shot",)
WITHOUT_CHECKPOINT = ("zero_shot", "lora_scratch")  # the modes a sweep of the bare base model runs
KEPT = "adapt_cell.json"  # beside every adapter --keep-adapters keeps: the cell it is, so it is never adapted again

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    task: str
    mode: str
    shots: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.task}/{self.mode}/k{self.shots}/s{self.seed}"

    @property
    def file_name(self) -> str:
        """The key as one path component (predictions/<file_name>.jsonl, cells/<file_name>/)."""
        return cell_file_name(self.key)


def check_grid(cfg: AdaptConfig, has_checkpoint: bool) -> None:
    """Before data or a model is loaded (the lists themselves are checked when the recipe is read): every mode
    known, and possible without a checkpoint when there is none."""
    for mode in cfg.modes:
        if mode not in WITHOUT_CHECKPOINT and (mode not in adapt_modes() or not has_checkpoint):
            check_mode(mode, None)  # unknown, or no checkpoint to adapt


def plan_cells(recipe: Recipe, prepared: Any) -> list[Cell]:
    """Every (task, mode, k, seed) to run; one zero_shot cell per task (it draws nothing)."""
    cfg = recipe.adapt
    pools = {t["name"]: t.get("n_pool", 0) for t in prepared.manifest["tasks"] if t["split"] == "test"}
    wanted = cfg.tasks if cfg.tasks is not None else [t for t, n in pools.items() if n > 0]
    unknown = [t for t in wanted if t not in pools]
    if unknown:
        raise OrchmoeError(f"{unknown[0]} is not a held-out task of the prepared data", field="adapt.tasks")
    if not wanted:
        raise OrchmoeError("no held-out task of the prepared data has an adaptation pool (instances beyond "
                           "data.max_test_instances)", field="adapt.tasks")
    cells = []
    for task in wanted:
        for mode in cfg.modes:
            if mode in NO_TRAINING:
                cells.append(Cell(task, mode, 0, 0))
                continue
            for k in cfg.shots:
                if k > pools[task]:
                    raise OrchmoeError(f"k={k} is more than the {pools[task]} pool instances of {task}"
                                       + ("" if pools[task] else " (it has no adaptation pool)"), field="adapt.shots")
                cells += [Cell(task, mode, k, seed) for seed in cfg.seeds]
    return cells


def _trained_tasks(cells: list[Cell]) -> list[str]:
    """The tasks whose adaptation pools some of ``cells`` train on, in order."""
    return list(dict.fromkeys(c.task for c in cells if c.mode not in NO_TRAINING))


def _draw(pool: TaskRows, cell: Cell, val_instances: int) -> tuple[TaskRows, TaskRows | None]:
    """k training rows and a disjoint validation slice of the task's pool, drawn with the cell's seed."""
    rows = pool.of_tasks([cell.task])
    order = list(range(len(rows)))
    random.Random(f"{cell.seed}:{cell.task}").shuffle(order)
    n_val = min(val_instances, len(rows) - cell.shots)
    val = rows.select(order[cell.shots : cell.shots + n_val]) if n_val > 0 else None
    return rows.select(order[: cell.shots]), val


@dataclass(frozen=True)
class Trained:
    """What the cells need to know of the trained checkpoint, read once per sweep."""

    path: Path
    method: MethodConfig
    trainable: int
    lora_scale: float
    sha256: str
    init_from: str | None  # where its own training started (its recipe's train.init_from)


def _init_from(path: Path) -> str | None:
    """The checkpoint's ``train.init_from`` as its saved recipe gives it (None without a saved recipe)."""
    saved = path / RECIPE_FILE
    if not saved.is_file():
        return None
    try:
        train = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("train") or {}
        value = train.get("init_from")
    except (OSError, yaml.YAMLError, UnicodeDecodeError, AttributeError):
        raise OrchmoeError(f"{saved}: not a readable recipe, so where the checkpoint's training started is "
                           "unknown", field="adapt.checkpoint") from None
    return value if isinstance(value, str) else None


def describe_checkpoint(base: Any, path: Path) -> Trained:
    """The checkpoint a sweep adapts; never one that is itself an adaptation's output (its cells would adapt a
    task twice and call the result zero-shot)."""
    if (path / KEPT).is_file():
        raise OrchmoeError(f"{path / KEPT}: this adapter is a cell `orchmoe adapt --keep-adapters` kept; adapt the "
                           "checkpoint it came from instead", field="adapt.checkpoint")
    model = load_adapted(copy.deepcopy(base), path)
    if model.adapted_tasks:
        raise OrchmoeError(f"{path / 'adapter_config.json'}: adapted_tasks is {model.adapted_tasks}: this adapter "
                           "was already adapted by `orchmoe adapt`; adapt the checkpoint it came from instead",
                           field="adapt.checkpoint")
    return Trained(path, model.method, model.count_parameters()["total_trainable"], model.lora_scale,
                   checkpoint_digest(path), _init_from(path))


def _finished(out: Path, cells: list[Cell], identity: dict[str, Any], keep_adapters: bool, writes: bool,
              console: Console) -> list[dict[str, Any]]:
    """The lines of the cells already in the results, every line checked and bound to this sweep; a final line a
    kill cut short is dropped (and, by the process that ``writes``, removed) so its cell runs again."""
    check_same_sweep(out, identity)
    lines = read_result_lines(out / RESULTS, {name: identity[name] for name in BINDING})
    if lines.warning is not None:
        log.warning(lines.warning)
    if writes:
        lines.repair()
    for row in lines.records:  # before the first cell, not in the summary hours later
        cell_scores(out / RESULTS, row)
    done = {row["key"] for row in lines.records}
    unkept = [c for c in cells if c.key in done and not (out / "cells" / c.file_name / "adapter").is_dir()
              and (c.mode not in NO_TRAINING or identity["checkpoint_sha256"] is not None)]
    if keep_adapters and unkept:
        console.print(f"[yellow]warning:[/yellow] --keep-adapters: {len(unkept)} finished cell(s) ran without it, so "
                      f"their adapters were not kept (e.g. {unkept[0].key}); finished cells do not run again (remove "
                      f"their lines from {RESULTS} to run them again with it)", highlight=False)
    return lines.records


def _build(cell: Cell, base: Any, trained: Trained | None, recipe: Recipe) -> AdaptedModel | Any:
    """The model a cell starts from, on its own copy of the base model."""
    fresh = copy.deepcopy(base)
    if cell.mode == "zero_shot":
        return fresh if trained is None else load_adapted(fresh, trained.path)
    if cell.mode == "lora_scratch":  # the same trainable count as the checkpoint, no multi-task transfer
        method = MethodConfig(name="lora", rank=8, alpha=8)
        if trained is not None:
            method = MethodConfig(name="lora", rank=8, alpha=8 * trained.lora_scale, budget=str(trained.trainable),
                                  target_modules=trained.method.target_modules, dropout=trained.method.dropout)
        return attach_adapters(fresh, method, [])
    assert trained is not None, cell.mode  # check_grid refuses the other modes without a checkpoint
    model = load_adapted(fresh, trained.path)
    prepare_for_adaptation(model, cell.mode, cell.task, recipe.adapt.with_router)
    return model


def _validator(model: Any, val_rows: list[dict], loaded: LoadedModel, eval_cfg: EvalConfig,
               newlines: NewlineTable | None) -> tuple[Any, dict]:
    """validate(model, step) for fit: ROUGE-L on the validation slice; keeps the best trainable tensors."""
    best: dict[str, Any] = {"rougeL": -1.0, "step": 0, "state": None}

    def validate(_: Any, step: int) -> dict[str, float]:
        model.eval()
        scored = score_rows(model, loaded.tokenizer, loaded.is_encoder_decoder, val_rows, eval_cfg,
                            model.task_index, newlines)
        model.train()
        rouge = 100 * sum(r["rougeL"] for r in scored) / max(len(scored), 1)
        if rouge > best["rougeL"]:
            best.update(rougeL=rouge, step=step, state={n: p.detach().clone() for n, p in
                                                       model.named_adapter_parameters() if p.requires_grad})
        return {"val_rougeL": rouge}

    return validate, best


def cell_train_config(cell: Cell, recipe: Recipe) -> TrainConfig:
    """What a cell's training runs with: the adapt section's settings, a constant learning rate, no weight decay
    (as the papers' few-shot runs), the cell's seed, and the recipe's precision and determinism."""
    cfg = recipe.adapt
    return TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, router_lr=cfg.router_lr,
                       hypernetwork_lr=cfg.lr, weight_decay=0.0, warmup_steps=0, schedule="constant",
                       seed=cell.seed, eval_every=cfg.eval_every, log_every=max(1, cfg.eval_every // 2),
                       save_every=0, keep_last=1, mixed_precision=recipe.train.mixed_precision,
                       deterministic=recipe.train.deterministic)


@dataclass
class Sweep:
    """What every cell of one sweep shares: the recipe, the prepared data, the loaded base model, the trained
    checkpoint (None: the bare base model), the output directory, the tokenizer's newline table."""

    recipe: Recipe
    prepared: Any
    loaded: LoadedModel
    trained: Trained | None
    out: Path
    console: Console
    binding: dict[str, Any]  # what every results line is bound to (base model, checkpoint, its origin)
    newlines: NewlineTable | None = None
    state: PartialState = dataclasses.field(default_factory=lambda: PartialState(cpu=not torch.cuda.is_available()))

    def category(self, task: str) -> str:
        return next(t["category"] for t in self.prepared.manifest["tasks"] if t["name"] == task)


def _train_cell(cell: Cell, model: Any, sweep: Sweep, train_cfg: TrainConfig) -> tuple[int, dict[str, Any]]:
    """Train the cell's model in memory on its k pool rows; returns (steps run, best validation step and score),
    with the best validation step's tensors put back (early stopping)."""
    cfg, loaded = sweep.recipe.adapt, sweep.loaded
    accelerator = make_accelerator(train_cfg, spec_of(model.method.name),
                                   half_base=sweep.recipe.model.dtype == "float16")  # as `train` decides it
    pool = sweep.prepared.dataset[POOL]
    train_rows, val = _draw(TaskRows(pool), cell, cfg.val_instances)
    validate, best = None, {"step": 0, "rougeL": None}
    if val is not None:
        # generated in batches of eval.batch_size, as every generation is (adapt.batch_size is the training's)
        validate, best = _validator(model, [pool[i] for i in val.positions()], loaded, sweep.recipe.eval,
                                    sweep.newlines)
    outcome = fit(model, train_rows, train_cfg, None, accelerator, pad_id=pad_token_id(loaded.tokenizer),
                  causal=not loaded.is_encoder_decoder, recipe_yaml="", console=sweep.console, validate=validate)
    if outcome.interrupted:  # Ctrl-C / SIGTERM: stop the sweep; this cell restarts on the next run
        raise KeyboardInterrupt
    if best.get("state") is not None:
        with torch.no_grad():
            own = dict(model.named_adapter_parameters())
            for name, value in best.pop("state").items():
                own[name].copy_(value)
    return outcome.step, best


def _keep_adapter(cell: Cell, model: AdaptedModel, sweep: Sweep, ran: Recipe) -> None:
    """``--keep-adapters``: ``cells/<cell>/adapter`` (what `orchmoe eval` and `inspect-routing` load) and the
    recipe the cell ran (its train section is the cell's training, its eval section the cell's scoring)."""
    cell_dir = sweep.out / "cells" / cell.file_name
    shutil.rmtree(cell_dir, ignore_errors=True)  # what an interrupted run of this cell left
    model.save(cell_dir / "adapter")
    atomic_write_text(cell_dir / "adapter" / "recipe.yaml", dump_recipe(ran))
    atomic_write_json(cell_dir / "adapter" / KEPT, {"cell": cell.key, **sweep.binding})


def run_cell(cell: Cell, sweep: Sweep) -> dict[str, Any]:
    """Train (unless zero_shot) and evaluate one cell; writes its per-sample predictions (the authoritative
    per-instance scores) and returns its result line."""
    started = time.perf_counter()
    recipe, loaded, trained = sweep.recipe, sweep.loaded, sweep.trained
    train_cfg = cell_train_config(cell, recipe)
    trains = cell.mode not in NO_TRAINING
    if trains:
        torch.manual_seed(cell.seed)  # the new routing row / fresh LoRA are drawn per seed
    model = on_device(_build(cell, loaded.model, trained, recipe), sweep.state.device)
    steps_run, best = _train_cell(cell, model, sweep, train_cfg) if trains else (0, {"step": 0, "rougeL": None})
    eval_cfg = dataclasses.replace(recipe.eval, tasks=[cell.task])
    model.eval()
    scored = score_rows(model, loaded.tokenizer, loaded.is_encoder_decoder,
                        select_instances(sweep.prepared.dataset["test"], eval_cfg), eval_cfg,
                        model.task_index if isinstance(model, AdaptedModel) else None, sweep.newlines)
    if sweep.state.is_main_process:  # under `accelerate launch` every process trains the cell; one writes
        predictions = sweep.out / PREDICTIONS / f"{cell.file_name}.jsonl"
        atomic_write_text(predictions, jsonl(scored, predictions))
        if recipe.adapt.keep_adapters and isinstance(model, AdaptedModel):
            _keep_adapter(cell, model, sweep, dataclasses.replace(recipe, train=train_cfg, eval=eval_cfg))
    metrics = aggregate(scored)
    return {**dataclasses.asdict(cell), "key": cell.key, "category": sweep.category(cell.task),
            "trainable": movable_parameter_count(model) if trains else 0, "steps_run": steps_run,
            "best_step": best.get("step", 0), "val_rougeL": best.get("rougeL"),
            "rougeL": metrics["rougeL"], "exact_match": metrics["exact_match"],
            "wall_s": round(time.perf_counter() - started, 1),
            "method": trained.method.name if trained else "base", "checkpoint": str(trained.path) if trained else None,
            "train": dataclasses.asdict(train_cfg) if trains else None, **sweep.binding}


def _run_cells(todo: list[Cell], sweep: Sweep) -> None:
    """Run the cells in order behind a progress bar; each finished one appends its line to the results."""
    results = sweep.out / RESULTS
    progress = Progress(TextColumn("[bold]adapt[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=sweep.console)
    with progress:
        bar = progress.add_task("", total=len(todo))
        for cell in todo:
            progress.update(bar, description=cell.key)
            line = run_cell(cell, sweep)
            clear_device_cache(garbage_collection=True)  # the cell's base copy: mixed precision's forward cycle
            if sweep.state.is_main_process:
                with results.open("a", encoding="utf-8") as handle:  # one whole line per finished cell
                    handle.write(json_text(line, results) + "\n")
            progress.advance(bar)


def adapt(recipe: Recipe, recipe_path: str, console: Console) -> Path | None:
    """Run every cell not yet in ``adapt_results.jsonl``; returns the output directory (None in the other processes
    of `accelerate launch`, which train every cell with the main one but write nothing). ``recipe_path`` is the
    recipe's file, named where a command line is suggested."""
    cfg = recipe.adapt
    state = PartialState(cpu=not torch.cuda.is_available())
    main = state.is_main_process
    console = console if main else Console(quiet=True)
    out = recipe.adapt_dir
    checkpoint = None
    has_checkpoint = cfg.checkpoint is not None and cfg.checkpoint.strip().lower() not in ("none", "null")
    check_grid(cfg, has_checkpoint)
    if has_checkpoint:
        value = Path(recipe.output.dir) if cfg.checkpoint == "latest" else Path(cfg.checkpoint)
        checkpoint = find_checkpoint(value, "adapt.checkpoint", f"orchmoe train {recipe_path}")
    with state.main_process_first():
        prepared = prepare_data(recipe, console)
    cells = plan_cells(recipe, prepared)
    loaded = load_model(recipe.model)
    trained = describe_checkpoint(loaded.model, checkpoint) if checkpoint is not None else None
    for mode in dict.fromkeys(c.mode for c in cells):  # every mode must fit the checkpoint before any cell runs
        if mode not in WITHOUT_CHECKPOINT and trained is not None:
            check_mode(mode, trained.method.name)
    identity = sweep_identity(recipe, loaded.model, trained.sha256 if trained else None,
                              trained.init_from if trained else None, prepared.manifest["content_hash"])
    sweep = Sweep(recipe, prepared, loaded, trained, out, console, {name: identity[name] for name in BINDING},
                  None if loaded.is_encoder_decoder else NewlineTable(loaded.tokenizer), state)
    # one process writes a sweep directory at a time
    with RunLock(out, "adapt.output_dir") if main else contextlib.nullcontext():
        with state.main_process_first():  # the others read the results once the main one has repaired them
            finished = _finished(out, cells, identity, cfg.keep_adapters, main, console)
        done = {row["key"] for row in finished}
        todo = [c for c in cells if c.key not in done]
        console.print(f"adapt: {len(cells)} cells ({len(cells) - len(todo)} already done) -> {out}")
        # measured for every task a cell trains on; warned about once every check has passed, for cells to run
        trained_on = _trained_tasks([*(Cell(row["task"], row["mode"], 0, 0) for row in finished), *cells])
        shifts = pool_shifts(recipe, prepared, trained_on, _trained_tasks(todo)) if main else {}
        if todo and main:
            atomic_write_json(out / SWEEP, identity)
        _run_cells(todo, sweep)
        state.wait_for_everyone()
        if not main:
            return None
        atomic_write_text(out / "recipe.yaml", dump_recipe(recipe))
        if shifts:
            atomic_write_json(out / POOL_SHIFT, shifts)
    return out
