"""Speed and memory of every adapter method: training steps against our LoRA and peft, and the evaluation
loop's generation against the bare base model.

Training: one process, one frozen base shared by all variants (only the modules each method replaces are
copied), random init from a config (no downloads). A step is forward + backward + fused AdamW; variants take
turns step by step, so machine noise hits them alike; medians are reported. Memory: on a GPU the peak
allocated during a step above the shared base; on CPU the bytes autograd saves for backward (activations)
plus gradients and AdamW state of the trainable parameters.

Generation: `orchmoe eval`'s own loop (`generate_predictions`: task-grouped batches, newline stopping) on the
bundled sample's held-out prompts, for the bare base, one task's adapter merged into the weights once,
per-task routing (poly, mhr: each single-task batch folds its task's LoRA in for the batch) and OrchMoE's
per-example routing (unmerged); plus two befores: poly's per-task routing unmerged, and the bare base with
the earlier decode-every-row stopping criterion.

    python benchmarks/speed.py            # tiny-llama and the SmolLM2-135M shape; SmolLM2 generation
    python benchmarks/speed.py --quick    # under 5 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PolyConfig, get_peft_model
from rich.console import Console
from transformers import LlamaConfig, LlamaForCausalLM, StoppingCriteria

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from orchmoe_cli.adapters import MethodConfig, attach_adapters  # noqa: E402
from orchmoe_cli.core import generation  # noqa: E402
from orchmoe_cli.core.base_models import load_model  # noqa: E402
from orchmoe_cli.core.recipe_data import prepare_data  # noqa: E402
from orchmoe_cli.recipe import load_recipe  # noqa: E402

SHAPES = {
    "tiny-llama": {"vocab_size": 384, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2},
    "smollm2-135m-shape": {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                           "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                           "tie_word_embeddings": True},
}
BATCH = {"tiny-llama": (8, 128), "smollm2-135m-shape": (4, 64)}
ROUNDS = {"tiny-llama": 40, "smollm2-135m-shape": 8}
OURS = ["lora", "poly", "mhr", "poly_mu", "mhr_mu", "orchmoe", "hyperloader"]
PEERS = {"lora": "peft-lora", "poly": "peft-poly", "mhr": "peft-mhr"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_TASKS, RANK, SKILLS, HEADS = 16, 8, 8, 4
Step = Callable[[], tuple[float, float]]
QUIET = Console(quiet=True)


def build_base(shape: str, device: torch.device) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(pad_token_id=0, eos_token_id=1, bos_token_id=None, **SHAPES[shape])
    return LlamaForCausalLM(config).to(device)


def sharing_copy(template: torch.nn.Module) -> torch.nn.Module:
    """A deep copy whose matrices are the template's own tensors (1-D weights such as norms are copied)."""
    memo = {id(p): p for p in template.parameters() if p.dim() >= 2}
    return copy.deepcopy(template, memo)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(model: torch.nn.Module, call: Callable[[], torch.Tensor], device: torch.device) -> Step:
    """A training step that returns (forward + backward seconds, optimizer seconds)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=True)  # the fastest AdamW on CPU and GPU

    def step() -> tuple[float, float]:
        _sync(device)
        start = time.perf_counter()
        call().backward()
        _sync(device)
        middle = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return middle - start, time.perf_counter() - middle

    return step


def step_memory_mb(model: torch.nn.Module, call: Callable[[], torch.Tensor], device: torch.device) -> float:
    """Memory one training step needs beyond the shared frozen base (see the module docstring)."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call().backward()
        peak = torch.cuda.max_memory_allocated() - before
        model.zero_grad(set_to_none=True)
        return (peak + 2 * trainable) / 2**20  # + AdamW's two moments
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in frozen:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = call()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return (sum(saved.values()) + 3 * trainable) / 2**20  # activations + gradients + AdamW moments


