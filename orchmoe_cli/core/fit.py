"""The training loop every command shares: `orchmoe train` runs it on all training tasks, and
few-shot adaptation on a few dozen rows of one new task. Readable top to bottom.

One process on one CPU, or many under ``accelerate launch`` / ``torchrun``: every process builds
the same global batch from (seed, batch index) and keeps its slice; only the main process
writes. Checkpoints are atomic and resume is exact (optimizer, scheduler, RNG, batch index).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import gather_object, set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from orchmoe_cli.adapters import AdaptedModel
from orchmoe_cli.adapters.files import read_task_names, read_tensors
from orchmoe_cli.adapters.loading import check_saved_base
from orchmoe_cli.adapters.registry import MethodSpec
from orchmoe_cli.core import checkpoint as ckpt
from orchmoe_cli.core.base_models import resolve_precision
from orchmoe_cli.core.resuming import check_unchanged, latest_complete
from orchmoe_cli.core.run_lock import RunLock
from orchmoe_cli.core.sampling import TaskBatchSampler
from orchmoe_cli.core.state_files import capture_rng, restore_rng
from orchmoe_cli.core.steps import Batches, micro_step, validation_loss
from orchmoe_cli.core.training_log import MetricsLogger, plot_loss_curve, read_metrics
from orchmoe_cli.data.rows import TaskRows
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.fsutil import atomic_write_json, atomic_write_text
from orchmoe_cli.paths import claim_directory
from orchmoe_cli.recipe import TRACKERS, TrainConfig

_LR_FIELD = {"adapters": "lr", "routers": "router_lr", "hypernetwork": "hypernetwork_lr", "other": "lr"}

log = logging.getLogger(__name__)


@dataclass
class FitOutcome:
    run_dir: Path | None
    final_checkpoint: Path | None
    step: int
    interrupted: bool
    is_main_process: bool


class _Interrupt:
    """SIGINT (Ctrl-C) and SIGTERM (kill, docker stop, SLURM, Kubernetes) set a flag; the loop saves a
    checkpoint at the next step boundary and stops. A second signal stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Interrupt:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def preflight(cfg: TrainConfig, run_dir: Path, resume: bool) -> None:
    """Checks that need no data or model, run before any heavy work and before anything is written."""
    for tracker in cfg.trackers:
        if importlib.util.find_spec(TRACKERS[tracker]) is None:
            raise OrchmoeError(f"the {TRACKERS[tracker]} package is not installed; pip install {TRACKERS[tracker]}, "
                               f"or leave {tracker} out", field="train.report_to")
    claim_directory(run_dir, "output.dir", "train")
    read_metrics(run_dir / "metrics.jsonl")  # rows are appended to it and drawn from it: ours, or refused now
    existing = ckpt.step_directories(run_dir)
    # each refusal below first asks the run lock: a run still starting, not what the directory holds, may be why
    if not resume and cfg.resume != "auto" and existing:
        RunLock(run_dir).refuse_if_in_use()
        latest_complete(run_dir)  # only damaged ones: say how to go on, not "pass --resume"
        raise OrchmoeError(f"{run_dir} already holds checkpoints up to {existing[0].name}; pass --resume (or "
                           "train.resume: auto) to continue them, or choose another output.dir")
    if resume and not existing:
        RunLock(run_dir).refuse_if_in_use()
        raise OrchmoeError(f"{run_dir}: --resume given but it holds no checkpoint; run without --resume")


def make_accelerator(cfg: TrainConfig, spec: MethodSpec, run_dir: Path | None = None,
                     half_base: bool = False) -> Accelerator:
    """The run's accelerator, with every RNG seeded (``train.seed`` + rank) so what is built next is reproducible.

    CPU-only machines need ``cpu=True`` for real multi-process (gloo) training. Only methods that may
    leave parameters untouched in a step pay DDP's unused-parameter search. With a ``run_dir``, the recipe's
    trackers (``train.report_to``) log through accelerate, local ones under ``run_dir/trackers``."""
    for variable, what in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP"),
                           ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM")):
        if os.environ.get(variable, "").lower() in ("1", "true"):
            raise OrchmoeError(f"{what} is not supported yet; orchmoe trains data-parallel (DDP): accelerate launch "
                               "--config_file recipes/accelerate/multi_gpu.yaml --num_processes N -m orchmoe_cli "
                               "train RECIPE")
    use_cuda = torch.cuda.is_available()
    precision = resolve_precision(cfg.mixed_precision, half_base, use_cuda)
    trackers = cfg.trackers if run_dir is not None else []
    accelerator = Accelerator(
        cpu=not use_cuda, mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=spec.may_skip_parameters)],
        log_with=trackers or None, project_dir=str(Path(run_dir) / "trackers") if trackers else None,
    )
    if cfg.deterministic:  # cuBLAS refuses deterministic mode without a fixed workspace (CUDA >= 10.2)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    set_seed(cfg.seed + accelerator.process_index, deterministic=cfg.deterministic)
    torch.use_deterministic_algorithms(cfg.deterministic)  # also off again after an earlier deterministic run
    return accelerator


