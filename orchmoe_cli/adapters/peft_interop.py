"""peft interop: export lora / poly / mhr as real peft checkpoints; read peft LoRA and Poly checkpoints.

Layouts are identical up to naming and transposes: peft LoRA stores A (r, d_in) and B (d_out, r);
peft Poly stores A (h, S, d_in/h, r), B (h, S, r, d_out/h) and per-layer ``module_logits`` exactly
as ours. peft Poly scales by 1/r, so our alpha is folded into B on export (exact: B enters the
mixture linearly). What peft cannot express is refused: the µ average, straight-through routing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from orchmoe_cli.adapters.context import RoutingState
from orchmoe_cli.adapters.files import (
    CONFIG_FILE,
    TASKS_FILE,
    WEIGHTS_FILE,
    read_task_names,
    read_tensors,
    write_tensors,
)
from orchmoe_cli.adapters.layer import SkillLoRALinear
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.fsutil import atomic_write_json

if TYPE_CHECKING:
    from peft import LoraConfig, PolyConfig

    from orchmoe_cli.adapters.model import AdaptedModel

PREFIX = "base_model.model."  # peft's key prefix for the wrapped model
_LORA_OPTIONS = ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias", "rank_pattern", "alpha_pattern",
                 "modules_to_save", "layer_replication")


def _layers(model: AdaptedModel) -> dict[str, SkillLoRALinear]:
    return {name.removeprefix("base."): m for name, m in model.named_modules() if isinstance(m, SkillLoRALinear)}


def _task_type(model: AdaptedModel) -> str:
    """The task type selects peft's model class; its forward/generate pass Poly's task_ids on."""
    return "SEQ_2_SEQ_LM" if model.base.config.is_encoder_decoder else "CAUSAL_LM"


def _write(model: AdaptedModel, directory: Path, config: LoraConfig | PolyConfig, tensors: dict[str, Tensor]) -> None:
    config.base_model_name_or_path = getattr(model.base.config, "_name_or_path", None) or None
    directory.mkdir(parents=True, exist_ok=True)
    write_tensors(directory / WEIGHTS_FILE, tensors, {"format": "pt"})
    atomic_write_json(directory / TASKS_FILE, model.task_names)
    config.save_pretrained(str(directory))


def export_lora(model: AdaptedModel, directory: Path, state: RoutingState | None = None) -> None:
    """The single LoRA the model computes under the fixed routing ``state`` (lora: its only one) as peft's
    ``LoraConfig`` checkpoint: A (r, d_in) and B (d_out, r) per layer, ``lora_alpha`` giving the same scale."""
    from peft import LoraConfig  # imported when exporting: peft brings bitsandbytes, over a second to import

    method, pairs = model.method, model.fixed_loras(state)
    config = LoraConfig(r=method.rank, lora_alpha=float(method.alpha or 1.0), target_modules=sorted(pairs),
                        lora_dropout=method.dropout, bias="none", task_type=_task_type(model))
    tensors: dict[str, Tensor] = {}
    for name, (a, b) in pairs.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.T
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.T
    _write(model, directory, config, tensors)


def export_poly(model: AdaptedModel, directory: Path) -> None:
    """Poly / MHR as peft's ``PolyConfig`` checkpoint; alpha is folded into B (peft Poly scales by 1/r)."""
    from peft import PolyConfig

    method, layers = model.method, _layers(model)
    if model.averaged or method.straight_through:
        what = "the average-of-skills routing" if model.averaged else "straight-through routing"
        raise OrchmoeError(f"{what} has no peft equivalent; export_peft needs learned task routing")
    alpha = float(method.alpha or 1.0)
    config = PolyConfig(r=method.rank, target_modules=sorted(layers), n_tasks=len(model.task_names),
                        n_skills=method.n_skills, n_splits=method.n_heads or 1, poly_type="poly",
                        task_type=_task_type(model))
    tensors: dict[str, Tensor] = {}
    for name, layer in layers.items():
        tensors[f"{PREFIX}{name}.poly_lora_A"] = layer.lora_A
        tensors[f"{PREFIX}{name}.poly_lora_B"] = layer.lora_B * alpha
        tensors[f"{PREFIX}{name}.poly_router.module_logits"] = layer.router.logits
    _write(model, directory, config, tensors)


