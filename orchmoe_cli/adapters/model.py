"""The adapted model: a frozen base model plus one method's adapters, routed per batch.

Routing is explicit: ``with model.routing(task_ids=...)`` (or ``input_ids``/``prompt_mask`` for
OrchMoE) computes what routing needs once for the batch; ``forward`` and ``generate`` do this for
the caller. Everything else (counting, groups, save, merge, peft export) lives here as thin,
method-agnostic operations over the wrappers that ``inject`` installed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from orchmoe_cli import __version__
from orchmoe_cli.adapters.budget import GROUPS, choose_rank, group_of, hidden_size, layer_norm_parameters
from orchmoe_cli.adapters.config import MethodConfig
from orchmoe_cli.adapters.context import RoutingSlot, RoutingState
from orchmoe_cli.adapters.files import (
    CONFIG_FILE,
    FORMAT,
    TASKS_FILE,
    WEIGHTS_FILE,
    base_summary,
    check_tensors,
    write_tensors,
)
from orchmoe_cli.adapters.hyper import HyperWrapped
from orchmoe_cli.adapters.inject import build, install, plan
from orchmoe_cli.adapters.layer import SkillLoRALinear, WrappedLinear
from orchmoe_cli.adapters.orchmoe import load_balance_loss, mutual_information, supervision_loss
from orchmoe_cli.adapters.registry import resolve, spec_of
from orchmoe_cli.adapters.routers import AverageRouter, allocation_probabilities, route_layers
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.fsutil import atomic_write_json


class AdaptedModel(nn.Module):
    """``base`` with adapters installed in place; ``method`` is the resolved method config."""

    def __init__(self, base: PreTrainedModel, method: MethodConfig, task_names: list[str],
                 extras: dict[str, nn.Module], slot: RoutingSlot) -> None:
        super().__init__()
        self.base = base
        for key, module in extras.items():
            self.add_module(key, module)
        self.method = method
        self.task_names = list(task_names)
        self.spec = spec_of(method)
        self.slot = slot
        self.averaged = False  # task routers replaced by the average of skills (to_average)
        self.adapted_tasks: list[str] = []  # rows added by `orchmoe adapt` (not multi-task training tasks)
        self._aux: dict[str, Tensor] = {}
        self._last_task_probs: Tensor | None = None  # OrchMoE: p(t|x) of the last routed batch, for diagnostics
        self._layers = [m for m in base.modules() if isinstance(m, SkillLoRALinear)]

    # ------------------------------------------------------------------ routing

    @contextmanager
    def routing(self, task_ids: Tensor | None = None, input_ids: Tensor | None = None,
                prompt_mask: Tensor | None = None,
                category_ids: Tensor | None = None) -> Iterator[RoutingState | None]:
        """Set the routing of the enclosed forward/generate calls; yields the batch's routing state.

        ``task_ids`` index ``task_names`` (-1 = a task not seen in training); OrchMoE reads only
        ``input_ids`` and ``prompt_mask`` (1 on prompt tokens; the encoder inputs on encoder-decoder).
        """
        state = self._routing_state(task_ids, input_ids, prompt_mask, category_ids)
        previous, self.slot.state = self.slot.state, state
        try:
            yield state
        finally:
            self.slot.state = previous

    def _routing_state(self, task_ids: Tensor | None, input_ids: Tensor | None, prompt_mask: Tensor | None,
                       category_ids: Tensor | None) -> RoutingState | None:
        """The batch's routing inputs, with every layer's skill weights computed together."""
        state = self._routing_inputs(task_ids, input_ids, prompt_mask, category_ids)
        if state is not None:  # outside any layer, so activation checkpointing replays the same tensors
            route_layers([layer.router for layer in self._layers], state)
            if self.spec.router == "hyper":
                self.hyper.route(state)
        return state

    def _routing_inputs(self, task_ids: Tensor | None, input_ids: Tensor | None, prompt_mask: Tensor | None,
                        category_ids: Tensor | None) -> RoutingState | None:
        self._aux = {}
        if self.spec.router == "orchmoe":
            return self._classify(input_ids, prompt_mask, category_ids)
        if self.spec.router == "constant" or self.averaged:
            return None
        if task_ids is None:
            if self.spec.average_at_eval and not self.training:
                return None
            raise OrchmoeError(f"{self.method.name} routes by task id: pass task_ids (indices into the "
                               "model's task names, -1 for an unseen task)")
        ids = torch.as_tensor(task_ids, dtype=torch.long).reshape(-1)
        bad = (ids < -1) | (ids >= len(self.task_names))
        if ids.numel() == 0 or bool(bad.any()):
            shown = ids[bad][0].item() if bool(bad.any()) else "none"
            raise OrchmoeError(f"task id {shown} is out of range: the model knows {len(self.task_names)} tasks "
                               "(ids 0..n-1) and -1 means an unseen task")
        return RoutingState(ids.shape[0], task_ids=ids.to(self._device))

    def _task_logits(self, input_ids: Tensor, prompt_mask: Tensor | None) -> Tensor:
        """OrchMoE's Automatic Task Classification: abstract-task logits (batch, T) from the prompt alone."""
        mask = torch.ones_like(input_ids) if prompt_mask is None else prompt_mask
        with torch.no_grad():
            embeddings = self.base.get_input_embeddings()(input_ids)
        return self.task_classifier(embeddings, mask.to(embeddings.device))

    def _classify(self, input_ids: Tensor | None, prompt_mask: Tensor | None,
                  category_ids: Tensor | None) -> RoutingState:
        """The classifier's p(t|x), once per call; also records its auxiliary losses."""
        if input_ids is None:
            raise OrchmoeError("orchmoe routes from the prompt: pass input_ids (and prompt_mask)")
        logits = self._task_logits(input_ids, prompt_mask)
        probs = torch.softmax(logits, dim=-1)
        self._last_task_probs = probs.detach()
        if self.method.mutual_information_weight > 0 and self.training:
            self._aux["mutual_information"] = -self.method.mutual_information_weight * mutual_information(probs)
        if self.method.load_balance_weight > 0:
            self._aux["load_balance"] = self.method.load_balance_weight * load_balance_loss(probs)
        if category_ids is not None and self.method.task_supervision_weight > 0:
            loss = supervision_loss(logits, category_ids)
            if loss is not None:
                self._aux["task_supervision"] = self.method.task_supervision_weight * loss
        return RoutingState(input_ids.shape[0], task_probs=probs)

    def _default_prompt_mask(self, batch: dict[str, Any]) -> Tensor | None:
        """Prompt tokens when the batch does not say: the attention mask, minus labelled target tokens on
        decoder-only models (so OrchMoE never sees the answer it is trained to produce)."""
        input_ids = batch.get("input_ids")
        if input_ids is None:
            return None
        mask = batch.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask
        labels = batch.get("labels")
        if not self.base.config.is_encoder_decoder and labels is not None and labels.shape == input_ids.shape:
            mask = mask * (labels == -100).to(mask.dtype)
        return mask

    def forward(self, **batch: Any) -> ModelOutput:
        """Pop ``task_ids`` / ``prompt_mask`` / ``category_ids`` from the batch, route, call the base model.

        The batch's routing stays in place after returning (until the next routed call), because
        activation checkpointing re-runs layers during ``backward`` and they must route the same way.
        """
        task_ids = batch.pop("task_ids", None)
        prompt_mask = batch.pop("prompt_mask", None)
        category_ids = batch.pop("category_ids", None)
        if self.spec.router == "orchmoe" and prompt_mask is None:
            prompt_mask = self._default_prompt_mask(batch)
        self.slot.state = self._routing_state(task_ids, batch.get("input_ids"), prompt_mask, category_ids)
        return self.base(**batch)

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, task_ids: Tensor | None = None,
                 **gen_kwargs: Any) -> Tensor:
        """Route once from the prompt, then ``base.generate`` (beams and returned sequences included)."""
        with self.routing(task_ids=task_ids, input_ids=input_ids, prompt_mask=attention_mask) as state, \
                self._merged_for(state):
            return self.base.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)

    @contextmanager
    def _merged_for(self, state: RoutingState | None) -> Iterator[None]:
        """While a batch whose rows all route alike generates, its LoRA sits folded into the base weights.

        Unmerged, every adapted linear adds two small matmuls per decoding step, and on CPU their dispatch,
        not their arithmetic, costs up to a third of the bare model's speed; folding costs a few passes over the
        adapted weights per batch (copy, add, restore), and :meth:`unmerge` restores them exactly. Methods whose
        routing differs row by row (OrchMoE) or that generate non-linear adapters (HyperLoader) generate unmerged.
        """
        single = state is None or state.shared
        if not (self.spec.mergeable and single and not self.training) or any(layer.merged for layer in self._layers):
            yield
            return
        self.merge(None if state is None or state.task_ids is None else int(state.task_ids[0]))
        try:
            yield
        finally:
            self.unmerge()

    @property
    def task_index(self) -> dict[str, int] | None:
        """Task name -> routing index (the order of ``tasks.json``); None for methods that never read a task id.

        Batches map names through this, so a task the model does not know gets -1 (an unseen task)."""
        if not self.spec.needs_task_ids:
            return None
        return {name: i for i, name in enumerate(self.task_names)}

    def category_index(self, categories: list[str]) -> dict[str, int] | None:
        """Category -> abstract-task index when routing also learns from categories (OrchMoE's optional
        supervised term), else None."""
        if self.spec.router != "orchmoe" or self.method.task_supervision_weight == 0:
            return None
        if len(categories) > self.method.n_abstract_tasks:
            raise OrchmoeError(
                f"method.n_abstract_tasks: task supervision maps {len(categories)} training categories onto "
                f"abstract tasks; set n_abstract_tasks >= {len(categories)} or task_supervision_weight: 0")
        return {c: i for i, c in enumerate(sorted(categories))}

    def aux_losses(self) -> dict[str, Tensor]:
        """Auxiliary losses of the last routed call, already weighted; add them to the LM loss."""
        return dict(self._aux)

    # ------------------------------------------------------------------ parameters

    @property
    def _device(self) -> torch.device:
        return self.base.get_input_embeddings().weight.device

    def named_adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every tensor the method adds or trains (regardless of requires_grad), by checkpoint name."""
        for name, module in self.named_modules():
            if isinstance(module, WrappedLinear):
                for pname, param in module.named_parameters():
                    if not pname.startswith("base_layer."):
                        yield f"{name}.{pname}", param
        for key in ("task_classifier", "hyper"):
            if hasattr(self, key):
                for pname, param in getattr(self, key).named_parameters():
                    yield f"{key}.{pname}", param
        if self.method.train_layer_norms:
            for name, param in layer_norm_parameters(self.base).items():
                yield f"base.{name}", param

    @property
    def lora_scale(self) -> float:
        """alpha / rank, the factor every LoRA update is multiplied by (equal budgets compare at equal scale)."""
        return float(self.method.alpha) / self.method.rank  # type: ignore[arg-type]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by group (adapters, routers, hypernetwork, other), for per-group learning rates."""
        groups: dict[str, list[nn.Parameter]] = {}
        for name, param in self.named_adapter_parameters():
            if param.requires_grad:
                groups.setdefault(group_of(name), []).append(param)
        return groups

    def count_parameters(self) -> dict[str, int]:
        """Parameters per group, plus total_trainable and base (the base model's own parameters)."""
        counts = dict.fromkeys(GROUPS, 0)
        added = set()
        for name, param in self.named_adapter_parameters():
            counts[group_of(name)] += param.numel()
            if group_of(name) != "other":  # "other" tensors are the base model's own (its layer norms)
                added.add(id(param))
        counts["total_trainable"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        counts["base"] = sum(p.numel() for p in self.base.parameters() if id(p) not in added)
        return counts

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Only adapter, router, hypernetwork and method-trained base tensors."""
        return {name: param.detach() for name, param in self.named_adapter_parameters()}

    @torch.no_grad()
    def load_adapter_state_dict(self, tensors: dict[str, Tensor], source: str) -> None:
        """Copy ``tensors`` in; every expected name must be present with its exact shape."""
        own = dict(self.named_adapter_parameters())
        check_tensors({name: tuple(p.shape) for name, p in own.items()}, tensors, source, self.method.name)
        for name, param in own.items():
            param.copy_(tensors[name])

    # ------------------------------------------------------------------ inspection

    def routing_probabilities(self) -> dict[str, Tensor]:
        """Eval-mode allocation probabilities per adapted layer, {layer: (rows, heads, skills)}: rows are the
        training tasks (poly, mhr and their _mu variants) or the abstract tasks (orchmoe). The layers mix
        skills with these normalised over skills. An error for methods without a learned allocation."""
        if self.spec.router not in ("task", "orchmoe") or self.averaged:
            raise OrchmoeError(f"{self.method.name}{' (averaged)' if self.averaged else ''} has no learned "
                               "task-skill allocation to inspect")
        return allocation_probabilities(self.adapter_state_dict(), self.method.n_heads or 1, self.method.n_skills,
                                        self.method.straight_through)

    @torch.no_grad()
    def routing_diagnostics(self) -> dict[str, float]:
        """Numbers that show a routing collapse while training (empty for methods that cannot collapse so):
        OrchMoE's router entropy (mean normalised entropy of p(t|x) over the last batch: 1 = uniform), the
        normalised entropy of its batch-marginal usage, and the allocation spread (largest difference
        between two abstract tasks' eval-mode weights for one skill, over layers)."""
        if self.spec.router != "orchmoe" or self._last_task_probs is None:
            return {}
        probs = self._last_task_probs.float().clamp_min(1e-12)
        n = probs.shape[-1]
        norm = math.log(n) if n > 1 else 1.0
        weights = torch.stack(list(self.routing_probabilities().values()))
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return {
            "router_entropy": float(-(probs * probs.log()).sum(-1).mean() / norm),
            "marginal_entropy": float(-(probs.mean(0) * probs.mean(0).log()).sum() / norm),
            "allocation_spread": float((weights.amax(dim=1) - weights.amin(dim=1)).max()),
        }

    @torch.no_grad()
    def task_distribution(self, input_ids: Tensor, prompt_mask: Tensor | None = None) -> Tensor:
        """OrchMoE: p(abstract task | prompt), (batch, T), exactly as routing computes it."""
        if self.spec.router != "orchmoe":
            raise OrchmoeError(f"{self.method.name} has no task classifier; only orchmoe infers abstract tasks")
        return torch.softmax(self._task_logits(input_ids.to(self._device), prompt_mask), dim=-1)

    @torch.no_grad()
    def generated_adapters(self, task_ids: Tensor) -> Tensor:
        """HyperLoader: every generated adapter tensor of each task, flattened, (tasks, features)."""
        if self.spec.router != "hyper":
            raise OrchmoeError(f"{self.method.name} generates no adapters; only hyperloader has a hypernetwork")
        was_training = self.training
        self.eval()
        try:
            state = RoutingState(task_ids.shape[0], task_ids=task_ids.to(self._device))
            self.hyper.route(state)
            parts = [module.generated(state) for module in self.base.modules() if isinstance(module, HyperWrapped)]
        finally:
            self.train(was_training)
        return torch.cat([p.reshape(task_ids.shape[0], -1).float() for p in parts], dim=1)

    # ------------------------------------------------------------------ evaluation helpers

    @torch.no_grad()
    def merge(self, task_id: int | None = None) -> None:
        """Fold one fixed routing into the base weights: ``task_id``'s, or the average (None / -1)."""
        if not self.spec.mergeable:
            why = ("routes each input from its prompt" if self.spec.router == "orchmoe"
                   else "generates non-linear bottleneck adapters")
            raise OrchmoeError(f"{self.method.name} {why}, so it cannot be merged into the base weights")
        layers = self._layers
        if any(layer.merged for layer in layers):
            raise OrchmoeError("adapters are already merged; call unmerge() first")
        tid = -1 if task_id is None else int(task_id)
        if not -1 <= tid < len(self.task_names):
            raise OrchmoeError(f"task id {tid} is out of range: the model knows {len(self.task_names)} tasks")
        state = RoutingState(1, task_ids=torch.tensor([tid], device=self._device))
        for layer in layers:
            was_training = layer.router.training
            layer.router.eval()
            try:
                weights = layer.router(state)
            finally:
                layer.router.train(was_training)
            layer.merge(weights[0])

    def unmerge(self) -> None:
        """Restore the exact base weights."""
        for layer in self._layers:
            layer.unmerge()

    def to_average(self) -> None:
        """Replace every task router by the average of skills (Poly-µ / MHR-µ, before adaptation)."""
        if self.spec.router != "task":
            raise OrchmoeError(f"to_average() applies to poly, mhr and their _mu variants, not {self.method.name}")
        heads, skills = self.method.n_heads or 1, self.method.n_skills
        for layer in self._layers:
            layer.router = AverageRouter(heads, skills).to(self._device)
        self.averaged = True

    def save(self, directory: str | Path) -> None:
        """adapter_config.json (method, base summary, version) + adapter_model.safetensors + tasks.json.

        The config is written last, so a directory with a config holds a complete checkpoint."""
        directory = Path(directory)
        config = {
            "format": FORMAT, "format_version": 1, "orchmoe_version": __version__,
            "method": dataclasses.asdict(self.method), "averaged": self.averaged, "adapted_tasks": self.adapted_tasks,
            "base_model": base_summary(self.base), "parameters": self.count_parameters(),
        }
        write_tensors(directory / WEIGHTS_FILE, self.adapter_state_dict(), {"format": "pt", "orchmoe": FORMAT})
        atomic_write_json(directory / TASKS_FILE, self.task_names)
        atomic_write_json(directory / CONFIG_FILE, config)

    def export_peft(self, directory: str | Path) -> None:
        """Write a peft checkpoint (lora, poly, mhr) that ``PeftModel.from_pretrained`` loads."""
        from orchmoe_cli.adapters.peft_interop import export_peft  # peft is imported only when exporting

        export_peft(self, Path(directory))


def _check_task_names(task_names: list[str], needs_tasks: bool, method: str) -> list[str]:
    names = list(task_names)
    if any(not isinstance(n, str) or not n for n in names):
        raise OrchmoeError("task names must be non-empty strings")
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise OrchmoeError(f"task names must be unique; '{duplicate}' appears twice")
    if needs_tasks and not names:
        raise OrchmoeError(f"{method} routes by task: give the names of the training tasks")
    return names


def attach_adapters(base: PreTrainedModel, method: MethodConfig, task_names: list[str]) -> AdaptedModel:
    """Freeze ``base``, install ``method``'s adapters in place, and return the adapted model."""
    spec = spec_of(method)
    names = _check_task_names(task_names, spec.needs_task_ids, method.name)
    hidden = hidden_size(base)
    if method.budget is not None:  # the budget picks the rank; the LoRA scale alpha/r stays as written
        rank = choose_rank(base, method, len(names))
        alpha = resolve(method, hidden).alpha * rank / method.rank  # type: ignore[operator]
        method = dataclasses.replace(method, rank=rank, alpha=alpha)
    resolved = resolve(method, hidden)
    sites = plan(base, resolved)
    slot = RoutingSlot()
    base.requires_grad_(False)
    wrappers, extras = build(sites, resolved, len(names), hidden, slot, lambda s: base.get_submodule(s.name))
    device = base.get_input_embeddings().weight.device
    for module in [*wrappers.values(), *extras.values()]:
        module.to(device)
    install(base, wrappers)
    if resolved.train_layer_norms:
        for param in layer_norm_parameters(base).values():
            param.requires_grad_(True)
    return AdaptedModel(base, resolved, names, extras, slot)
