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

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from orchmoe_cli.adapters.context import RoutingInputs, RoutingSlot, RoutingState, fold_rows
from orchmoe_cli.adapters.family import AdaptMode, FixedRouting, Routing, RoutingFamily, append_row, checked_task_ids
from orchmoe_cli.adapters.layer import WrappedLinear, add_low_rank
from orchmoe_cli.adapters.placement import Site, architecture, linear_layers, select
from orchmoe_cli.errors import OrchmoeError

if TYPE_CHECKING:
    from orchmoe_cli.adapters.method_config import MethodConfig
    from orchmoe_cli.adapters.model import AdaptedModel


class StackHyperNetwork(nn.Module):
    """The shared generator of one stack (encoder, decoder, or a decoder-only model)."""

    def __init__(self, sites: list[tuple[int, int]], embedding_dim: int, hidden_dim: int, projected_dim: int,
                 rank: int, lora_in: list[int], lora_out: list[int], adapter_dim: int | None, bottleneck: int) -> None:
        """``sites``: (layer, position id) of every wrapped linear of the stack, in wrapper order."""
        super().__init__()
        self.rank, self.bottleneck = rank, bottleneck
        self.register_buffer("sites", torch.tensor(sites, dtype=torch.long), persistent=False)
        self.layer_embedding = nn.Embedding(max(layer for layer, _ in sites) + 1, embedding_dim)
        self.position_embedding = nn.Embedding(max(position for _, position in sites) + 1, embedding_dim)
        self.projector = nn.Sequential(
            nn.Linear(3 * embedding_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, projected_dim),
            nn.LayerNorm(projected_dim))
        self.lora_a = nn.ModuleDict({str(d): nn.Linear(projected_dim, rank * d, bias=False) for d in lora_in})
        self.lora_b = nn.ModuleDict({str(d): nn.Linear(projected_dim, d * rank, bias=False) for d in lora_out})
        for gen in self.lora_a.values():
            nn.init.kaiming_uniform_(gen.weight, a=math.sqrt(5))
        for gen in self.lora_b.values():
            nn.init.zeros_(gen.weight)  # delta W = 0 at start
        # the adapter generators G_D, c_D | G_bD | G_U, c_U | G_bU | G_gamma | G_beta as one linear map whose
        # output splits into W_D (b*d), b_D (b), W_U (d*b), b_U (d), gamma (d), beta (d): one op per site
        d = adapter_dim or 0
        self.adapter_sizes = (bottleneck * d, bottleneck, d * bottleneck, d, d, d)
        self.adapter = nn.Linear(projected_dim, sum(self.adapter_sizes)) if adapter_dim is not None else None
        if self.adapter is not None:
            nn.init.zeros_(self.adapter.bias)
            nn.init.normal_(self.adapter.weight, std=1e-2)
            nn.init.zeros_(self.adapter.weight[-2 * d:])  # gamma and beta start at 0

    def project(self, task_vectors: Tensor) -> Tensor:
        """Projected embeddings s (tasks, sites, projected_dim): every site of the stack in one pass."""
        tasks, sites = task_vectors.shape[0], self.sites.shape[0]
        layer = self.layer_embedding(self.sites[:, 0]).unsqueeze(0).expand(tasks, -1, -1)
        position = self.position_embedding(self.sites[:, 1]).unsqueeze(0).expand(tasks, -1, -1)
        task = task_vectors.unsqueeze(1).expand(-1, sites, -1)
        return self.projector(torch.cat([task, layer, position], dim=-1))


class HyperLoader(nn.Module):
    """Task embeddings (shared by the stacks) and one hypernetwork per stack."""

    parameter_group = "hypernetwork"

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

    def route(self, state: RoutingState) -> None:
        """Project the batch's distinct tasks for every site of every stack, once per batch."""
        unique, _ = state.unique_tasks
        vectors = self.task_vectors(unique)
        for stack in self.stacks.values():
            state.weights[stack] = stack.project(vectors)


