"""One training step's pieces: batches on the device with their target-token counts, the token loss, and the
micro-step that weighs every target token of an optimizer step alike (across accumulation and processes)."""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from orchmoe_cli.adapters import AdaptedModel
from orchmoe_cli.data.collate import TrainCollator
from orchmoe_cli.data.rows import TaskRows


def lm_loss(model: Any, batch: dict[str, torch.Tensor], causal: bool, label_smoothing: float,
            reduction: str = "mean") -> tuple[torch.Tensor, Any]:
    """Cross-entropy over target tokens (-100 ignored; their mean, or with ``reduction="sum"`` their sum), and the
    model's output (it carries the method's auxiliary routing losses and what its diagnostics read).

    Decoder-only models compute logits only at positions that predict an answer token: the answer is
    a few tokens of a long prompt, and the vocabulary projection is a large share of a small model's cost.
    """
    labels = batch["labels"]
    if causal:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "answer_positions")}
        keep = batch.get("answer_positions")
        keep = answer_positions(labels) if keep is None else keep
        output = model(**inputs, logits_to_keep=keep, use_cache=False)  # no key/value cache kept beside the loss
        labels = labels[:, keep + 1]
    else:
        output = model(**batch, use_cache=False)
    logits = output.logits
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100,
                           label_smoothing=label_smoothing, reduction=reduction)
    return loss, output


def target_tokens(labels: torch.Tensor, causal: bool) -> int:
    """How many tokens a batch's loss averages over (decoder-only: labels predicted from a previous position)."""
    return int((labels[:, 1:] if causal else labels).ne(-100).sum())


def micro_step(accelerator: Accelerator, model: Any, batch: dict[str, torch.Tensor], step_tokens: int | torch.Tensor,
               causal: bool, label_smoothing: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """Forward and backward of one micro-batch inside ``accelerator.accumulate``, weighting every target token of
    the optimizer step alike: its summed token loss over ``step_tokens``, the target tokens of the whole step on
    every process (accelerate divides by the accumulation steps and data parallelism averages over processes, so
    both are multiplied back). Short and long micro-batches, and processes, then count by their tokens, as if the
    step were one batch; the routing terms stay per micro-batch. Returns this micro-batch's summed token loss and
    what of the model's output the loop reads (its auxiliary losses, what diagnostics read): not the logits, which
    would otherwise stay alive through the next micro-batch's forward and backward."""
    token_sum, output = lm_loss(model, batch, causal, label_smoothing, reduction="sum")
    aux = output.get("aux_losses") or {}
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes / step_tokens
    loss = token_sum * scale + sum(aux.values(), torch.zeros((), device=token_sum.device))
    accelerator.backward(loss)
    return token_sum, {"aux_losses": aux, "routing_record": output.get("routing_record") or {}}


class Batches:
    """Turns row indices into device tensors: the collator's padding, the model's task ids and category ids."""

    def __init__(self, model: AdaptedModel, rows: TaskRows, pad_id: int, causal: bool, accelerator: Accelerator):
        self.model, self.rows, self.pad_id, self.causal = model, rows, pad_id, causal
        self.accelerator = accelerator
        self.category_index = model.category_index(rows.categories())

    def mine(self, indices: list[int]) -> list[int]:
        """This process's share of a global batch."""
        return indices[self.accelerator.process_index :: self.accelerator.num_processes]

    def __call__(self, indices: list[int], rng: random.Random) -> tuple[dict[str, torch.Tensor], int]:
        """The batch on the device, and its target tokens (counted on the host)."""
        rows = self.rows.rows(indices)
        batch = TrainCollator(self.pad_id, not self.causal, rng, self.model.task_index)(rows)
        if self.category_index is not None:
            batch["category_ids"] = torch.tensor([self.category_index[r["category"]] for r in rows])
        if self.causal:  # found on the host, so the loss need not ask the accelerator where the answers are
            batch["answer_positions"] = answer_positions(batch["labels"])
        tokens = target_tokens(batch["labels"], self.causal)
        return {k: v if k == "task_ids" else to_device(v, self.accelerator.device) for k, v in batch.items()}, tokens


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is a labelled answer token in some row (position i predicts token i + 1)."""
    return (labels[:, 1:] != -100).any(dim=0).nonzero().squeeze(-1)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to a GPU from pinned memory, without waiting for the copy."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def validation_loss(model: Any, batches: Batches, batch_size: int) -> float:
    """Mean token loss over the validation rows' target tokens (each process scores its share)."""
    accelerator = batches.accelerator
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    mine = batches.mine(list(range(len(batches.rows))))
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            batch, tokens = batches(mine[start : start + batch_size], random.Random(0))
            total += lm_loss(model, batch, batches.causal, 0.0, reduction="sum")[0]
            count += tokens
    model.train()
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    return float(total / count.clamp(min=1))
