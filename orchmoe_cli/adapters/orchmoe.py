"""OrchMoE (Wang et al., 2024): Automatic Task Classification and Task-Skill Allocation, never a task id.

The classifier reads only the prompt: X = the frozen input-embedding rows of the prompt tokens,
X^ = softmax(X X^T / sqrt(d)) X + X over prompt tokens, a masked mean pool, and a linear map to T
abstract-task logits. It runs once per forward/generate call; its distribution p(t|x) feeds every layer's
Task-Skill Allocation (:class:`AllocationRouter`). A mutual-information term keeps the abstract tasks both
used and distinct; an optional load-balancing and a supervised (category) term can be added.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import Tensor, nn

from orchmoe_cli.adapters.context import RoutingInputs, RoutingState
from orchmoe_cli.adapters.family import AdaptMode, FixedRouting, Routing, RoutingFamily
from orchmoe_cli.adapters.files import write_tensors
from orchmoe_cli.fsutil import atomic_write_json
from orchmoe_cli.adapters.skill_weights import normalise, relaxed_sigmoid
from orchmoe_cli.errors import OrchmoeError

if TYPE_CHECKING:
    from orchmoe_cli.adapters.method_config import MethodConfig
    from orchmoe_cli.adapters.model import AdaptedModel


class TaskClassifier(nn.Module):
    """Prompt embeddings (batch, L, d) and prompt mask (batch, L) -> abstract-task logits (batch, T)."""

    parameter_group = "routers"

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


class AllocationRouter(nn.Module):
    """OrchMoE Task-Skill Allocation: per-layer Z (T, h, S) from abstract tasks to skills.

    w(x) = normalise_S( sum_t p(t|x) * relaxed_sigmoid(Z[t]) ), with p(t|x) computed once per batch
    by the model-level task classifier and carried in the routing state.
    """

    def __init__(self, n_abstract_tasks: int, n_heads: int, n_skills: int, temperature: float = 1.0,
                 straight_through: bool = False, init_spread: float = 1e-3) -> None:
        super().__init__()
        self.temperature, self.straight_through = temperature, straight_through
        self.allocation = nn.Parameter(torch.empty(n_abstract_tasks, n_heads, n_skills))
        # U(-a, a): Poly's 1e-3 leaves the abstract tasks' rows nearly equal, a symmetric start the
        # classifier gets no gradient to leave; a larger spread gives each abstract task its own mixture
        nn.init.uniform_(self.allocation, -init_spread, init_spread)

    def forward(self, state: RoutingState | None) -> Tensor:
        if state is None or state.task_probs is None:
            raise OrchmoeError("orchmoe routes from the prompt: set routing with input_ids (and prompt_mask)")
        found = state.weights.get(self)
        return found if found is not None else route_allocations([self], state.task_probs)[0]


def route_allocations(routers: list[AllocationRouter], task_probs: Tensor) -> Tensor:
    """Weights (layers, batch, h, S) of several allocation routers at once."""
    first = routers[0]
    allocation = (first.allocation.unsqueeze(0) if len(routers) == 1
                  else torch.stack([r.allocation for r in routers]))
    probs = task_probs.to(allocation.dtype)
    if first.training:  # one relaxed-Bernoulli draw per sequence, as Poly draws per row
        logits = allocation.unsqueeze(1).expand(-1, probs.shape[0], -1, -1, -1)
        sampled = relaxed_sigmoid(logits, first.temperature, True, first.straight_through)
        return normalise(torch.einsum("bt,lbths->lbhs", probs, sampled))
    soft = relaxed_sigmoid(allocation, first.temperature, False, first.straight_through)
    return normalise(torch.einsum("bt,lths->lbhs", probs, soft))


def across_processes(rows: Tensor) -> Tensor:
    """``rows`` of every data-parallel process, concatenated (this process's own rows keep their gradient, and the
    gradients that the other processes' copies receive flow back to their owners); ``rows`` in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    with warnings.catch_warnings():  # the public differentiable all_gather; its successors are private for now
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dist_nn.all_gather(rows))


ROUTER_DIR = "router"  # an export's task classifier, beside one LoRA per abstract task


def abstract_task_adapter(t: int, n: int) -> str:
    """The exported adapter name of abstract task ``t`` of ``n`` (what a router asks a multi-LoRA server for)."""
    return f"abstract_task_{t:0{len(str(n - 1))}d}"


