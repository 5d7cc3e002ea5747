"""Few-shot adaptation modes: how a trained adapter is prepared to learn one new task.

Each routing family declares its modes (``RoutingFamily.adapt_modes``: the methods each fits and the
parameter groups it trains, the papers' settings, ``docs/methods.md``); this module applies one. A mode
that gives the new task its own row (routing logits, a task embedding) lets only that row of each table
change: the other rows get no gradient and no weight decay, so the training tasks' rows stay bit-identical
whatever the optimizer settings.
"""

from __future__ import annotations

from torch import nn

from orchmoe_cli.adapters.family import AdaptMode
from orchmoe_cli.adapters.model import AdaptedModel
from orchmoe_cli.adapters.registry import SPECS
from orchmoe_cli.errors import OrchmoeError

NEW_TASK_ROW = "new_task_row"  # a mode's pseudo-group: only the new task's row of its tables trains


def adapt_modes() -> dict[str, AdaptMode]:
    """Every registered family's modes, by name."""
    modes: dict[str, AdaptMode] = {}
    for spec in SPECS.values():
        modes.update(spec.family.adapt_modes)
    return modes


def check_mode(mode: str, method: str | None) -> AdaptMode:
    """The mode, or one line saying which checkpoints it fits (``method`` None: there is no checkpoint)."""
    modes = adapt_modes()
    if mode not in modes:
        raise OrchmoeError(f"adapt mode '{mode}' is unknown; choose from {', '.join(modes)}, lora_scratch or "
                           "zero_shot", field="adapt.modes")
    spec = modes[mode]
    if method is None:
        raise OrchmoeError(f"adapt mode '{mode}' adapts a trained {' or '.join(spec.methods)} checkpoint, and "
                           "adapt.checkpoint is none; set one, or run only zero_shot and lora_scratch",
                           field="adapt.modes")
    if method not in spec.methods:
        raise OrchmoeError(f"adapt mode '{mode}' needs a {' or '.join(spec.methods)} checkpoint, and this one is "
                           f"{method}", field="adapt.modes")
    return spec


def prepare_for_adaptation(model: AdaptedModel, mode: str, task: str, with_router: bool = False) -> None:
    """Apply ``mode`` to a loaded checkpoint in place: add the task's row, freeze what the mode keeps fixed."""
    spec = check_mode(mode, model.method.name)
    if spec.average:
        model.to_average()
    tables = model.add_task(task) if spec.new_task else []
    trains = spec.with_router if with_router and spec.with_router is not None else spec.trains
    for _, param, group in model.named_adapter_tensors():
        param.requires_grad_(group in trains)
    for table in tables:
        table.requires_grad_(NEW_TASK_ROW in trains or table.requires_grad)
        if table.requires_grad:
            model.train_rows_only(table, [len(model.task_names) - 1])


def movable_parameter_count(model: nn.Module) -> int:
    """Trainable parameters adaptation can move: of a table with a row mask (routing logits, task embeddings in a
    new-task mode) only the new task's row counts."""
    masked = getattr(model, "row_masked", set())
    named = model.named_adapter_parameters() if isinstance(model, AdaptedModel) else model.named_parameters()
    return sum(p[0].numel() if name in masked else p.numel() for name, p in named if p.requires_grad)