def enable_checkpointing(model: AdaptedModel) -> None:
    """Non-reentrant activation checkpointing of the base model's blocks. Routing is computed once per forward,
    outside the blocks, and stays in the slot through backward, so recomputed blocks route exactly as before."""
    if not getattr(model.base, "supports_gradient_checkpointing", False):
        raise OrchmoeError(f"{type(model.base).__name__} does not support gradient checkpointing in transformers",
                           field="train.gradient_checkpointing")
    model.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.base.config.use_cache = False


def build_optimizer(model: AdaptedModel, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with one parameter group (and learning rate) per kind: skills, routers, hypernetwork. Groups of
    tables of which only some rows may move (``<group>/rows``) train without weight decay."""
    groups = [
        {"params": params, "lr": getattr(cfg, _LR_FIELD[name.partition("/")[0]]), "name": name,
         "weight_decay": 0.0 if name.endswith("/rows") else cfg.weight_decay}
        for name, params in model.parameter_groups().items() if params
    ]
    if not groups:
        raise OrchmoeError("the method has no trainable parameters; choose an adapter method to train",
                           field="method.name")
    optimizer = torch.optim.AdamW(groups, fused=True)  # one kernel for all tensors: much faster on CPU too
    if cfg.schedule == "linear":
        scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)
    return optimizer, scheduler


def replica_checksum(model: AdaptedModel) -> str:
    """A digest of the adapter tensors: equal on every process when data-parallel training stayed in sync."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.adapter_state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _resume(run_dir: Path, model: AdaptedModel, optimizer: Any, scheduler: Any, accelerator: Accelerator,
            console: Console, required: bool, cfg: TrainConfig, recipe_yaml: str) -> tuple[int, int, Path | None]:
    """Restore adapter, optimizer, scheduler and this process's RNG from the newest complete checkpoint.

    Returns (step, batch index, checkpoint); (0, 0, None) when there is none and ``required`` is false."""
    latest = latest_complete(run_dir)
    if latest is None:
        if required:
            raise OrchmoeError(f"{run_dir}: --resume given but it holds no complete checkpoint; run without --resume")
        return 0, 0, None
    saved_tasks = read_task_names(latest)  # another task list is another run: said before any setting
    if saved_tasks != model.task_names:
        differing = next((f"position {i}: '{a}' in the checkpoint, '{b}' now"
                          for i, (a, b) in enumerate(zip(saved_tasks, model.task_names)) if a != b),
                         f"{len(saved_tasks)} tasks in the checkpoint, {len(model.task_names)} now")
        raise OrchmoeError(f"{latest}: was trained on other tasks than this run's ({differing}); resume with the "
                           "same training tasks or choose another output.dir")
    check_unchanged(latest, cfg, recipe_yaml)
    check_saved_base(model.base, latest)
    state = ckpt.load_training_state(latest, optimizer, scheduler)
    model.load_adapter_state_dict(read_tensors(latest), str(latest))
    if accelerator.scaler is not None and state.extra.get("grad_scaler"):
        accelerator.scaler.load_state_dict(state.extra["grad_scaler"])
    per_rank = state.extra.get("rng_by_rank") or [state.rng]
    if len(per_rank) == accelerator.num_processes:
        restore_rng(per_rank[accelerator.process_index])
    else:  # each process's stream cannot continue: start distinct ones from (seed, step, rank)
        set_seed(hash((cfg.seed, state.step, accelerator.process_index)) % 2**32)
        if accelerator.is_main_process:
            log.warning("%s was saved by %d process(es) and resumes on %d: training goes on, but its random draws "
                        "(dropout, Gumbel noise) and global batches differ from a run that was never interrupted",
                        latest, len(per_rank), accelerator.num_processes)
    console.print(f"resumed from {latest} at step {state.step}")
    return state.step, int(state.sampler_state["batch_index"]), latest