def _default_prompt_mask(model: AdaptedModel, inputs: RoutingInputs) -> Tensor | None:
    """Prompt tokens when the batch does not say: the attention mask, minus labelled target tokens on
    decoder-only models (so OrchMoE never sees the answer it is trained to produce)."""
    if inputs.prompt_mask is not None or inputs.input_ids is None:
        return inputs.prompt_mask
    mask = inputs.attention_mask
    mask = torch.ones_like(inputs.input_ids) if mask is None else mask
    labels = inputs.labels
    if not model.base.config.is_encoder_decoder and labels is not None and labels.shape == inputs.input_ids.shape:
        mask = mask * (labels == -100).to(mask.dtype)
    return mask


class OrchMoERouting(RoutingFamily):
    """orchmoe: p(t|x) from the prompt, then per layer w(x) = normalise_S(sum_t p(t|x) sigmoid(Z_l[t]))."""

    mergeable: ClassVar[bool] = False
    merge_refusal: ClassVar[str] = "routes each input from its prompt"
    allocation_tensor: ClassVar[str | None] = "allocation"
    allocation_rows: ClassVar[str] = "abstract task"
    classifies_prompts: ClassVar[bool] = True
    adapt_modes: ClassVar[dict[str, AdaptMode]] = {
        # no task id, ever: the skills train (with_router: also the classifier and the allocations)
        "orchmoe": AdaptMode(("orchmoe",), ("adapters",), with_router=("adapters", "routers")),
    }

    def extras(self, method: MethodConfig, hidden_size: int) -> dict[str, nn.Module]:
        return {"task_classifier": TaskClassifier(hidden_size, method.n_abstract_tasks,
                                                  method.classifier_temperature)}

    def make_router(self, method: MethodConfig, n_tasks: int) -> nn.Module:
        return AllocationRouter(method.n_abstract_tasks, method.n_heads or 1, method.n_skills,
                                method.router_temperature, method.straight_through, method.allocation_init_spread)

    def task_logits(self, model: AdaptedModel, input_ids: Tensor, prompt_mask: Tensor | None) -> Tensor:
        """Automatic Task Classification: abstract-task logits (batch, T) from the prompt alone."""
        mask = torch.ones_like(input_ids) if prompt_mask is None else prompt_mask
        with torch.no_grad():
            embeddings = model.base.get_input_embeddings()(input_ids)
        return model.extras["task_classifier"](embeddings, mask.to(embeddings.device))

    def task_distribution(self, model: AdaptedModel, input_ids: Tensor, prompt_mask: Tensor | None) -> Tensor:
        """p(abstract task | prompt), (batch, T), exactly as routing computes it."""
        return torch.softmax(self.task_logits(model, input_ids.to(model.device), prompt_mask), dim=-1)

    def route(self, model: AdaptedModel, inputs: RoutingInputs) -> Routing:
        """The classifier's p(t|x), once per call, every layer's allocation from it, and the routing losses.

        All of it in float32 with autocast off, so p(t|x) is the same in bf16 training as at evaluation; the batch
        terms (mutual information, balance) see the whole global batch under data parallelism, so the objective
        does not change with the number of processes."""
        if inputs.input_ids is None:
            raise OrchmoeError("orchmoe routes from the prompt: pass input_ids (and prompt_mask)")
        with torch.autocast(inputs.input_ids.device.type, enabled=False):
            return self._route(model, inputs)

    def _route(self, model: AdaptedModel, inputs: RoutingInputs) -> Routing:
        method = model.method
        assert inputs.input_ids is not None
        logits = self.task_logits(model, inputs.input_ids, _default_prompt_mask(model, inputs))
        probs = torch.softmax(logits, dim=-1)
        batch_probs = across_processes(probs) if model.training else probs
        aux: dict[str, Tensor] = {}
        if method.mutual_information_weight > 0 and model.training:
            aux["mutual_information"] = -method.mutual_information_weight * mutual_information(batch_probs)
        if method.load_balance_weight > 0:
            aux["load_balance"] = method.load_balance_weight * load_balance_loss(batch_probs)
        if inputs.category_ids is not None and method.task_supervision_weight > 0:
            loss = supervision_loss(logits, inputs.category_ids)
            if loss is not None:
                aux["task_supervision"] = method.task_supervision_weight * loss
        state = RoutingState(inputs.input_ids.shape[0], task_probs=probs)
        for training in (True, False):  # routers in one mode share one batched computation
            routers = [layer.router for layer in model.layers
                       if isinstance(layer.router, AllocationRouter) and layer.router.training == training]
            if routers:
                state.weights.update(zip(routers, route_allocations(routers, probs).unbind(0), strict=True))
        return Routing(state, aux, {"task_probs": probs.detach()})

    @torch.no_grad()
    def diagnostics(self, model: AdaptedModel, record: dict[str, Tensor]) -> dict[str, float]:
        """Router entropy (mean normalised entropy of p(t|x) over the batch: 1 = uniform), the normalised entropy
        of its batch-marginal usage, and the allocation spread (largest difference between two abstract tasks'
        eval-mode weights for one skill, over layers)."""
        if "task_probs" not in record:
            return {}
        probs = record["task_probs"].float().clamp_min(1e-12)
        n = probs.shape[-1]
        norm = math.log(n) if n > 1 else 1.0
        weights = torch.stack(list(model.routing_probabilities().values()))
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return {
            "router_entropy": float(-(probs * probs.log()).sum(-1).mean() / norm),
            "marginal_entropy": float(-(probs.mean(0) * probs.mean(0).log()).sum() / norm),
            "allocation_spread": float((weights.amax(dim=1) - weights.amin(dim=1)).max()),
        }

    def fixed_routings(self, model: AdaptedModel, tasks: list[str] | None) -> list[FixedRouting]:
        """One LoRA per abstract task t, the skills mixed by normalise_S(sigmoid(Z_l[t])): exact for a prompt whose
        p(t|x) is one-hot at t; serving routes each prompt to its most probable abstract task."""
        if tasks:
            raise OrchmoeError("orchmoe routes from the prompt, never a task id: export takes no --task (it writes "
                               "one adapter per abstract task)")
        n = model.method.n_abstract_tasks
        return [FixedRouting(abstract_task_adapter(t, n), f"abstract task {t}",
                             RoutingState(1, task_probs=F.one_hot(torch.tensor([t]), n).float().to(model.device)),
                             f"prompts with p(abstract task {t} | prompt) = 1") for t in range(n)]

    def export_extras(self, model: AdaptedModel, directory: Path) -> dict[str, Any]:
        """The task classifier (safetensors) and how to apply it, so a gateway can route each prompt to its adapter:
        p(t|x) = softmax(classifier(input embeddings of the prompt's tokens)), adapter = argmax_t."""
        router = directory / ROUTER_DIR
        router.mkdir(parents=True)
        classifier = model.extras["task_classifier"]
        tensors = {k: v.detach().float().contiguous() for k, v in classifier.state_dict().items()}
        write_tensors(router / "task_classifier.safetensors", tensors, {"format": "pt"})
        n = model.method.n_abstract_tasks
        atomic_write_json(router / "router.json", {
            "classifier": "task_classifier.safetensors", "n_abstract_tasks": n,
            "temperature": model.method.classifier_temperature,
            "reads": "the base model's input-embedding rows of the prompt tokens (as formatted for training)",
            "adapters": [abstract_task_adapter(t, n) for t in range(n)],
            "route": "orchmoe generate CHECKPOINT --route-only PROMPT (or --input FILE): the adapter per prompt"})
        return {"router": ROUTER_DIR}

    def describe_routing(self, model: AdaptedModel, state: RoutingState | None, rows: int,
                         task: str | None) -> list[dict[str, Any]]:
        """The abstract-task distribution of each prompt, its most probable abstract task and that task's exported
        adapter (what a multi-LoRA server would be asked for)."""
        assert state is not None and state.task_probs is not None
        probs = state.task_probs.float().cpu()
        n = probs.shape[1]
        chosen = probs.argmax(dim=1).tolist()
        return [{"abstract_task": t, "abstract_task_mass": round(float(p[t]), 4),
                 "adapter": abstract_task_adapter(t, n), "abstract_task_probs": [round(float(x), 4) for x in p]}
                for t, p in zip(chosen, probs)]

    def category_index(self, method: MethodConfig, categories: list[str]) -> dict[str, int] | None:
        """Category -> abstract-task index for the optional supervised term (None when it is off)."""
        if method.task_supervision_weight == 0:
            return None
        if len(categories) > method.n_abstract_tasks:
            raise OrchmoeError(
                f"method.n_abstract_tasks: task supervision maps {len(categories)} training categories onto "
                f"abstract tasks; set n_abstract_tasks >= {len(categories)} or task_supervision_weight: 0")
        return {c: i for i, c in enumerate(sorted(categories))}