def train_variants(template: LlamaForCausalLM, batch: dict[str, torch.Tensor], routing: dict[str, torch.Tensor],
                   device: torch.device) -> dict[str, tuple[Step, int, float]]:
    """name -> (training step, trainable parameters, step memory MB); steps read ``routing`` when they run."""
    found: dict[str, tuple[Step, int, float]] = {}
    names = [f"task_{i}" for i in range(N_TASKS)]
    for method in OURS:
        config = MethodConfig(name=method, rank=RANK, n_skills=SKILLS)  # type: ignore[arg-type]
        model = attach_adapters(sharing_copy(template), config, names).to(device)
        model.train()

        def call(model=model, method=method) -> torch.Tensor:
            out = model(**batch, **({} if method == "orchmoe" else routing))  # OrchMoE never reads task ids
            return out.loss + sum(out.aux_losses.values())

        found[method] = (make_step(model, call, device), model.count_parameters()["total_trainable"],
                         step_memory_mb(model, call, device))
    peft_configs = {
        "peft-lora": LoraConfig(r=RANK, lora_alpha=1, target_modules=TARGETS, task_type="CAUSAL_LM"),
        "peft-poly": PolyConfig(r=RANK, target_modules=TARGETS, n_tasks=N_TASKS, n_skills=SKILLS, n_splits=1,
                                task_type="CAUSAL_LM"),
        "peft-mhr": PolyConfig(r=RANK, target_modules=TARGETS, n_tasks=N_TASKS, n_skills=SKILLS, n_splits=HEADS,
                               task_type="CAUSAL_LM"),
    }
    for name, peft_config in peft_configs.items():
        peft_model = get_peft_model(sharing_copy(template), peft_config).to(device)
        peft_model.train()

        def peft_call(model=peft_model, name=name) -> torch.Tensor:
            return model(**batch, **({} if name == "peft-lora" else routing)).loss

        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        found[name] = (make_step(peft_model, peft_call, device), trainable,
                       step_memory_mb(peft_model, peft_call, device))
    return found


