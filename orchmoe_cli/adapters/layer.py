"""The skill-LoRA layer shared by lora, poly, mhr, the µ variants and orchmoe.

A frozen ``nn.Linear`` plus an inventory of S LoRA skills split into h heads:
A (h, S, d_in/h, r) and B (h, S, r, d_out/h), the layout of mttl and peft Poly. Routing weights
w (rows, h, S) mix *parameters*, not outputs: A_b = sum_k w_k A_k and B_b = sum_k w_k B_k per head,
then y = W0 x + b + (alpha / r) (x A_b) B_b. When the whole batch shares one routing the layer
mixes once and runs two plain matmuls; otherwise it mixes per sequence and uses batched matmuls.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from orchmoe_cli.adapters.context import RoutingSlot, fold_rows
from orchmoe_cli.errors import OrchmoeError


def add_low_rank(out: Tensor, x: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """out + scale (x a) b for ``x`` (rows, ..., d_in), with ``a`` (n, d_in, r) and ``b`` (n, r, d_out) holding
    one LoRA pair for the whole batch (n = 1: two plain matmuls) or one per sequence (batched matmuls).

    The scale and the add ride on addmm / baddbmm when dtypes allow: fewer ops per layer.
    """
    x = x.to(a.dtype)
    n, d_out = a.shape[0], b.shape[-1]
    if out.dtype != a.dtype:
        delta = (x @ a[0]) @ b[0] if n == 1 else torch.bmm(torch.bmm(fold_rows(x, n), a), b)
        return out + (scale * delta).view(out.shape).to(out.dtype)
    if n == 1:
        xa = x.reshape(-1, x.shape[-1]) @ a[0]
        return torch.addmm(out.reshape(-1, d_out), xa, b[0], alpha=scale).view(out.shape)
    xa = torch.bmm(fold_rows(x, n), a)
    return torch.baddbmm(out.reshape(n, -1, d_out), xa, b, alpha=scale).view(out.shape)


def fold(weight: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``weight + scale * (a @ b)^T`` computed in float32 and rounded once to ``weight``'s dtype: in bf16, adding a
    bf16-rounded update to bf16 weights rounds twice and loses more of a small update."""
    update = scale * (a.float() @ b.float()).T
    return (weight.float() + update.to(weight.device)).to(weight.dtype)


class WrappedLinear(nn.Module):
    """A frozen ``nn.Linear`` in a wrapper that adds to it, reading routing from the model's slot."""

    def __init__(self, base_layer: nn.Linear, slot: RoutingSlot) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.slot = slot

    @property
    def weight(self) -> Tensor:
        """The base weight: HF code (e.g. T5's feed-forward) reads ``.weight`` of the modules it calls."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features


class SkillLoRALinear(WrappedLinear):
    """``base_layer`` (frozen) + routed mixture of LoRA skills."""

    def __init__(self, base_layer: nn.Linear, router: nn.Module, slot: RoutingSlot, rank: int, alpha: float,
                 n_skills: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__(base_layer, slot)
        d_in, d_out = base_layer.in_features, base_layer.out_features
        if d_in % n_heads or d_out % n_heads:
            raise ValueError(f"n_heads {n_heads} must divide in_features {d_in} and out_features {d_out}")
        self.router = router
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.lora_A = nn.Parameter(torch.empty(n_heads, n_skills, d_in // n_heads, rank))
        self.lora_B = nn.Parameter(torch.zeros(n_heads, n_skills, rank, d_out // n_heads))
        # kaiming_uniform(a=sqrt(5)) per (head, skill) slice with fan_in = d_in/h, as peft Poly; B = 0
        # so the adapted model starts as the base model.
        bound = 1.0 / math.sqrt(d_in // n_heads)
        nn.init.uniform_(self.lora_A, -bound, bound)
        self._unmerged_weight: Tensor | None = None

    @property
    def merged(self) -> bool:
        return self._unmerged_weight is not None

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        state = self.slot.state
        if state is not None and not torch.is_grad_enabled():
            if self not in state.mixed:
                state.mixed[self] = self.mix(self.router(state))
            a, b = state.mixed[self]
        else:
            a, b = self.mix(self.router(state))
        return add_low_rank(out, x if self.dropout is None else self.dropout(x), a, b, self.scale)

    def mix(self, weights: Tensor) -> tuple[Tensor, Tensor]:
        """Mix routings (n, h, S) into n LoRA pairs: A (n, d_in, r) and B (n, r, d_out).

        Heads own consecutive slices of A's input and B's output dims (mttl / peft layout). Plain
        matmuls rather than einsum: on small layers the per-op overhead is what costs.
        """
        n, (heads, skills, _, rank) = weights.shape[0], self.lora_A.shape
        weights = weights.to(self.lora_A.dtype)
        if heads == 1:
            w = weights.view(n, skills)
            a = (w @ self.lora_A.view(skills, -1)).view(n, -1, rank)
            b = (w @ self.lora_B.view(skills, -1)).view(n, rank, -1)
            return a, b
        w = weights.transpose(0, 1)  # (h, n, S)
        a = torch.bmm(w, self.lora_A.view(heads, skills, -1)).view(heads, n, -1, rank)
        b = torch.bmm(w, self.lora_B.view(heads, skills, -1)).view(heads, n, rank, -1)
        return a.transpose(0, 1).reshape(n, -1, rank), b.permute(1, 2, 0, 3).reshape(n, rank, -1)

    @torch.no_grad()
    def merge(self, weights: Tensor) -> None:
        """Fold the LoRA mixed with ``weights`` (h, S) into the base weight; the original is kept for unmerge."""
        if self.merged:
            raise OrchmoeError("adapters are already merged; call unmerge() first")
        a, b = self.mix(weights.unsqueeze(0))
        weight = self.base_layer.weight
        self._unmerged_weight = weight.detach().clone()
        weight.copy_(fold(weight, a[0], b[0], self.scale))

    @torch.no_grad()
    def folded_update(self) -> Tensor:
        """What folding changed in the stored base weight (float32): the update as its dtype could keep it."""
        if self._unmerged_weight is None:
            raise OrchmoeError("nothing is merged")
        return self.base_layer.weight.float() - self._unmerged_weight.float()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact base weight saved by :meth:`merge`."""
        if self._unmerged_weight is not None:
            self.base_layer.weight.copy_(self._unmerged_weight)
            self._unmerged_weight = None

    def extra_repr(self) -> str:
        h, s, _, r = self.lora_A.shape
        return f"heads={h}, skills={s}, rank={r}, scale={self.scale:g}"