def fit(model: AdaptedModel, rows: TaskRows, cfg: TrainConfig, run_dir: Path | None, accelerator: Accelerator, *,
        pad_id: int, causal: bool, recipe_yaml: str, console: Console,
        val_rows: TaskRows | None = None, resume: bool = False,
        validate: Callable[[Any, int], dict[str, float]] | None = None) -> FitOutcome:
    """Train ``model``'s trainable tensors on ``rows`` for ``cfg.steps`` optimizer steps, checkpointing into
    ``run_dir/checkpoints`` (resumable, atomic) and logging to ``run_dir/metrics.jsonl``. With ``run_dir``
    None nothing is written: the trained tensors stay in ``model`` (a few-shot cell keeps them in memory).

    ``validate(model, step)`` (default: the token loss on ``val_rows``) runs every ``cfg.eval_every`` steps
    and at the end; its numbers are logged. The caller built and seeded the accelerator and the model."""
    is_main = accelerator.is_main_process
    console = console if is_main else Console(quiet=True)
    run_dir = None if run_dir is None else Path(run_dir)
    if run_dir is not None:
        preflight(cfg, run_dir, resume)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    optimizer, scheduler = build_optimizer(model, cfg)
    sampler = TaskBatchSampler(rows.task_codes.tolist(), cfg.batch_size * accelerator.num_processes,
                               cfg.task_sampling, cfg.seed, cfg.sampling_temperature,
                               rows.lengths().tolist() if cfg.group_by_length else None)
    batches = Batches(model, rows, pad_id, causal, accelerator)
    if validate is None and val_rows is not None and len(val_rows):
        val_batches = Batches(model, val_rows, pad_id, causal, accelerator)
        validate = lambda m, step: {"val_loss": validation_loss(m, val_batches, cfg.batch_size)}  # noqa: E731
    lock = RunLock(run_dir) if is_main and run_dir is not None else None
    if lock is not None:
        lock.acquire()
    try:
        step, batch_index, latest = 0, 0, None
        if run_dir is not None and (resume or cfg.resume == "auto"):
            step, batch_index, latest = _resume(run_dir, model, optimizer, scheduler, accelerator, console,
                                                required=resume, cfg=cfg, recipe_yaml=recipe_yaml)
        if step >= cfg.steps:  # nothing left to train: write nothing
            console.print(f"{latest} is at step {step}, train.steps is {cfg.steps}: nothing to do")
            return FitOutcome(run_dir, latest, step, False, is_main)
        prepared, optimizer = accelerator.prepare(model, optimizer)
        return _loop(cfg, console, accelerator, model, prepared, optimizer, scheduler, sampler, batches,
                     validate, step, batch_index, run_dir, recipe_yaml)
    finally:
        if lock is not None:
            lock.release()


def _loop(cfg: TrainConfig, console: Console, accelerator: Accelerator, unwrapped: AdaptedModel,
          model: Any, optimizer: Any, scheduler: Any, sampler: TaskBatchSampler, batches: Batches,
          validate: Callable[[Any, int], dict[str, float]] | None, step: int, batch_index: int, run_dir: Path | None,
          recipe_yaml: str) -> FitOutcome:
    writes = run_dir is not None
    logger = MetricsLogger(run_dir or Path(), enabled=accelerator.is_main_process and writes)
    tracking = writes and bool(accelerator.log_with)
    if tracking:
        assert run_dir is not None
        accelerator.init_trackers(run_dir.name, config=flat_config(recipe_yaml))
    progress = Progress(
        TextColumn("[bold]train[/bold]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
        TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
        disable=not accelerator.is_main_process,
    )
    interrupted, last_path = False, None
    tokens, started = torch.zeros((), dtype=torch.long, device=accelerator.device), time.perf_counter()
    with _Interrupt() as interrupt, progress:
        bar = progress.add_task("train", total=cfg.steps, completed=step, stats="")
        model.train()
        while step < cfg.steps:
            # kept as tensors: the host reads the device only when it logs or saves, not at every micro-step
            losses: dict[str, torch.Tensor] = {}
            micro = []
            for _ in range(cfg.grad_accum):  # the step's batches first: the loss weighs each by its share of tokens
                micro.append(batches(batches.mine(sampler.batch(batch_index)), sampler.reference_rng(batch_index)))
                batch_index += 1
            own_tokens = max(sum(n for _, n in micro), 1)
            step_tokens: int | torch.Tensor = own_tokens  # on several processes a device tensor: no host wait
            if accelerator.num_processes > 1:
                step_tokens = accelerator.reduce(torch.tensor(own_tokens, device=accelerator.device), "sum")
            token_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
            for batch, _ in micro:
                tokens += batch["attention_mask"].sum()
                with accelerator.accumulate(model):
                    batch_sum, output = micro_step(accelerator, model, batch, step_tokens, batches.causal,
                                                   cfg.label_smoothing)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                token_sum += batch_sum.detach().double()
                aux = output.get("aux_losses") or {}
                for name, value in aux.items():
                    losses[name] = losses.get(name, 0.0) + value.detach().double() / cfg.grad_accum
            losses["lm_loss"] = token_sum / own_tokens
            losses["loss"] = losses["lm_loss"] + sum(losses[name] for name in aux)
            scheduler.step()
            step += 1
            progress.update(bar, completed=step)
            saves = writes and (step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0)
                                or step in cfg.keep_steps or interrupt.requested)
            logs = step % cfg.log_every == 0 or step == cfg.steps
            if logs or saves:
                values = _finite(losses, step)  # never a checkpoint of diverged weights
            if logs:
                elapsed = time.perf_counter() - started
                lr = scheduler.get_last_lr()[0]
                speed = int(tokens) * accelerator.num_processes / max(elapsed, 1e-9)
                diagnostics = unwrapped.routing_diagnostics(output)
                stats = f"loss {values['loss']:.3f} · lr {lr:.2e} · {speed:,.0f} tok/s"
                if "router_entropy" in diagnostics:
                    stats += f" · H(t|x) {diagnostics['router_entropy']:.2f}"
                progress.update(bar, stats=stats)
                row = {**values, **diagnostics, "lr": lr, "tokens_per_s": speed}
                logger.log({"step": step, **row})
                if tracking:
                    accelerator.log(row, step=step)
            if validate is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                validation = validate(model, step)
                logger.log({"step": step, **validation})
                if tracking:
                    accelerator.log(validation, step=step)
            if saves:
                last_path = _save(run_dir, step, batch_index, unwrapped, recipe_yaml, optimizer, scheduler,
                                  accelerator, cfg)
            if interrupt.requested:
                interrupted = True
                break
    logger.close()
    if tracking:
        accelerator.end_training()
    if run_dir is not None:
        _write_summary(run_dir, accelerator, unwrapped, step, interrupted, last_path, recipe_yaml)
    return FitOutcome(run_dir, last_path, step, interrupted, accelerator.is_main_process)