def run_training(shape: str, rounds: int, kinds: list[str], device: torch.device) -> list[dict[str, Any]]:
    """Time every variant on one base shape, for each task mix of a batch."""
    started = time.perf_counter()
    template = build_base(shape, device)
    batch_size, length = BATCH[shape]
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, SHAPES[shape]["vocab_size"], (batch_size, length), generator=gen).to(device)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    mixes = {"mixed": torch.randint(0, N_TASKS, (batch_size,), generator=gen),
             "single": torch.full((batch_size,), 3, dtype=torch.long)}
    routing: dict[str, torch.Tensor] = {"task_ids": mixes[kinds[0]].to(device)}
    found = train_variants(template, batch, routing, device)
    print(f"[train {shape}] built {len(found)} variants in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    rows = []
    for kind in kinds:
        routing["task_ids"] = mixes[kind].to(device)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in found}
        for step, _, _ in found.values():  # warm-up: allocator, optimizer state
            step()
        order = list(found)
        for round_index in range(rounds):  # one step per variant per round, in a rotating order
            for name in order[round_index % len(order):] + order[: round_index % len(order)]:
                times[name].append(found[name][0]())
        print(f"[train {shape}] {kind}-task batches timed ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
        total = {name: statistics.median(a + b for a, b in t) for name, t in times.items()}
        passes = {name: statistics.median(a for a, _ in t) for name, t in times.items()}
        for name, (_, trainable, memory) in found.items():
            peer = PEERS.get(name)
            rows.append({
                "model": shape, "batch": f"{kind}-task", "variant": name, "trainable": trainable,
                "ms_per_step": round(1000 * total[name], 2), "ms_forward_backward": round(1000 * passes[name], 2),
                "step_memory_mb": round(memory, 1), "vs_our_lora": round(total[name] / total["lora"], 3),
                "forward_backward_vs_our_lora": round(passes[name] / passes["lora"], 3),
                "vs_peft": round(total[name] / total[peer], 3) if peer else None,
                "memory_vs_peft": round(memory / found[peer][2], 3) if peer else None, "samples": len(times[name]),
            })
    return rows


class DecodeEveryRow(StoppingCriteria):
    """The stopping criterion before the id-based one, for comparison: it decodes every row's whole answer at
    every decoding step (quadratic in the answer's length, and host-bound on a GPU)."""

    def __init__(self, newlines: Any, prompt_length: int) -> None:
        self.tokenizer, self.prompt_length = newlines.tokenizer, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor(["\n" in text.lstrip() for text in texts], device=input_ids.device)


class Counting:
    """Wraps a model for `generate_predictions` and counts the decoding positions it generates."""

    def __init__(self, model: Any) -> None:
        self.model, self.tokens = model, 0

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.model.parameters()

    def generate(self, **kwargs: Any) -> torch.Tensor:
        out = self.model.generate(**kwargs)
        self.tokens += (out.shape[1] - kwargs["input_ids"].shape[1]) * out.shape[0]
        return out


class Unmerged:
    """A routed model generating without folding a single-task batch's LoRA into the weights: the before of
    `AdaptedModel.generate`'s per-batch merge (every adapted linear adds its matmuls at every decoding step)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.model.parameters()

    def generate(self, task_ids: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        with self.model.routing(task_ids=task_ids, input_ids=kwargs["input_ids"], prompt_mask=kwargs["attention_mask"]):
            return self.model.base.generate(**kwargs)


@contextlib.contextmanager
def stopping(criterion: type) -> Iterator[None]:
    original = generation.StopAtNewline
    generation.StopAtNewline = criterion
    try:
        yield
    finally:
        generation.StopAtNewline = original


def generation_variants(base: Any, tasks: list[str]) -> dict[str, tuple[Any, dict[str, int] | None, type]]:
    """name -> (model, task map or None, stopping criterion); adapters start as their methods initialise them."""
    index = {name: i for i, name in enumerate(tasks)}
    found: dict[str, tuple[Any, dict[str, int] | None, type]] = {
        "bare": (base, None, generation.StopAtNewline), "bare, decode-every-row stop": (base, None, DecodeEveryRow)}
    merged = attach_adapters(sharing_copy(base), MethodConfig(name="poly", rank=RANK, n_skills=SKILLS), tasks)
    merged.merge(0)  # one task's adapter folded into the weights: what a single-task deployment runs
    found["poly, one task merged"] = (merged.eval(), index, generation.StopAtNewline)
    for method, extra in (("poly", {}), ("mhr", {"n_heads": HEADS}), ("orchmoe", {})):
        config = MethodConfig(name=method, rank=RANK, n_skills=SKILLS, **extra)  # type: ignore[arg-type]
        model = attach_adapters(sharing_copy(base), config, tasks).eval()
        label = "orchmoe, per-example routing" if method == "orchmoe" else f"{method}, per-task routing"
        found[label] = (model, None if method == "orchmoe" else index, generation.StopAtNewline)
        if method == "poly":
            found["poly, per-task routing, unmerged"] = (Unmerged(model), index, generation.StopAtNewline)
    return found


def run_generation(model_name: str, per_task: int, rounds: int, device: torch.device) -> list[dict[str, Any]]:
    """tokens/s of `orchmoe eval`'s loop on the bundled sample's held-out prompts, variants interleaved."""
    started = time.perf_counter()
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [f"model.name={model_name}", "data.source=bundled",
                                                                "eval.max_new_tokens=128"])
    prepared = prepare_data(recipe, QUIET)
    loaded = load_model(recipe.model)
    loaded.model.to(device)
    test = prepared.dataset["test"]
    tasks = list(dict.fromkeys(test["task"]))
    rows = [r for task in tasks for r in test.filter(lambda x, t=task: x["task"] == t).select(range(per_task))]
    found = generation_variants(loaded.model, tasks)
    print(f"[generate {model_name}] {len(rows)} prompts, {len(found)} variants ready in "
          f"{time.perf_counter() - started:.0f}s", file=sys.stderr)
    seconds: dict[str, list[float]] = {name: [] for name in found}
    tokens: dict[str, int] = {}
    for round_index in range(rounds + 1):  # round 0 warms up
        for name, (model, index, criterion) in found.items():
            counted = Counting(model)
            with stopping(criterion):
                _sync(device)
                start = time.perf_counter()
                generation.generate_predictions(counted, loaded.tokenizer, False, rows, recipe.eval, index,
                                              lambda *_: None)
                _sync(device)
            if round_index:
                seconds[name].append(time.perf_counter() - start)
                tokens[name] = counted.tokens
    print(f"[generate {model_name}] timed ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
    rate = {name: tokens[name] / statistics.median(t) for name, t in seconds.items()}
    return [{"model": model_name, "variant": name, "prompts": len(rows), "generated_positions": tokens[name],
             "tokens_per_s": round(rate[name], 1), "vs_bare": round(rate[name] / rate["bare"], 3),
             "s_per_pass": round(statistics.median(seconds[name]), 3), "samples": len(seconds[name])}
            for name in found]


TARGETS_TEXT = [  # (description, part of the run it reads, check over that part's rows)
    ("every mixture method's training step <= 1.10x our lora", "train",
     lambda rows: all(r["vs_our_lora"] <= 1.10 for r in rows if r["variant"] in OURS[1:-1])),
    ("our poly / mhr step <= 0.9x peft's", "train",
     lambda rows: all(r["vs_peft"] <= 0.9 for r in rows if r["variant"] in ("poly", "mhr"))),
    ("merged generation >= 0.95x the bare model", "generate",
     lambda rows: all(r["vs_bare"] >= 0.95 for r in rows if r["variant"].endswith("one task merged"))),
    ("orchmoe generation >= 0.8x the bare model", "generate",
     lambda rows: all(r["vs_bare"] >= 0.8 for r in rows if r["variant"].startswith("orchmoe"))),
]


def print_tables(train: list[dict[str, Any]], generate: list[dict[str, Any]]) -> None:
    if train:
        header = (f"{'model':<20}{'batch':<13}{'variant':<13}{'trainable':>12}{'ms/step':>10}{'MB':>8}"
                  f"{'ours/LoRA':>11}{'(fwd+bwd)':>11}{'ours/peft':>11}{'MB/peft':>9}")
        print(header + "\n" + "-" * len(header))
        for r in train:
            peft = f"{r['vs_peft']:.3f}" if r["vs_peft"] is not None else ""
            memory = f"{r['memory_vs_peft']:.3f}" if r["memory_vs_peft"] is not None else ""
            print(f"{r['model']:<20}{r['batch']:<13}{r['variant']:<13}{r['trainable']:>12,}{r['ms_per_step']:>10.1f}"
                  f"{r['step_memory_mb']:>8.1f}{r['vs_our_lora']:>11.3f}{r['forward_backward_vs_our_lora']:>11.3f}"
                  f"{peft:>11}{memory:>9}")
    if generate:
        header = f"\n{'model':<24}{'generation variant':<32}{'tokens/s':>10}{'adapted/bare':>14}{'s/pass':>9}"
        print(header + "\n" + "-" * (len(header) - 1))
        for r in generate:
            print(f"{r['model']:<24}{r['variant']:<32}{r['tokens_per_s']:>10.1f}{r['vs_bare']:>14.3f}"
                  f"{r['s_per_pass']:>9.2f}")
    print("\ntargets:")
    parts = {"train": train, "generate": generate}
    for text, part, check in TARGETS_TEXT:
        verdict = "not run" if not parts[part] else "met    " if check(parts[part]) else "MISSED "
        print(f"  {verdict:<8}{text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and prompts (under 5 minutes on CPU)")
    parser.add_argument("--models", default="tiny-llama,smollm2-135m-shape", help="training shapes: "
                        + ", ".join(SHAPES))
    parser.add_argument("--rounds", type=int, default=0, help="timed training steps per variant, interleaved "
                        "(default: 40 on tiny-llama, 8 on smollm2-135m-shape; --quick 10 and 3)")
    parser.add_argument("--batches", default="mixed,single", help="task mix of a training batch")
    parser.add_argument("--generation-model", default="smollm2-135m-instruct", help="model for generation "
                        "(tiny-llama needs no download; none skips generation)")
    parser.add_argument("--prompts-per-task", type=int, default=0, help="default 10 (--quick 2)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="", help="JSON results (default benchmarks/results/speed[-quick].json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    train = []
    for shape in filter(None, args.models.split(",")):
        rounds = args.rounds or (max(3, ROUNDS[shape] // 4) if args.quick else ROUNDS[shape])
        kinds = args.batches.split(",")[:1] if args.quick and shape != "tiny-llama" else args.batches.split(",")
        train.extend(run_training(shape, rounds, kinds, device))
    generate = []
    if args.generation_model != "none":
        per_task = args.prompts_per_task or (2 if args.quick else 10)
        generate = run_generation(args.generation_model, per_task, 1 if args.quick else 3, device)
    print_tables(train, generate)
    out = Path(args.out or f"benchmarks/results/speed{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python", *sys.argv]), "threads": args.threads, "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
            or platform.machine(), "date": time.strftime("%Y-%m-%d"), "rank": RANK, "skills": SKILLS,
            "mhr_heads": HEADS, "tasks": N_TASKS, "batch_shapes": BATCH}
    out.write_text(json.dumps({"meta": meta, "train": train, "generate": generate}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
