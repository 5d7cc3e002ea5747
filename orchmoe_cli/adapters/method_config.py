"""The `method` section of a recipe: which adapter family member to train and its sizes.

Fields left at ``None`` take the method's own default (see ``registry.py``), so one recipe field
can carry the value each paper uses: e.g. ``alpha`` is 1 for the Poly/MHR family (scale 1/r, as
mttl and peft) but equal to the rank for HyperLoader (scale 1, as its code).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass

from orchmoe_cli.adapters.registry import SPECS, method_names
from orchmoe_cli.errors import FieldError
from orchmoe_cli.schema import help_field as _f

_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*([kKmMgGbB]?)\s*$")
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}
_MAX_BUDGET = 1e15  # far beyond any model; also keeps 1e999 (infinity) out


def parse_budget(text: str) -> int:
    """'2.5M' -> 2500000, '800k' -> 800000, '12000' -> 12000; ValueError if unreadable."""
    match = _BUDGET.match(text)
    if match is None:
        raise ValueError(f"expected a parameter count like 2.5M, 800k or 120000, got '{text}'")
    value = float(match.group(1)) * _SUFFIX[match.group(2).lower()]
    if not math.isfinite(value):
        raise ValueError(f"expected a finite parameter count, got '{text}'")
    if not 1 <= value <= _MAX_BUDGET:
        raise ValueError(f"must be between 1 parameter and {_MAX_BUDGET:.0e}, got '{text}'")
    return round(value)


@dataclass
class MethodConfig:
    name: str = _f("none", "adapter method: one of " + ", ".join(method_names()) + "; none = the base model alone "
                   "(zero-shot baseline)")
    rank: int = _f(8, "LoRA rank of every skill (and of HyperLoader's generated LoRA); ignored when `budget` "
                   "is set, which chooses it", min=1)
    alpha: float | None = _f(None, "LoRA scale numerator: scale = alpha / rank. Default: 1 for lora, poly, mhr, "
                             "*_mu and orchmoe (mttl camera-ready and peft Poly divide by r), rank for hyperloader "
                             "(its code uses alpha = r)", min=0, min_exclusive=True)
    n_skills: int = _f(8, "skills (LoRA pairs) per adapted layer for poly, mhr, *_mu and orchmoe; lora has 1", min=1)
    n_heads: int | None = _f(None, "routing heads h: each head routes its own slice of A's input and B's output "
                             "dims. Default 1 (poly, poly_mu, orchmoe), 4 (mhr, mhr_mu); must divide the adapted "
                             "layers' in/out sizes", min=1)
    target_modules: list[str] | None = _f(None, "module names to adapt (last name parts or globs, e.g. q, wi*, "
                                          "self_attn.q_proj); default: the architecture's attention and "
                                          "feed-forward linears (hyperloader: its LoRA targets, q and v; explicit "
                                          "targets also confine its bottleneck adapters to their layers)")
    dropout: float = _f(0.0, "dropout on the adapter input (LoRA dropout)", min=0.0)
    router_temperature: float = _f(1.0, "Gumbel-sigmoid temperature of the relaxed Bernoulli routing in training",
                                   min=0.0, min_exclusive=True)
    straight_through: bool = _f(False, "round the routing to 0/1 in the forward pass and pass gradients "
                                "straight through (train and eval)")
    n_abstract_tasks: int = _f(8, "orchmoe: abstract tasks T inferred from the prompt", min=1)
    mutual_information_weight: float = _f(0.1, "orchmoe: weight of the routing objective -I(x; t) / log T = "
                                          "-(H(mean_b p(t|x)) - mean_b H(p(t|x))) / log T, which rewards sharp "
                                          "per-input choices that use every abstract task (0 = off)", min=0.0)
    load_balance_weight: float = _f(0.0, "orchmoe: weight of the soft load-balancing loss T * sum_t "
                                    "mean_b(p(t|x))^2 (1 when used evenly, T when one takes all); alone it is "
                                    "minimised by uniform p(t|x), the collapse, so it is off by default", min=0.0)
    allocation_init_spread: float = _f(1e-3, "orchmoe: Z starts U(-a, a); Poly's 1e-3 makes abstract tasks "
                                       "start nearly identical", min=0.0)
    classifier_temperature: float = _f(1.0, "orchmoe: p(t|x) = softmax(logits / temperature); below 1 sharpens",
                                       min=0.0, min_exclusive=True)
    task_supervision_weight: float = _f(0.0, "orchmoe: weight of the cross-entropy of p(t|x) against category ids "
                                        "the trainer passes (0 = unsupervised)", min=0.0)
    task_embedding_dim: int = _f(64, "hyperloader: size of task, layer and position embeddings", min=1)
    projected_dim: int = _f(64, "hyperloader: output size of the task projector (input of the generators)", min=1)
    hidden_dim: int = _f(128, "hyperloader: hidden size of the task projector", min=1)
    adapter_bottleneck: int | None = _f(None, "hyperloader: bottleneck of the generated adapters; default "
                                        "hidden size / 32 (24 for T5-base)", min=1)
    train_layer_norms: bool | None = _f(None, "also train the base model's layer norms; default true for "
                                        "hyperloader (its code does), false otherwise")
    budget: str | None = _f(None, "trainable-parameter budget, e.g. 2.5M, 800k or 120000: the rank is chosen so "
                            "the count lands within 5% of it (an error if no rank can), and alpha scales with it so "
                            "the LoRA scale alpha/rank stays what `alpha` and `rank` give")

    def __post_init__(self) -> None:
        if self.name not in method_names():
            close = difflib.get_close_matches(self.name, method_names(), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise FieldError("name", f"'{self.name}' is not one of {', '.join(method_names())}{hint}")
        if self.budget is not None:
            try:
                parse_budget(self.budget)
            except ValueError as exc:
                raise FieldError("budget", str(exc)) from None
        if self.dropout >= 1.0:
            raise FieldError("dropout", f"must be < 1, got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise FieldError("target_modules", "must name at least one module (or be left out for the default)")
        spec, heads = SPECS.get(self.name), self.n_heads
        if spec is None or heads is None or spec.several_heads is None:
            return
        if heads > 1 and spec.several_heads is False:
            alternative = f"; use {spec.heads_variant} for several heads" if spec.heads_variant else ""
            raise FieldError("n_heads", f"{self.name} routes with one head, got {heads}{alternative}")
        if heads == 1 and spec.several_heads:
            raise FieldError("n_heads", f"{self.name} needs n_heads > 1 (one head is {spec.heads_variant})")

    @property
    def budget_count(self) -> int | None:
        """The budget as a number of parameters, or None."""
        return None if self.budget is None else parse_budget(self.budget)