def flat_config(recipe_yaml: str) -> dict[str, Any]:
    """The recipe as one level of dotted keys with scalar values, as trackers' hyperparameter tables want them."""
    flat: dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(inner, f"{prefix}{key}.")
        else:
            flat[prefix.rstrip(".")] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk(yaml.safe_load(recipe_yaml) or {}, "")
    return flat


def _finite(losses: dict[str, torch.Tensor], step: int) -> dict[str, float]:
    """The step's losses as numbers; one line if training diverged."""
    values = {name: float(value) for name, value in losses.items()}
    if not all(math.isfinite(v) for v in values.values()):
        raise OrchmoeError(f"loss became {values['loss']} at step {step} or before; lower train.lr", field="train")
    return values


def _save(run_dir: Path, step: int, batch_index: int, model: AdaptedModel, recipe_yaml: str, optimizer: Any,
          scheduler: Any, accelerator: Accelerator, cfg: TrainConfig) -> Path | None:
    """Main process writes; every process's RNG state goes in, so each resumes its own stream."""
    accelerator.wait_for_everyone()
    extra: dict[str, Any] = {}
    if accelerator.num_processes > 1:
        extra["rng_by_rank"] = gather_object([capture_rng()])
    if accelerator.scaler is not None:  # fp16's loss scale: resuming goes on with it, not from 65536 again
        extra["grad_scaler"] = accelerator.scaler.state_dict()
    path = None
    if accelerator.is_main_process:
        path = ckpt.save_checkpoint(run_dir, step, model.save, recipe_yaml, optimizer, scheduler,
                                    {"batch_index": batch_index}, extra=extra, keep_last=cfg.keep_last,
                                    keep_steps=cfg.keep_steps)
    accelerator.wait_for_everyone()
    return path


def _write_summary(run_dir: Path, accelerator: Accelerator, model: AdaptedModel, step: int, interrupted: bool,
                   last_path: Path | None, recipe_yaml: str) -> None:
    """The loss curve, the recipe used and ``train_summary.json``; fails loudly if replicas drifted apart."""
    checksums = gather_object([replica_checksum(model)])
    if not accelerator.is_main_process:
        return
    plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    atomic_write_text(run_dir / "recipe.yaml", recipe_yaml)
    summary = {"step": step, "interrupted": interrupted, "checkpoint": str(last_path) if last_path else None,
               "processes": accelerator.num_processes, "replicas_in_sync": len(set(checksums)) == 1,
               "adapter_checksums": checksums, "parameters": model.count_parameters(),
               "rank": model.method.rank, "lora_scale": model.lora_scale}
    atomic_write_json(run_dir / "train_summary.json", summary)
    if not summary["replicas_in_sync"]:
        raise RuntimeError(f"{run_dir}: processes ended with different adapter weights")
