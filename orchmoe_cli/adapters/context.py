"""The routing context: per-batch routing inputs, set explicitly around forward/generate.

The caller (``AdaptedModel.routing``) computes what routing needs once per batch (task ids, or
OrchMoE's task distribution from the prompt) and places it in a :class:`RoutingSlot` that every
adapted layer of that model holds. Layers then derive their own weights from it and apply them to
every copy of a sequence that generation makes (beams, ``num_return_sequences``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor, nn

from orchmoe_cli.errors import OrchmoeError


@dataclass
class RoutingInputs:
    """What a batch offers routing: task ids for task-routed families, the prompt for OrchMoE (``prompt_mask``:
    1 on prompt tokens; when None it is derived from ``attention_mask`` and ``labels``), category ids for a
    supervised routing term."""

    task_ids: Tensor | None = None
    input_ids: Tensor | None = None
    prompt_mask: Tensor | None = None
    category_ids: Tensor | None = None
    attention_mask: Tensor | None = None
    labels: Tensor | None = None


@dataclass
class RoutingState:
    """Routing inputs of one batch of ``batch_size`` sequences."""

    batch_size: int
    task_ids: Tensor | None = None  # (batch,) long, on the model's device; -1 = a task not seen in training
    task_probs: Tensor | None = None  # (batch, T): OrchMoE p(abstract task | prompt)
    # the same ids on the host when they came from there: questions about them (do all rows share a task?) are
    # answered without waiting for the accelerator
    host_task_ids: Tensor | None = None
    # what the family computed once for the batch, per module that reads it: each router's skill weights
    # (1 or batch, h, S), each HyperLoader stack's projected task embeddings (tasks, sites, dim)
    weights: dict[nn.Module, Tensor] = field(default_factory=dict)
    # without autograd (evaluation, generation) each layer's mixed LoRA pair (or generated weights): the routing
    # is fixed for the whole batch, so decoding steps after the first reuse it instead of mixing again; it lives
    # and dies with the batch's state
    mixed: dict[nn.Module, tuple[Tensor, ...]] = field(default_factory=dict)

    @cached_property
    def shared(self) -> bool:
        """True when every row routes identically, so layers may mix parameters once for the batch."""
        if self.task_probs is not None:
            return self.batch_size == 1
        ids = self._ids
        if ids is not None:
            return bool((ids == ids[0]).all())
        return True

    @property
    def _ids(self) -> Tensor | None:
        return self.host_task_ids if self.host_task_ids is not None else self.task_ids

    @property
    def first_task(self) -> int | None:
        """The first row's task id, read on the host where one is kept (no wait on the accelerator)."""
        ids = self._ids
        return None if ids is None else int(ids[0])

    @cached_property
    def has_unseen_tasks(self) -> bool:
        ids = self._ids
        return ids is not None and bool((ids < 0).any())

    @cached_property
    def unique_tasks(self) -> tuple[Tensor, Tensor]:
        """(distinct task ids, index of each row's task among them): generate once per task, not per row."""
        ids = self._ids
        if ids is None or self.task_ids is None:
            raise OrchmoeError("this method routes by task id: pass task_ids (-1 for an unseen task)")
        unique, inverse = torch.unique(ids, return_inverse=True)
        device = self.task_ids.device
        return unique.to(device, non_blocking=True), inverse.to(device, non_blocking=True)


def fold_rows(x: Tensor, sequences: int) -> Tensor:
    """View ``x`` (rows, ..., d) as (sequences, rows/sequences * ..., d).

    Generation repeats each sequence k times with ``repeat_interleave`` (beams, returned sequences),
    so the k copies are adjacent rows: folding them into the token axis lets per-sequence weights
    apply without expanding anything.
    """
    rows = x.shape[0]
    if rows % sequences:
        raise OrchmoeError(
            f"an adapted layer received {rows} rows but routing was set for {sequences} sequences; "
            "set routing with the batch that is passed to forward/generate")
    return x.reshape(sequences, -1, x.shape[-1])


class RoutingSlot:
    """Holds the current :class:`RoutingState` of one adapted model (None outside a routing context)."""

    def __init__(self) -> None:
        self.state: RoutingState | None = None
