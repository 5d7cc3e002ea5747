"""Loading adapter checkpoints (ours, or peft LoRA / Poly) onto a base model.

Everything is checked before the base model is touched: the config, the base model summary, and
every tensor's name and shape against what the method would build (computed on the meta device).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor
from transformers import PreTrainedModel

from orchmoe_cli.adapters.budget import adapter_layout, hidden_size, resolve
from orchmoe_cli.adapters.files import (
    CONFIG_FILE,
    FORMAT,
    WEIGHTS_FILE,
    base_summary,
    check_tensors,
    read_json,
    read_task_names,
    read_tensors,
    same_base,
)
from orchmoe_cli.adapters.method_config import MethodConfig
from orchmoe_cli.adapters.model import AdaptedModel, attach_adapters
from orchmoe_cli.adapters.peft_interop import read_peft_checkpoint
from orchmoe_cli.errors import FieldError, OrchmoeError
from orchmoe_cli.schema import build

FORMAT_VERSION = 1


@dataclass(frozen=True)
class SavedAdapter:
    """A checkpoint's contents as read from its files, checked but not yet attached to any model."""

    method: MethodConfig
    tasks: list[str]
    tensors: dict[str, Tensor]
    averaged: bool
    base_model: dict[str, Any]  # the summary of the base model it was trained on (empty for peft)
    adapted_tasks: list[str] = field(default_factory=list)  # tasks added by `orchmoe adapt`, not trained on


def _read_own(directory: Path, config: dict[str, Any]) -> SavedAdapter:
    source = directory / CONFIG_FILE
    if config.get("format") != FORMAT:
        raise OrchmoeError(f"{source}: not an orchmoe adapter checkpoint (format '{config.get('format')}')")
    version = config.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise OrchmoeError(f"{source}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise OrchmoeError(f"{source}: written by a newer orchmoe (format version {config['format_version']}); "
                           "upgrade orchmoe to load it")
    raw = config.get("method")
    if not isinstance(raw, dict):
        raise OrchmoeError(f"{source}: 'method' must be a mapping of method settings")
    method = build(MethodConfig, raw, str(source), prefix="method.")
    summary = config.get("base_model") or {}
    if not isinstance(summary, dict):
        raise OrchmoeError(f"{source}: base_model must be a mapping describing the base model, got {summary!r}")
    tasks = read_task_names(directory)
    adapted = config.get("adapted_tasks") or []
    if not isinstance(adapted, list) or not set(adapted) <= set(tasks):
        raise OrchmoeError(f"{source}: adapted_tasks must list some of the checkpoint's tasks, got {adapted!r}")
    return SavedAdapter(method, tasks, read_tensors(directory), bool(config.get("averaged", False)), summary,
                        adapted)


def _method(source: Path, **fields: Any) -> MethodConfig:
    try:
        return MethodConfig(**fields)
    except FieldError as exc:
        raise OrchmoeError(f"{source}: {exc.field}: {exc.message}") from None


def read_checkpoint(checkpoint_dir: str | Path) -> SavedAdapter:
    """Read an adapter checkpoint (ours, or a peft LoRA / Poly one) without any base model: enough to inspect
    its routing; ``load_adapted`` also checks it against the base model and attaches it."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise OrchmoeError(f"{directory}: checkpoint directory not found")
    config = read_json(directory / CONFIG_FILE)
    if not isinstance(config, dict):
        raise OrchmoeError(f"{directory / CONFIG_FILE}: expected a JSON object")
    if "peft_type" in config and "format" not in config:
        fields, tasks, tensors = read_peft_checkpoint(directory, config)
        method = _method(directory / CONFIG_FILE, **fields)
        saved = SavedAdapter(method, tasks, tensors, False, {})
    else:
        saved = _read_own(directory, config)
    if saved.method.name == "none":
        raise OrchmoeError(f"{directory / CONFIG_FILE}: method.name is 'none'; there are no adapters to load")
    return saved


def check_saved_base(base: PreTrainedModel, directory: Path) -> None:
    """Refuse the adapters saved in ``directory`` when ``base`` is not the model they were trained on (resuming
    reads the weights without :func:`load_adapted`, so it checks here)."""
    config = read_json(directory / CONFIG_FILE)
    _check_base(base, (config.get("base_model") or {}) if isinstance(config, dict) else {}, directory)


def _check_base(base: PreTrainedModel, summary: dict[str, Any], directory: Path) -> None:
    problem = same_base(summary, base_summary(base))
    if problem is not None:
        raise OrchmoeError(f"{directory / CONFIG_FILE}: {problem}; load the adapters onto the model they were "
                           "trained with")


def _check_tensors(base: PreTrainedModel, method: MethodConfig, tasks: list[str], tensors: dict[str, Tensor],
                   averaged: bool, directory: Path) -> None:
    source = directory / WEIGHTS_FILE
    try:
        layout = adapter_layout(base, resolve(method, hidden_size(base)), len(tasks))
    except OrchmoeError as exc:
        raise OrchmoeError(f"{directory / CONFIG_FILE}: {exc}") from None
    expected = {name: shape for name, (shape, group) in layout.items() if not (averaged and group == "routers")}
    check_tensors(expected, tensors, str(source), method.name,
                  "; is this checkpoint for another method or base model?")


def load_adapted(base: PreTrainedModel, checkpoint_dir: str | Path) -> AdaptedModel:
    """Attach the adapters saved in ``checkpoint_dir`` (ours, or a peft LoRA / Poly checkpoint) to ``base``."""
    directory = Path(checkpoint_dir)
    saved = read_checkpoint(directory)
    _check_base(base, saved.base_model, directory)
    fixed_rank = dataclasses.replace(saved.method, budget=None)  # the saved rank is already the budget's choice
    _check_tensors(base, fixed_rank, saved.tasks, saved.tensors, saved.averaged, directory)
    model = attach_adapters(base, fixed_rank, saved.tasks)
    model.method = dataclasses.replace(model.method, budget=saved.method.budget)
    if saved.averaged:
        model.to_average()
    model.load_adapter_state_dict(saved.tensors, str(directory / WEIGHTS_FILE))
    model.adapted_tasks = list(saved.adapted_tasks)
    return model
