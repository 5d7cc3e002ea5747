"""OrchMoE's Automatic Task Classification and its auxiliary losses.

The classifier reads only the prompt (never a task id): X = the frozen input-embedding rows of
the prompt tokens, X^ = softmax(X X^T / sqrt(d)) X + X over prompt tokens, a masked mean pool, and
a linear map to T abstract-task logits. It runs once per forward/generate call; its distribution
p(t|x) feeds every layer's Task-Skill Allocation (``routers.AllocationRouter``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orchmoe_cli.errors import OrchmoeError


class TaskClassifier(nn.Module):
    """Prompt embeddings (batch, L, d) and prompt mask (batch, L) -> abstract-task logits (batch, T)."""

    def __init__(self, hidden_size: int, n_abstract_tasks: int, temperature: float = 1.0) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, n_abstract_tasks)
        self.temperature = temperature  # logits are divided by it: below 1 sharpens p(t|x)

    def forward(self, embeddings: Tensor, prompt_mask: Tensor) -> Tensor:
        x = embeddings.to(self.proj.weight.dtype)
        keep = prompt_mask.to(torch.bool)
        scores = x @ x.transpose(1, 2) / math.sqrt(x.shape[-1])
        # a finite fill keeps rows without prompt tokens free of NaN; the pool below zeroes them
        scores = scores.masked_fill(~keep[:, None, :], torch.finfo(scores.dtype).min)
        mixed = torch.softmax(scores, dim=-1) @ x + x
        keep_f = keep.unsqueeze(-1).to(x.dtype)
        pooled = (mixed * keep_f).sum(dim=1) / keep_f.sum(dim=1).clamp(min=1.0)
        return self.proj(pooled) / self.temperature


def load_balance_loss(task_probs: Tensor) -> Tensor:
    """T * sum_t (batch mean of p(t|x))^2: 1 when the abstract tasks are used evenly, T when one takes all.

    The Switch-Transformer style penalty on soft usage; it is differentiable and needs no top-k.
    """
    usage = task_probs.mean(dim=0)
    return task_probs.shape[-1] * (usage * usage).sum()


def mutual_information(task_probs: Tensor) -> Tensor:
    """I(x; t) of the batch, normalised by log T: H(batch-marginal of p(t|x)) - mean_x H(p(t|x)).

    0 when every input is uniform (today's collapse) or when every input picks the same abstract task
    (the other collapse); 1 when inputs pick abstract tasks sharply and use all of them evenly. Maximising
    it rewards discrimination, which the soft load-balancing term does not (uniform inputs minimise that)."""
    n = task_probs.shape[-1]
    if n < 2:
        return task_probs.new_zeros(())
    probs = task_probs.float().clamp_min(1e-12)
    marginal = probs.mean(dim=0)
    marginal_entropy = -(marginal * marginal.log()).sum()
    conditional_entropy = -(probs * probs.log()).sum(dim=-1).mean()
    return (marginal_entropy - conditional_entropy) / math.log(n)


def supervision_loss(task_logits: Tensor, category_ids: Tensor) -> Tensor | None:
    """Cross-entropy of p(t|x) against category ids (-1 = no label); None when no row is labelled."""
    n_tasks = task_logits.shape[-1]
    labels = category_ids.to(task_logits.device).long()
    if bool((labels >= n_tasks).any()) or bool((labels < -1).any()):
        raise OrchmoeError(f"category_ids must lie in [-1, {n_tasks - 1}] (method.n_abstract_tasks is {n_tasks})")
    if not bool((labels >= 0).any()):
        return None
    return F.cross_entropy(task_logits, labels, ignore_index=-1)
