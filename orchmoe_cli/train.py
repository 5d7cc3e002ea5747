"""`orchmoe train`: multi-task adapter training on accelerate, readable top to bottom.

One process on one CPU, or many under ``accelerate launch`` / ``torchrun``: every process builds
the same global batch from (seed, batch index) and keeps its slice; only the main process
writes. Checkpoints are atomic and resume is exact (optimizer, scheduler, RNG, batch index).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import gather_object, set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from orchmoe_cli import checkpoint as ckpt
from orchmoe_cli.adapters import AdaptedModel, attach_adapters
from orchmoe_cli.adapters.files import read_tensors
from orchmoe_cli.data.collate import TrainCollator, pad_token_id
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.fsutil import atomic_write_text
from orchmoe_cli.models import load_model
from orchmoe_cli.recipe import Recipe, TrainConfig, dump_recipe
from orchmoe_cli.sampling import TaskBatchSampler
from orchmoe_cli.train_logging import MetricsLogger, plot_loss_curve
from orchmoe_cli.workflow import prepare_data

_LR_FIELD = {"adapters": "lr", "routers": "router_lr", "hypernetwork": "hypernetwork_lr", "other": "lr"}


@dataclass
class TrainOutcome:
    run_dir: Path
    final_checkpoint: Path
    step: int
    interrupted: bool
    is_main_process: bool


class _Interrupt:
    """SIGINT sets a flag; the loop saves a checkpoint at the next step boundary and stops."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _Interrupt:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGINT, self._previous)


def make_accelerator(cfg: TrainConfig, method: str) -> Accelerator:
    """CPU-only machines need ``cpu=True`` for real multi-process (gloo) training.

    Only HyperLoader has parameters a step may not touch (generators of positions a model lacks),
    so only it pays DDP's unused-parameter search."""
    use_cuda = torch.cuda.is_available()
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if use_cuda and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(
        cpu=not use_cuda, mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=method == "hyperloader")],
    )