class HyperWrapped(WrappedLinear, ABC):
    """A frozen linear whose extra weights come from a stack hypernetwork, per task of the batch."""

    def __init__(self, base_layer: nn.Linear, hyper: HyperLoader, stack: str, site: int, slot: RoutingSlot) -> None:
        super().__init__(base_layer, slot)
        # a plain reference: the hypernetwork is registered once on the adapted model, not in every layer
        object.__setattr__(self, "hyper", hyper)
        self.stack, self.site = stack, site  # site: index into the stack hypernetwork's sites

    def _routing(self) -> tuple[Tensor, Tensor | None]:
        """(projected embeddings of the batch's distinct tasks, sequence -> task index; None for one task)."""
        state = self.slot.state
        if state is None or state.task_ids is None:
            raise OrchmoeError("hyperloader routes by task id: set routing with task_ids (-1 for an unseen task)")
        unique, inverse = state.unique_tasks
        net: HyperLoader = self.hyper  # type: ignore[assignment]
        stack = net.stacks[self.stack]
        if stack not in state.weights:
            net.route(state)
        return state.weights[stack][:, self.site], (inverse if unique.shape[0] > 1 else None)

    def generated(self, state: RoutingState) -> Tensor:
        """What the hypernetwork generates for this site and each distinct task of ``state`` (tasks, ...)."""
        previous, self.slot.state = self.slot.state, state
        try:
            s, _ = self._routing()
        finally:
            self.slot.state = previous
        return self._generate(s)

    def _per_batch(self, make: Callable[[], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        """``make()``'s generated weights; without autograd (evaluation, generation) made once per batch and reused at
        every decoding step: they live on the batch's routing state."""
        state = self.slot.state
        if torch.is_grad_enabled() or state is None:
            return make()
        if self not in state.mixed:
            state.mixed[self] = make()
        return state.mixed[self]

    @abstractmethod
    def _generate(self, s: Tensor) -> Tensor:
        """The generator outputs for projected task embeddings ``s`` (tasks, projected_dim), flattened per task."""


def _pick(generated: Tensor, inverse: Tensor | None) -> Tensor:
    """Per-task tensors (U, ...) -> per-sequence (batch, ...), or (1, ...) when the batch has one task."""
    return generated if inverse is None else generated[inverse.to(generated.device)]


class HyperLoRALinear(HyperWrapped):
    """y = W0 x + b + (alpha/r) x A_task^T B_task^T with A, B generated for the row's task."""

    def __init__(self, base_layer: nn.Linear, hyper: HyperLoader, stack: str, site: int, slot: RoutingSlot,
                 alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer, hyper, stack, site, slot)
        self.scale = alpha / hyper.stacks[stack].rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def _generate(self, s: Tensor) -> Tensor:
        """The generated A and B of each task, concatenated: (tasks, d_in * r + r * d_out)."""
        net = self.hyper.stacks[self.stack]  # type: ignore[attr-defined]
        return torch.cat([net.lora_a[str(self.in_features)](s), net.lora_b[str(self.out_features)](s)], dim=-1)

    def _pair(self) -> tuple[Tensor, ...]:
        """Each sequence's generated A (d_in, r) and B (r, d_out), or one pair when the batch has one task."""
        s, inverse = self._routing()
        net = self.hyper.stacks[self.stack]  # type: ignore[attr-defined]
        d_in, d_out, r = self.in_features, self.out_features, net.rank
        a = _pick(net.lora_a[str(d_in)](s).view(-1, r, d_in).transpose(1, 2), inverse)
        b = _pick(net.lora_b[str(d_out)](s).view(-1, d_out, r).transpose(1, 2), inverse)
        return a, b

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        a, b = self._per_batch(self._pair)
        return add_low_rank(out, x if self.dropout is None else self.dropout(x), a, b, self.scale)


class HyperAdapterLinear(HyperWrapped):
    """A sublayer's output projection followed by a generated bottleneck adapter with post-LayerNorm:
    y + LN(W_U gelu(W_D y + b_D) + b_U), applied before the block's residual add."""

    def _generate(self, s: Tensor) -> Tensor:
        """The generated adapter of each task (all six generator outputs): (tasks, total)."""
        return self.hyper.stacks[self.stack].adapter(s)  # type: ignore[attr-defined]

    def _adapter(self) -> tuple[Tensor, ...]:
        """Each sequence's generated adapter (n, 1, total), or one when the batch has one task."""
        s, inverse = self._routing()
        return (_pick(self.hyper.stacks[self.stack].adapter(s), inverse).unsqueeze(1),)  # type: ignore[attr-defined]

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        net = self.hyper.stacks[self.stack]  # type: ignore[attr-defined]
        (generated,) = self._per_batch(self._adapter)
        w_down, b_down, w_up, b_up, gamma, beta = generated.split(net.adapter_sizes, dim=-1)
        n, d = generated.shape[0], self.out_features
        w_down, w_up = w_down.view(n, net.bottleneck, d), w_up.view(n, d, net.bottleneck)
        h = fold_rows(y.to(w_down.dtype), n)
        h = F.gelu(torch.baddbmm(b_down, h, w_down.transpose(1, 2)), approximate="tanh")
        h = torch.baddbmm(b_up, h, w_up.transpose(1, 2))
        h = F.layer_norm(h, (d,)) * gamma + beta
        return y + h.view_as(y).to(y.dtype)


def _position_key(name: str) -> tuple[str, int, str]:
    """(stack, layer index, name within the layer) of a module inside a stack of numbered blocks."""
    parts = name.split(".")
    index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    if index is None:
        raise OrchmoeError(f"hyperloader needs modules inside numbered layers, got '{name}'",
                           field="method.target_modules")
    stack = parts[0] if parts[0] in ("encoder", "decoder") else "decoder"
    return stack, int(parts[index]), ".".join(parts[index + 1:])


def plan_sites(base: PreTrainedModel, method: MethodConfig) -> list[Site]:
    """Generated LoRA on the LoRA targets (q and v, self- and cross-attention) and generated bottleneck adapters
    on the output projection of each self-attention and feed-forward sublayer, so each adapter transforms the
    sublayer output before the block's residual add (T5 ``SelfAttention.o`` / ``DenseReluDense.wo``, Llama
    ``self_attn.o_proj`` / ``mlp.down_proj``)."""
    linears = linear_layers(base)
    explicit = method.target_modules is not None
    family = architecture(base, "hyperloader placement")
    lora = select(linears, method.target_modules or family.hyper_lora, explicit)
    attn, ff = (select(linears, [p], False) for p in family.hyper_adapters)
    if explicit:  # explicit LoRA targets also choose the blocks that get bottleneck adapters (e.g. top layers)
        blocks = {_position_key(name)[:2] for name in lora}
        attn, ff = ([n for n in names if _position_key(n)[:2] in blocks] for names in (attn, ff))
    clash = sorted(set(lora) & set(attn + ff))
    if clash:
        raise OrchmoeError(f"{clash[0]} already carries a hyperloader adapter; "
                           "choose other LoRA targets", field="method.target_modules")
    model_order = {name: i for i, name in enumerate(linears)}
    positions: dict[tuple[str, str], int] = {}  # LoRA position ids, numbered per stack in model order
    sites = []
    for name in sorted(lora + attn + ff, key=model_order.__getitem__):
        stack, layer, key = _position_key(name)
        kind = "hyper_lora" if name in lora else "hyper_adapter"
        if kind == "hyper_adapter":
            position = 0 if name in ff else 1  # HyperFormer ids: 0 feed-forward adapter, 1 attention adapter
        else:
            if (stack, key) not in positions:
                positions[(stack, key)] = 2 + sum(s == stack for s, _ in positions)
            position = positions[(stack, key)]
        sites.append(Site(name, linears[name].in_features, linears[name].out_features, kind, stack, layer, position))
    return sites


def _hyper_networks(sites: list[Site], method: MethodConfig, n_tasks: int) -> HyperLoader:
    stacks = {}
    for stack in dict.fromkeys(s.stack for s in sites):
        mine = [s for s in sites if s.stack == stack]
        lora = [s for s in mine if s.kind == "hyper_lora"]
        adapter_dims = sorted({s.d_out for s in mine if s.kind == "hyper_adapter"})
        if len(adapter_dims) > 1:
            raise OrchmoeError(f"hyperloader: adapter sites of the {stack} have different sizes {adapter_dims}")
        stacks[stack] = StackHyperNetwork(
            sites=[(s.layer, s.position) for s in mine], embedding_dim=method.task_embedding_dim,
            hidden_dim=method.hidden_dim, projected_dim=method.projected_dim, rank=method.rank,
            lora_in=sorted({s.d_in for s in lora}), lora_out=sorted({s.d_out for s in lora}),
            adapter_dim=adapter_dims[0] if adapter_dims else None, bottleneck=method.adapter_bottleneck or 1)
    return HyperLoader(n_tasks, method.task_embedding_dim, stacks)


class HyperLoaderRouting(RoutingFamily):
    """hyperloader: LoRA and adapters generated per task from [task; layer; position] embeddings."""

    needs_task_ids: ClassVar[bool] = True
    mergeable: ClassVar[bool] = False
    merge_refusal: ClassVar[str] = "generates non-linear bottleneck adapters"
    # generators of positions a base model lacks (e.g. cross-attention on decoder-only) get no gradient
    may_skip_parameters: ClassVar[bool] = True
    inspects_generated_adapters: ClassVar[bool] = True
    adapt_modes: ClassVar[dict[str, AdaptMode]] = {
        # a new task embedding, the hypernetwork frozen (with_router: unfrozen)
        "hyperloader": AdaptMode(("hyperloader",), ("new_task_row",), new_task=True,
                                 with_router=("new_task_row", "hypernetwork")),
    }

    def defaults(self, method: MethodConfig, hidden_size: int) -> dict[str, Any]:
        """Its code uses alpha = r (scale 1) and trains the base model's layer norms."""
        return {**super().defaults(method, hidden_size), "alpha": float(method.rank), "train_layer_norms": True}

    def resolve(self, method: MethodConfig, hidden_size: int) -> MethodConfig:
        return dataclasses.replace(super().resolve(method, hidden_size), n_skills=1)

    def plan(self, base: PreTrainedModel, method: MethodConfig) -> list[Site]:
        return plan_sites(base, method)

    def build(self, sites: list[Site], method: MethodConfig, n_tasks: int, hidden_size: int, slot: RoutingSlot,
              base_for: Callable[[Site], nn.Linear]) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
        assert method.alpha is not None, "build() takes a resolved method"
        hyper = _hyper_networks(sites, method, n_tasks)
        order = {stack: [s.name for s in sites if s.stack == stack] for stack in hyper.stacks}
        wrappers: dict[str, nn.Module] = {}
        for s in sites:
            args = (base_for(s), hyper, s.stack, order[s.stack].index(s.name), slot)
            wrappers[s.name] = (HyperLoRALinear(*args, alpha=method.alpha, dropout=method.dropout)
                                if s.kind == "hyper_lora" else HyperAdapterLinear(*args))
        return wrappers, {"hyper": hyper}

    def route(self, model: AdaptedModel, inputs: RoutingInputs) -> Routing:
        state = checked_task_ids(model, inputs.task_ids)
        model.extras["hyper"].route(state)
        return Routing(state)

    def fixed_routings(self, model: AdaptedModel, tasks: list[str] | None) -> list[FixedRouting]:
        raise OrchmoeError("hyperloader generates bottleneck adapters (a non-linear map) beside its LoRAs, so neither "
                           "a peft LoRA nor a merged model can equal it, and exporting only its LoRA part would be "
                           "wrong; serve the orchmoe checkpoint itself (orchmoe generate / orchmoe eval)")

    def describe_routing(self, model: AdaptedModel, state: RoutingState | None, rows: int,
                         task: str | None) -> list[dict[str, Any]]:
        how = f"task {task}" if task else "the mean task embedding (no --task: as for a task unseen in training)"
        return [{"task": task, "routing": how} for _ in range(rows)]

    def add_task(self, model: AdaptedModel) -> list[nn.Parameter]:
        """A task embedding drawn N(0, 1), as at training start."""
        net = model.extras["hyper"]
        table = net.task_embedding
        net.task_embedding = append_row(table, torch.randn(1, table.shape[1], device=table.device, dtype=table.dtype))
        return [net.task_embedding]

    @torch.no_grad()
    def generated_adapters(self, model: AdaptedModel, task_ids: Tensor) -> Tensor:
        """Every generated adapter tensor of each task, flattened, (tasks, features)."""
        was_training = model.training
        model.eval()
        try:
            state = RoutingState(task_ids.shape[0], task_ids=task_ids.to(model.device))
            model.extras["hyper"].route(state)
            parts = [module.generated(state) for module in model.base.modules() if isinstance(module, HyperWrapped)]
        finally:
            model.train(was_training)
        return torch.cat([p.reshape(task_ids.shape[0], -1).float() for p in parts], dim=1)
