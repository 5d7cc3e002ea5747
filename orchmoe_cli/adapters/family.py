"""The interface of a routing family: everything one family of methods does differently.

Every method is a base model with wrapped linears reading a per-batch :class:`RoutingState`. A family
decides which linears are wrapped and with what, which model-level modules it adds (a task classifier, a
hypernetwork), how a batch's routing is computed and what auxiliary losses it adds, how a new task joins
it for few-shot adaptation, whether a fixed routing folds into the base weights, how it exports to peft,
and what ``inspect-routing`` can show of it. :class:`AdaptedModel` calls these hooks and holds no
family-specific code. The defaults are those of a skill-LoRA family whose layers each own a router.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from orchmoe_cli.adapters.context import RoutingInputs, RoutingSlot, RoutingState
from orchmoe_cli.adapters.layer import SkillLoRALinear
from orchmoe_cli.adapters.placement import Site, skill_sites
from orchmoe_cli.adapters.skill_weights import AverageRouter
from orchmoe_cli.errors import OrchmoeError, did_you_mean
from orchmoe_cli.fsutil import unique_names

if TYPE_CHECKING:
    from orchmoe_cli.adapters.method_config import MethodConfig
    from orchmoe_cli.adapters.model import AdaptedModel
    from orchmoe_cli.adapters.registry import MethodSpec


@dataclass(frozen=True)
class AdaptMode:
    """How a trained checkpoint of the family is prepared to learn one new task (``orchmoe adapt``)."""

    methods: tuple[str, ...]  # checkpoint methods the mode applies to
    trains: tuple[str, ...]  # parameter groups that train; "new_task_row": only the new task's row of its tables
    new_task: bool = False  # the task gets its own row (routing logits, task embedding); the others stay fixed
    average: bool = False  # collapse task routing to the average of skills first
    with_router: tuple[str, ...] | None = None  # what trains instead with `adapt.with_router`


@dataclass(frozen=True)
class FixedRouting:
    """One routing a trained model can be frozen at: its skills then mix into a single rank-r LoRA per layer, which
    ``orchmoe export`` writes as a peft adapter or folds into the base weights."""

    name: str  # the adapter's name (a peft adapter name and a directory name)
    label: str  # what it routes, for people ("task task101_x", "abstract task 3")
    state: RoutingState | None  # the routing state that selects it
    exact: str  # for which inputs the exported LoRA equals the trained model


@dataclass
class Routing:
    """A batch's routing as a family computed it: the state layers read, the weighted auxiliary losses to add to
    the language-model loss, and what diagnostics need of it (detached)."""

    state: RoutingState | None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    record: dict[str, Tensor] = field(default_factory=dict)


class RoutingFamily:
    """One routing family; instances are made per adapted model from its method's registry row."""

    needs_task_ids: ClassVar[bool] = False  # batches carry task ids (indices into the model's task names)
    mergeable: ClassVar[bool] = True  # a fixed routing folds into the base weights
    merge_refusal: ClassVar[str] = ""  # why not, when it cannot
    may_skip_parameters: ClassVar[bool] = False  # a step may leave trainable tensors unused (DDP must look)
    allocation_tensor: ClassVar[str | None] = None  # router tensor holding a learned allocation to inspect
    allocation_rows: ClassVar[str] = "task"  # what that allocation's rows are ("task", "abstract task")
    inspects_generated_adapters: ClassVar[bool] = False  # inspect-routing compares generated adapters instead
    classifies_prompts: ClassVar[bool] = False  # has p(abstract task | prompt) (inspect-routing --data)
    adapt_modes: ClassVar[dict[str, AdaptMode]] = {}

    def __init__(self, spec: MethodSpec) -> None:
        self.spec = spec

    # ------------------------------------------------------------------ building

    def defaults(self, method: MethodConfig, hidden_size: int) -> dict[str, Any]:
        """Values of the fields a recipe leaves at None, as this family's papers set them."""
        return {"alpha": 1.0, "n_heads": self.spec.heads, "train_layer_norms": False,
                "adapter_bottleneck": max(1, hidden_size // 32)}

    def resolve(self, method: MethodConfig, hidden_size: int) -> MethodConfig:
        """A copy of ``method`` with every default filled in (rank stays as given)."""
        defaults = self.defaults(method, hidden_size)
        return dataclasses.replace(method, **{k: v for k, v in defaults.items() if getattr(method, k) is None})

    def plan(self, base: PreTrainedModel, method: MethodConfig) -> list[Site]:
        """The linears to wrap, with what their wrappers need."""
        return skill_sites(base, method)

    def extras(self, method: MethodConfig, hidden_size: int) -> dict[str, nn.Module]:
        """Model-level modules (built before the layers): attribute name -> module."""
        return {}

    def make_router(self, method: MethodConfig, n_tasks: int) -> nn.Module:
        """The router of one skill-LoRA layer; by default every input mixes the skills evenly (with one skill:
        a plain LoRA)."""
        return AverageRouter(method.n_heads or 1, method.n_skills)

    def build(self, sites: list[Site], method: MethodConfig, n_tasks: int, hidden_size: int, slot: RoutingSlot,
              base_for: Callable[[Site], nn.Linear]) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
        """Wrappers per site name, and the model-level modules. ``method`` is resolved."""
        assert method.alpha is not None and method.n_heads is not None, "build() takes a resolved method"
        extras = self.extras(method, hidden_size)
        wrappers: dict[str, nn.Module] = {
            s.name: SkillLoRALinear(base_for(s), self.make_router(method, n_tasks), slot, method.rank, method.alpha,
                                    method.n_skills, method.n_heads, method.dropout) for s in sites}
        return wrappers, extras

    # ------------------------------------------------------------------ routing

    def route(self, model: AdaptedModel, inputs: RoutingInputs) -> Routing:
        """The batch's routing; the default routes every input alike (no state)."""
        return Routing(None)

    def diagnostics(self, model: AdaptedModel, record: dict[str, Tensor]) -> dict[str, float]:
        """Numbers that show a routing collapse while training (logged with the loss)."""
        return {}

    def category_index(self, method: MethodConfig, categories: list[str]) -> dict[str, int] | None:
        """Category -> index when routing also learns from categories, else None."""
        return None

    # ------------------------------------------------------------------ adaptation, merge, export

    def add_task(self, model: AdaptedModel) -> list[nn.Parameter]:
        """Give a new task its own row in every task table; returns the tables (their last row is the task's)."""
        raise OrchmoeError(f"{model.method.name} has no per-task parameters to add a task to")

    def average(self, model: AdaptedModel) -> None:
        """Replace the routing by the average of skills (Poly-µ / MHR-µ)."""
        raise OrchmoeError(f"averaging applies to task-routed skill inventories, not {model.method.name}")

    def fixed_routings(self, model: AdaptedModel, tasks: list[str] | None) -> list[FixedRouting]:
        """The routings ``orchmoe export`` writes, for ``tasks`` (None: every one; []: none named). By default every
        input routes alike, so there is one, and naming tasks is an error."""
        if tasks:
            raise OrchmoeError(f"{model.method.name} routes every input alike: export takes no --task")
        return [FixedRouting(model.method.name, "every input", None, "every input")]

    def export_extras(self, model: AdaptedModel, directory: Path) -> dict[str, Any]:
        """Files a peft export adds beside the adapters (a router to pick one per prompt); returns what the export
        manifest records of them."""
        return {}

    def describe_routing(self, model: AdaptedModel, state: RoutingState | None, rows: int,
                         task: str | None) -> list[dict[str, Any]]:
        """Per row of a batch, how it was routed (``orchmoe generate`` writes it beside each prediction); ``task``
        is the task the rows were given (None: none)."""
        return [{} for _ in range(rows)]

    def export_peft(self, model: AdaptedModel, directory: Path) -> None:
        raise OrchmoeError(f"{model.method.name} has no peft equivalent; export_peft supports lora, poly and mhr "
                           "(save() writes every method's own checkpoint)")


def checked_task_ids(model: AdaptedModel, task_ids: Tensor | None) -> RoutingState:
    """The routing state of a batch routed by ``task_ids``; one line if any is outside -1..n-1. Ids that come from
    the host are checked there and copied to the model's device without waiting for it."""
    if task_ids is None:
        raise OrchmoeError(f"{model.method.name} routes by task id: pass task_ids (indices into the "
                           "model's task names, -1 for an unseen task)")
    ids = torch.as_tensor(task_ids, dtype=torch.long).reshape(-1)
    bad = (ids < -1) | (ids >= len(model.task_names))
    if ids.numel() == 0 or bool(bad.any()):
        shown = ids[bad][0].item() if bool(bad.any()) else "none"
        raise OrchmoeError(f"task id {shown} is out of range: the model knows {len(model.task_names)} tasks "
                           "(ids 0..n-1) and -1 means an unseen task")
    host = ids if ids.device.type == "cpu" else None
    return RoutingState(ids.shape[0], task_ids=ids.to(model.device, non_blocking=True), host_task_ids=host)


def task_routings(model: AdaptedModel, tasks: list[str] | None) -> list[FixedRouting]:
    """One fixed routing per named training task (None: every one), for families that route by task id."""
    if tasks is not None and not tasks:
        raise OrchmoeError(f"{model.method.name} routes by task: name them with --task T (repeatable) or export "
                           f"--all-tasks ({len(model.task_names)})")
    index = {name: i for i, name in enumerate(model.task_names)}
    chosen = model.task_names if tasks is None else list(dict.fromkeys(tasks))
    for name in chosen:
        if name not in index:
            raise OrchmoeError(f"--task: '{name}' is not one of the checkpoint's {len(index)} tasks"
                               f"{did_you_mean(name, index)}")
    names = unique_names(chosen)
    return [FixedRouting(names[k], f"task {task}", RoutingState(1, task_ids=torch.tensor([index[task]]),
                                                                 host_task_ids=torch.tensor([index[task]])),
                         f"rows of task {task}") for k, task in enumerate(chosen)]


def append_row(table: nn.Parameter, row: Tensor) -> nn.Parameter:
    """``table`` with ``row`` appended, as a new parameter (the caller puts it where the table was)."""
    return nn.Parameter(torch.cat([table.detach(), row.to(table.device, table.dtype)]))