def _modules(tensors: dict[str, Tensor], suffixes: tuple[str, ...], source: Path) -> list[str]:
    """Module names of a peft state dict whose keys are exactly ``<module><suffix>``."""
    modules = set()
    for key in tensors:
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if suffix is None:
            raise OrchmoeError(f"{source}: tensor {PREFIX}{key} is not supported by orchmoe's import")
        modules.add(key[: -len(suffix)])
    for module in sorted(modules):
        for suffix in suffixes:
            if module + suffix not in tensors:
                raise OrchmoeError(f"{source}: tensor {PREFIX}{module}{suffix} is missing")
    return sorted(modules)


def _number(config: dict[str, Any], key: str, kind: type, source: Path, default: Any = None) -> Any:
    """``config[key]`` as ``kind`` (int or float); a missing or non-numeric value names the key."""
    value = config.get(key, default)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and value != int(value)):
        raise OrchmoeError(f"{source}: '{key}' must be a{'n integer' if kind is int else ' number'}, got {value!r}")
    return kind(value)


def read_peft_checkpoint(directory: Path,
                         config: dict[str, Any]) -> tuple[dict[str, Any], list[str], dict[str, Tensor]]:
    """(method fields, task names, tensors named as ``AdaptedModel.adapter_state_dict``) of a peft LoRA/Poly
    checkpoint; the caller builds the method config from the fields (and reports a bad one)."""
    source = directory / CONFIG_FILE
    weights = directory / WEIGHTS_FILE
    raw = read_tensors(directory)
    if any(not k.startswith(PREFIX) for k in raw):
        raise OrchmoeError(f"{weights}: tensor names must start with '{PREFIX}' (peft's layout)")
    tensors = {k[len(PREFIX):]: v for k, v in raw.items()}
    tasks = read_task_names(directory) if (directory / TASKS_FILE).exists() else None
    kind = config.get("peft_type")
    if kind == "LORA":
        for option in _LORA_OPTIONS:
            if config.get(option):
                raise OrchmoeError(f"{source}: {option} is set; orchmoe imports plain LoRA only")
        if config.get("bias", "none") != "none":
            raise OrchmoeError(f"{source}: bias '{config['bias']}' is set; orchmoe imports LoRA without biases")
        modules = _modules(tensors, (".lora_A.weight", ".lora_B.weight"), weights)
        rank = _number(config, "r", int, source)
        method = dict(name="lora", rank=rank, alpha=_number(config, "lora_alpha", float, source),
                    target_modules=modules, dropout=_number(config, "lora_dropout", float, source, 0.0))
        ours = {}
        for m in modules:
            a, b = tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
                raise OrchmoeError(f"{weights}: {m} has LoRA shapes {tuple(a.shape)}, {tuple(b.shape)}; "
                                   f"expected (r, d_in) and (d_out, r) with r = {rank}")
            ours[f"base.{m}.lora_A"] = a.T.reshape(1, 1, -1, rank)
            ours[f"base.{m}.lora_B"] = b.T.reshape(1, 1, rank, -1)
        return method, tasks or [], ours
    if kind == "POLY":
        if config.get("poly_type", "poly") != "poly":
            raise OrchmoeError(f"{source}: poly_type '{config['poly_type']}' is not supported")
        n_tasks, heads = _number(config, "n_tasks", int, source), _number(config, "n_splits", int, source, 1)
        tasks = tasks or [f"task_{i}" for i in range(n_tasks)]
        if len(tasks) != n_tasks:
            raise OrchmoeError(f"{directory / TASKS_FILE}: lists {len(tasks)} tasks but n_tasks is {n_tasks}")
        modules = _modules(tensors, (".poly_lora_A", ".poly_lora_B", ".poly_router.module_logits"), weights)
        method = dict(name="mhr" if heads > 1 else "poly", rank=_number(config, "r", int, source),
                    alpha=1.0, n_skills=_number(config, "n_skills", int, source), n_heads=heads,
                    target_modules=modules)
        ours = {}
        for m in modules:
            ours[f"base.{m}.lora_A"] = tensors[f"{m}.poly_lora_A"]
            ours[f"base.{m}.lora_B"] = tensors[f"{m}.poly_lora_B"]
            ours[f"base.{m}.router.logits"] = tensors[f"{m}.poly_router.module_logits"]
        return method, tasks, ours
    raise OrchmoeError(f"{source}: peft_type {kind} cannot be imported; orchmoe reads LORA and POLY checkpoints")
