"""Training-step speed of every adapter method against our LoRA and peft's LoRA / Poly / MHR.

One process, one frozen base shared by all variants (only the modules each method replaces are
copied), random init from a config (no downloads). A step is forward + backward + fused AdamW. Variants
take turns step by step, so machine noise hits them alike; the median step time is reported.

    python benchmarks/adapter_speed.py                       # tiny-llama and smollm2-shape
    python benchmarks/adapter_speed.py --models tiny-llama --rounds 10
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, PolyConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from orchmoe_cli.adapters import MethodConfig, attach_adapters

SHAPES = {
    "tiny-llama": dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2),
    "smollm2-135m-shape": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                               num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
}
BATCH = {"tiny-llama": (8, 128), "smollm2-135m-shape": (4, 64)}
ROUNDS = {"tiny-llama": 40, "smollm2-135m-shape": 8}
OURS = ["lora", "poly", "mhr", "poly_mu", "mhr_mu", "orchmoe", "hyperloader"]
N_TASKS, RANK, SKILLS, HEADS = 16, 8, 8, 4
Step = Callable[[], tuple[float, float]]


def build_base(shape: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(pad_token_id=0, eos_token_id=1, bos_token_id=None, **SHAPES[shape])
    return LlamaForCausalLM(config)


def sharing_copy(template: torch.nn.Module) -> torch.nn.Module:
    """A deep copy whose matrices are the template's own tensors (1-D weights such as norms are copied)."""
    memo = {id(p): p for p in template.parameters() if p.dim() >= 2}
    return copy.deepcopy(template, memo)


def make_step(model: torch.nn.Module, call: Callable[[], torch.Tensor]) -> Step:
    """A training step that returns (forward + backward seconds, optimizer seconds)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=True)  # the fastest AdamW on CPU and GPU

    def step() -> tuple[float, float]:
        start = time.perf_counter()
        call().backward()
        middle = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return middle - start, time.perf_counter() - middle

    return step


def variants(template: LlamaForCausalLM, batch: dict[str, torch.Tensor], routing: dict[str, torch.Tensor],
             targets: list[str]) -> dict[str, tuple[Step, int]]:
    """name -> (training step, trainable parameters); steps read the task ids from ``routing`` when they run."""
    found: dict[str, tuple[Step, int]] = {}
    names = [f"task_{i}" for i in range(N_TASKS)]
    for method in OURS:
        config = MethodConfig(name=method, rank=RANK, n_skills=SKILLS)  # type: ignore[arg-type]
        model = attach_adapters(sharing_copy(template), config, names)
        model.train()

        def call(model=model, method=method) -> torch.Tensor:
            out = model(**batch, **({} if method == "orchmoe" else routing))  # OrchMoE never reads task ids
            return out.loss + sum(model.aux_losses().values())

        found[method] = (make_step(model, call), model.count_parameters()["total_trainable"])
    peft_configs = {
        "peft-lora": LoraConfig(r=RANK, lora_alpha=1, target_modules=targets, task_type="CAUSAL_LM"),
        "peft-poly": PolyConfig(r=RANK, target_modules=targets, n_tasks=N_TASKS, n_skills=SKILLS, n_splits=1,
                                task_type="CAUSAL_LM"),
        "peft-mhr": PolyConfig(r=RANK, target_modules=targets, n_tasks=N_TASKS, n_skills=SKILLS, n_splits=HEADS,
                               task_type="CAUSAL_LM"),
    }
    for name, peft_config in peft_configs.items():
        peft_model = get_peft_model(sharing_copy(template), peft_config)
        peft_model.train()

        def peft_call(model=peft_model, name=name) -> torch.Tensor:
            return model(**batch, **({} if name == "peft-lora" else routing)).loss

        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        found[name] = (make_step(peft_model, peft_call), trainable)
    return found


def run_shape(shape: str, rounds: int, kinds: list[str]) -> list[dict[str, object]]:
    """Time every variant on one base shape, for each task mix of a batch."""
    started = time.perf_counter()
    template = build_base(shape)
    batch_size, length = BATCH[shape]
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, SHAPES[shape]["vocab_size"], (batch_size, length), generator=gen)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    mixes = {"mixed": torch.randint(0, N_TASKS, (batch_size,), generator=gen),
             "single": torch.full((batch_size,), 3, dtype=torch.long)}
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    routing: dict[str, torch.Tensor] = {}
    found = variants(template, batch, routing, targets)
    print(f"[{shape}] built {len(found)} variants in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    rows = []
    for kind in kinds:
        routing["task_ids"] = mixes[kind]
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in found}
        for step, _ in found.values():  # warm-up: allocator, optimizer state
            step()
        order = list(found)
        for round_index in range(rounds):  # one step per variant per round, in a rotating order
            for name in order[round_index % len(order):] + order[: round_index % len(order)]:
                times[name].append(found[name][0]())
        print(f"[{shape}] {kind}-task batches timed ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
        total = {name: statistics.median(a + b for a, b in t) for name, t in times.items()}
        passes = {name: statistics.median(a for a, _ in t) for name, t in times.items()}
        for name in found:
            peer = {"lora": "peft-lora", "poly": "peft-poly", "mhr": "peft-mhr"}.get(name)
            rows.append({
                "model": shape, "batch": f"{kind}-task", "variant": name, "trainable": found[name][1],
                "ms_per_step": round(1000 * total[name], 2), "ms_forward_backward": round(1000 * passes[name], 2),
                "vs_our_lora": round(total[name] / total["lora"], 3),
                "forward_backward_vs_our_lora": round(passes[name] / passes["lora"], 3),
                "vs_peft": round(total[name] / total[peer], 3) if peer else None,
                "samples": len(times[name]),
            })
    return rows


def print_table(rows: list[dict[str, object]]) -> None:
    header = (f"{'model':<20}{'batch':<13}{'variant':<13}{'trainable':>12}{'ms/step':>10}{'fwd+bwd':>9}"
              f"{'ours/LoRA':>11}{'(fwd+bwd)':>11}{'ours/peft':>11}")
    print(header)
    print("-" * len(header))
    for r in rows:
        peft_ratio = f"{r['vs_peft']:.3f}" if r["vs_peft"] is not None else ""
        print(f"{r['model']:<20}{r['batch']:<13}{r['variant']:<13}{r['trainable']:>12,}{r['ms_per_step']:>10.1f}"
              f"{r['ms_forward_backward']:>9.1f}{r['vs_our_lora']:>11.3f}{r['forward_backward_vs_our_lora']:>11.3f}"
              f"{peft_ratio:>11}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-llama,smollm2-135m-shape",
                        help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--rounds", type=int, default=0, help="timed steps per variant, interleaved "
                        "(default: 40 on tiny-llama, 8 on smollm2-135m-shape)")
    parser.add_argument("--batches", default="mixed,single", help="task mix of a batch: mixed and/or single")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--out", default="benchmarks/results/adapter_speed.json", help="JSON results file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for shape in args.models.split(","):
        rows.extend(run_shape(shape, args.rounds or ROUNDS[shape], args.batches.split(",")))
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python", *sys.argv]), "threads": args.threads, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "rank": RANK, "skills": SKILLS,
            "mhr_heads": HEADS, "tasks": N_TASKS, "batch_shapes": BATCH}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