def build_optimizer(model: AdaptedModel, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with one parameter group (and learning rate) per kind: skills, routers, hypernetwork."""
    groups = [
        {"params": params, "lr": getattr(cfg, _LR_FIELD[name]), "weight_decay": cfg.weight_decay, "name": name}
        for name, params in model.parameter_groups().items() if params
    ]
    if not groups:
        raise OrchmoeError("method.name: the method has no trainable parameters; choose an adapter method to train")
    optimizer = torch.optim.AdamW(groups, fused=True)  # one kernel for all tensors: much faster on CPU too
    if cfg.schedule == "linear":
        scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)
    return optimizer, scheduler


def lm_loss(model: Any, batch: dict[str, torch.Tensor], causal: bool, label_smoothing: float) -> torch.Tensor:
    """Mean cross-entropy over target tokens (-100 ignored).

    Decoder-only models compute logits only at positions that predict an answer token: the answer is
    a few tokens of a long prompt, and the vocabulary projection is a large share of a small model's cost.
    """
    labels = batch["labels"]
    if causal:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        keep = (labels[:, 1:] != -100).any(dim=0).nonzero().squeeze(-1)  # position i predicts token i + 1
        logits = model(**inputs, logits_to_keep=keep).logits
        labels = labels[:, keep + 1]
    else:
        logits = model(**batch).logits
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100,
        label_smoothing=label_smoothing,
    )


def _split_rows(rows: list[int], accelerator: Accelerator) -> list[int]:
    return rows[accelerator.process_index :: accelerator.num_processes]


def _validation_loss(model: Any, val_rows: list[dict], cfg: TrainConfig, pad_id: int, causal: bool,
                     accelerator: Accelerator) -> float:
    """Mean token loss over the validation slice (each process scores its share, then averaged)."""
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    mine = _split_rows(list(range(len(val_rows))), accelerator)
    with torch.no_grad():
        for start in range(0, len(mine), cfg.batch_size):
            rows = [val_rows[i] for i in mine[start : start + cfg.batch_size]]
            batch = TrainCollator(pad_id, not causal, random.Random(0))(rows)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            total += lm_loss(model, batch, causal, 0.0) * len(rows)
            count += len(rows)
    model.train()
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    return float(total / count.clamp(min=1))


def train(recipe: Recipe, source: str, console: Console, resume: bool = False) -> TrainOutcome:
    cfg = recipe.train
    if recipe.method.name == "none":
        raise OrchmoeError(f"{source}: method.name: 'none' has nothing to train; pick lora, poly, mhr, orchmoe, ...")
    run_dir = Path(recipe.output.dir)
    if resume and not (run_dir / ckpt.CHECKPOINTS).is_dir():
        raise OrchmoeError(f"{run_dir}: --resume given but it holds no checkpoint; run without --resume")
    accelerator = make_accelerator(cfg, recipe.method.name)
    is_main = accelerator.is_main_process
    console = console if is_main else Console(quiet=True)
    set_seed(cfg.seed + accelerator.process_index, deterministic=cfg.deterministic)

    with accelerator.main_process_first():
        prepared = prepare_data(recipe, source, console)
    task_names = [t["name"] for t in prepared.manifest["tasks"] if t["split"] == "train"]
    split = prepared.dataset["train"]
    rows = split.select_columns(["task_index", "prompt_ids", "reference_ids", "category"]).to_list()
    val_rows = [r for i, r in enumerate(rows) if _is_validation(rows, i, cfg.val_instances)]
    train_rows = [r for i, r in enumerate(rows) if not _is_validation(rows, i, cfg.val_instances)]

    loaded = load_model(recipe.model)
    causal = not loaded.is_encoder_decoder
    model = attach_adapters(loaded.model, recipe.method, task_names)
    model.train()
    optimizer, scheduler = build_optimizer(model, cfg)
    counts = model.count_parameters()
    console.print(
        f"[bold]{recipe.method.name}[/bold] on {recipe.model.name}: {counts['total_trainable']:,} trainable "
        f"({', '.join(f'{k} {v:,}' for k, v in counts.items() if k not in ('total_trainable', 'base') and v)}), "
        f"{len(task_names)} tasks, {len(train_rows)} training rows, {accelerator.num_processes} process(es) on "
        f"{accelerator.device}"
    )

    sampler = TaskBatchSampler(
        [r["task_index"] for r in train_rows], cfg.batch_size * accelerator.num_processes, cfg.task_sampling,
        cfg.seed, cfg.sampling_temperature,
    )
    lock = ckpt.RunLock(run_dir) if is_main else None
    if lock is not None:
        lock.acquire()
    try:
        step = 0
        if resume or cfg.resume == "auto":
            step = _resume(run_dir, model, optimizer, scheduler, accelerator, console, required=resume)
        model, optimizer = accelerator.prepare(model, optimizer)
        return _loop(recipe, source, console, accelerator, model, optimizer, scheduler, sampler, train_rows,
                     val_rows, loaded.tokenizer, causal, step, run_dir)
    finally:
        if lock is not None:
            lock.release()


def _resume(run_dir: Path, model: AdaptedModel, optimizer: Any, scheduler: Any, accelerator: Accelerator,
            console: Console, required: bool) -> int:
    """Restore adapter, optimizer, scheduler and this process's RNG from the newest complete checkpoint."""
    try:
        latest = ckpt.latest_checkpoint(run_dir)
    except OrchmoeError as exc:  # checkpoints exist but none is complete
        raise OrchmoeError(f"{exc}; fix or delete it, or run without --resume / train.resume: auto") from None
    if latest is None:
        if required:
            raise OrchmoeError(f"{run_dir}: --resume given but it holds no complete checkpoint; run without --resume")
        return 0
    state = ckpt.load_training_state(latest, optimizer, scheduler)
    model.load_adapter_state_dict(read_tensors(latest), str(latest))
    per_rank = state.extra.get("rng_by_rank")
    ckpt.restore_rng(per_rank[accelerator.process_index] if per_rank else state.rng)
    console.print(f"resumed from {latest} at step {state.step}")
    return state.step


def _category_index(recipe: Recipe, rows: list[dict]) -> dict[str, int]:
    """Category -> abstract-task index, when OrchMoE's optional supervised term is on."""
    if recipe.method.name != "orchmoe" or recipe.method.task_supervision_weight == 0:
        return {}
    categories = sorted({r["category"] for r in rows})
    if len(categories) > recipe.method.n_abstract_tasks:
        raise OrchmoeError(
            f"method.n_abstract_tasks: task supervision maps {len(categories)} training categories onto abstract "
            f"tasks; set n_abstract_tasks >= {len(categories)} or task_supervision_weight: 0"
        )
    return {c: i for i, c in enumerate(categories)}


def replica_checksum(model: AdaptedModel) -> str:
    """A digest of the adapter tensors: equal on every process when data-parallel training stayed in sync."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.adapter_state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _is_validation(rows: list[dict], index: int, per_task: int) -> bool:
    """The first ``per_task`` rows of each task form the validation slice."""
    if per_task == 0:
        return False
    task = rows[index]["task_index"]
    return sum(1 for r in rows[:index] if r["task_index"] == task) < per_task


def _loop(recipe: Recipe, source: str, console: Console, accelerator: Accelerator, model: Any, optimizer: Any,
          scheduler: Any, sampler: TaskBatchSampler, train_rows: list[dict], val_rows: list[dict], tokenizer: Any,
          causal: bool, start_step: int, run_dir: Path) -> TrainOutcome:
    cfg = recipe.train
    pad_id = pad_token_id(tokenizer)
    unwrapped: AdaptedModel = accelerator.unwrap_model(model)
    logger = MetricsLogger(run_dir, enabled=accelerator.is_main_process, tensorboard=cfg.tensorboard)
    recipe_yaml = dump_recipe(recipe)
    category_index = _category_index(recipe, train_rows)

    def save(step: int) -> Path | None:
        """Main process writes; every process's RNG state goes in, so each resumes its own stream."""
        accelerator.wait_for_everyone()
        extra = {}
        if accelerator.num_processes > 1:
            extra["rng_by_rank"] = gather_object([ckpt.capture_rng()])
        path = None
        if accelerator.is_main_process:
            path = ckpt.save_checkpoint(
                run_dir, step, unwrapped.save, recipe_yaml, optimizer, scheduler,
                {"batch_index": step * cfg.grad_accum}, extra=extra, keep_last=cfg.keep_last,
            )
        accelerator.wait_for_everyone()
        return path

    progress = Progress(
        TextColumn("[bold]train[/bold]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
        TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False, disable=not accelerator.is_main_process,
    )
    step, interrupted, last_path = start_step, False, None
    tokens, started = 0, time.perf_counter()
    with _Interrupt() as interrupt, progress:
        bar = progress.add_task("train", total=cfg.steps, completed=step, stats="")
        model.train()
        while step < cfg.steps:
            losses: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                batch_index = step * cfg.grad_accum + micro
                rows = [train_rows[i] for i in _split_rows(sampler.batch(batch_index), accelerator)]
                batch = TrainCollator(pad_id, not causal, sampler.reference_rng(batch_index))(rows)
                if category_index:
                    batch["category_ids"] = torch.tensor([category_index[r["category"]] for r in rows])
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
                with accelerator.accumulate(model):
                    token_loss = lm_loss(model, batch, causal, cfg.label_smoothing)
                    aux = unwrapped.aux_losses()
                    loss = token_loss + sum(aux.values(), torch.zeros((), device=token_loss.device))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for name, value in {"loss": loss, "lm_loss": token_loss, **aux}.items():
                    losses[name] = losses.get(name, 0.0) + float(value.detach()) / cfg.grad_accum
            scheduler.step()
            step += 1
            if not all(math.isfinite(v) for v in losses.values()):
                raise OrchmoeError(f"{source}: train: loss became {losses['loss']} at step {step}; lower train.lr")
            elapsed = time.perf_counter() - started
            lr = scheduler.get_last_lr()[0]
            stats = f"loss {losses['loss']:.3f} · lr {lr:.2e} · {tokens / max(elapsed, 1e-9):,.0f} tok/s"
            progress.update(bar, completed=step, stats=stats)
            if step % cfg.log_every == 0 or step == cfg.steps:
                logger.log({"step": step, **losses, "lr": lr, "tokens_per_s": tokens / max(elapsed, 1e-9)})
            if val_rows and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                logger.log({"step": step, "val_loss": _validation_loss(model, val_rows, cfg, pad_id, causal, accelerator)})
            if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0) or interrupt.requested:
                last_path = save(step)
            if interrupt.requested:
                interrupted = True
                break
    logger.close()
    checksums = gather_object([replica_checksum(unwrapped)])
    if accelerator.is_main_process:
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
        atomic_write_text(run_dir / "recipe.yaml", recipe_yaml)
        summary = {"step": step, "interrupted": interrupted, "checkpoint": str(last_path) if last_path else None,
                   "processes": accelerator.num_processes, "replicas_in_sync": len(set(checksums)) == 1,
                   "adapter_checksums": checksums, "parameters": unwrapped.count_parameters()}
        atomic_write_text(run_dir / "train_summary.json", json.dumps(summary, indent=2) + "\n")
        if not summary["replicas_in_sync"]:
            raise RuntimeError(f"{run_dir}: processes ended with different adapter weights")
    return TrainOutcome(run_dir, last_path or run_dir, step, interrupted, accelerator.is_main_process)
