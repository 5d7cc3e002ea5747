"""HyperLoader: a hypernetwork per stack generates LoRA and bottleneck-adapter weights from
[task embedding; layer embedding; position embedding].

s = LayerNorm(Linear(ReLU(Linear([I_task; E_layer; E_pos]))))  then
  LoRA (q, v; cross-attention q, v):  A = view(G_A s, r x d_in), B = view(G_B s, d_out x r),
                                      delta = (alpha/r) x A^T B^T
  adapter after a sublayer output y:  y + LN_{gamma,beta}(W_U gelu(W_D y + b_D) + b_U)
Generators G_A / G_B are shared by all LoRA targets of a stack with the same input / output size
(all of them on T5; q and v differ under grouped-query attention). Weights are generated once per
distinct task of the batch; rows pick their task's weights. Deviation from the HyperLoader code:
the gamma/beta generators start at zero (not N(0, 1e-2)) so the model starts exactly as the base.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orchmoe_cli.adapters.context import RoutingSlot, fold_rows
from orchmoe_cli.errors import OrchmoeError


class StackHyperNetwork(nn.Module):
    """The shared generator of one stack (encoder, decoder, or a decoder-only model)."""

    def __init__(self, n_layers: int, n_positions: int, embedding_dim: int, hidden_dim: int, projected_dim: int,
                 rank: int, lora_in: list[int], lora_out: list[int], adapter_dim: int | None, bottleneck: int) -> None:
        super().__init__()
        self.rank, self.bottleneck = rank, bottleneck
        self.layer_embedding = nn.Embedding(n_layers, embedding_dim)
        self.position_embedding = nn.Embedding(n_positions, embedding_dim)
        self.projector = nn.Sequential(
            nn.Linear(3 * embedding_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, projected_dim),
            nn.LayerNorm(projected_dim))
        self.lora_a = nn.ModuleDict({str(d): nn.Linear(projected_dim, rank * d, bias=False) for d in lora_in})
        self.lora_b = nn.ModuleDict({str(d): nn.Linear(projected_dim, d * rank, bias=False) for d in lora_out})
        for gen in self.lora_a.values():
            nn.init.kaiming_uniform_(gen.weight, a=math.sqrt(5))
        for gen in self.lora_b.values():
            nn.init.zeros_(gen.weight)  # delta W = 0 at start
        self.adapter = nn.ModuleDict()
        if adapter_dim is not None:
            sizes = {"down_w": bottleneck * adapter_dim, "down_b": bottleneck, "up_w": adapter_dim * bottleneck,
                     "up_b": adapter_dim, "ln_w": adapter_dim, "ln_b": adapter_dim}
            self.adapter = nn.ModuleDict({k: nn.Linear(projected_dim, n) for k, n in sizes.items()})
            for key, gen in self.adapter.items():
                nn.init.zeros_(gen.bias)
                if key.startswith("ln"):
                    nn.init.zeros_(gen.weight)
                else:
                    nn.init.normal_(gen.weight, std=1e-2)

    def embed(self, task_vectors: Tensor, layer: int, position: int) -> Tensor:
        """Projected embeddings s (tasks, projected_dim) for one (layer, position)."""
        index = torch.tensor([layer, position], device=task_vectors.device)
        layer_vec = self.layer_embedding(index[:1]).expand(task_vectors.shape[0], -1)
        pos_vec = self.position_embedding(index[1:]).expand(task_vectors.shape[0], -1)
        return self.projector(torch.cat([task_vectors, layer_vec, pos_vec], dim=-1))


class HyperLoader(nn.Module):
    """Task embeddings (shared by the stacks) and one hypernetwork per stack."""

    def __init__(self, n_tasks: int, embedding_dim: int, stacks: dict[str, StackHyperNetwork]) -> None:
        super().__init__()
        self.task_embedding = nn.Parameter(torch.randn(n_tasks, embedding_dim))
        self.stacks = nn.ModuleDict(stacks)

    def task_vectors(self, task_ids: Tensor) -> Tensor:
        """Embeddings of ``task_ids``; -1 (unseen task) gets the mean of the learned embeddings."""
        ids = task_ids.to(self.task_embedding.device)
        known = self.task_embedding[ids.clamp(min=0)]
        mean = self.task_embedding.mean(dim=0, keepdim=True).expand_as(known)
        return torch.where((ids >= 0).unsqueeze(-1), known, mean)


class HyperWrapped(nn.Module):
    """A frozen linear whose extra weights come from a stack hypernetwork, per task of the batch."""

    def __init__(self, base_layer: nn.Linear, hyper: HyperLoader, stack: str, layer: int, position: int,
                 slot: RoutingSlot) -> None:
        super().__init__()
        self.base_layer = base_layer
        # a plain reference: the hypernetwork is registered once on the adapted model, not in every layer
        object.__setattr__(self, "hyper", hyper)
        self.stack, self.layer, self.position = stack, layer, position
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

    def _routing(self) -> tuple[Tensor, Tensor | None]:
        """(projected embeddings of the batch's distinct tasks, sequence -> task index; None for one task)."""
        state = self.slot.state
        if state is None or state.task_ids is None:
            raise OrchmoeError("hyperloader routes by task id: set routing with task_ids (-1 for an unseen task)")
        unique, inverse = state.unique_tasks
        net: HyperLoader = self.hyper  # type: ignore[assignment]
        embed = net.stacks[self.stack].embed
        projected = state.memo(self, "s", lambda: embed(net.task_vectors(unique), self.layer, self.position))
        return projected, (inverse if unique.shape[0] > 1 else None)


def _pick(generated: Tensor, inverse: Tensor | None) -> Tensor:
    """Per-task tensors (U, ...) -> per-sequence (batch, ...), or (1, ...) when the batch has one task."""
    return generated if inverse is None else generated[inverse.to(generated.device)]


class HyperLoRALinear(HyperWrapped):
    """y = W0 x + b + (alpha/r) x A_task^T B_task^T with A, B generated for the row's task."""

    def __init__(self, base_layer: nn.Linear, hyper: HyperLoader, stack: str, layer: int, position: int,
                 slot: RoutingSlot, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer, hyper, stack, layer, position, slot)
        self.scale = alpha / hyper.stacks[stack].rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        s, inverse = self._routing()
        net = self.hyper.stacks[self.stack]  # type: ignore[attr-defined]
        d_in, d_out, r = self.in_features, self.out_features, net.rank
        a = _pick(net.lora_a[str(d_in)](s).view(-1, r, d_in).transpose(1, 2), inverse)
        b = _pick(net.lora_b[str(d_out)](s).view(-1, d_out, r).transpose(1, 2) * self.scale, inverse)
        x_in = self.dropout(x).to(a.dtype)
        delta = torch.bmm(torch.bmm(fold_rows(x_in, a.shape[0]), a), b)
        return out + delta.view(*x.shape[:-1], d_out).to(out.dtype)


class HyperAdapterLinear(HyperWrapped):
    """A sublayer's output projection followed by a generated bottleneck adapter with post-LayerNorm:
    y + LN(W_U gelu(W_D y + b_D) + b_U), applied before the block's residual add."""

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        s, inverse = self._routing()
        gens = self.hyper.stacks[self.stack].adapter  # type: ignore[attr-defined]
        d, bottleneck = self.out_features, gens["down_b"].out_features
        w_down = _pick(gens["down_w"](s).view(-1, bottleneck, d), inverse)
        b_down = _pick(gens["down_b"](s), inverse).unsqueeze(1)
        w_up = _pick(gens["up_w"](s).view(-1, d, bottleneck), inverse)
        b_up = _pick(gens["up_b"](s), inverse).unsqueeze(1)
        gamma = _pick(gens["ln_w"](s), inverse).unsqueeze(1)
        beta = _pick(gens["ln_b"](s), inverse).unsqueeze(1)
        h = fold_rows(y.to(w_down.dtype), w_down.shape[0])
        h = F.gelu(torch.baddbmm(b_down, h, w_down.transpose(1, 2)), approximate="tanh")
        h = torch.baddbmm(b_up, h, w_up.transpose(1, 2))
        h = F.layer_norm(h, (d,)) * gamma + beta
        return y + h.view_as(y).to(y.dtype)
