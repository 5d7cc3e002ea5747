"""Training-step speed of every adapter method against our LoRA and peft's LoRA / Poly / MHR.

One process, one frozen base shared by all variants (only the modules each method replaces are
copied), random init from a config (no downloads). A step is forward + backward + AdamW. Variants
run round-robin so that machine noise hits them alike; the median step time is reported.

    python benchmarks/adapter_speed.py                       # tiny-llama and smollm2-shape
    python benchmarks/adapter_speed.py --models tiny-llama --rounds 2 --steps 3
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

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
OURS = ["lora", "poly", "mhr", "poly_mu", "mhr_mu", "orchmoe", "hyperloader"]
N_TASKS, RANK, SKILLS, HEADS = 16, 8, 8, 4
Step = Callable[[], None]


def build_base(shape: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(pad_token_id=0, eos_token_id=1, bos_token_id=None, **SHAPES[shape])
    return LlamaForCausalLM(config)


def sharing_copy(template: torch.nn.Module) -> torch.nn.Module:
    """A deep copy whose matrices are the template's own tensors (1-D weights such as norms are copied)."""
    memo = {id(p): p for p in template.parameters() if p.dim() >= 2}
    return copy.deepcopy(template, memo)


def make_step(model: torch.nn.Module, call: Callable[[], torch.Tensor]) -> Step:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def step() -> None:
        loss = call()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def variants(template: LlamaForCausalLM, batch: dict[str, torch.Tensor], task_ids: torch.Tensor,
             targets: list[str]) -> dict[str, tuple[Step, int]]:
    """name -> (training step, trainable parameters)."""
    found: dict[str, tuple[Step, int]] = {}
    names = [f"task_{i}" for i in range(N_TASKS)]
    for method in OURS:
        model = attach_adapters(sharing_copy(template), MethodConfig(name=method, rank=RANK, n_skills=SKILLS),  # type: ignore[arg-type]
                                names)
        model.train()
        routing = {} if method == "orchmoe" else {"task_ids": task_ids}

        def call(model=model, routing=routing) -> torch.Tensor:
            out = model(**batch, **routing)
            return out.loss + sum(model.aux_losses().values())

        found[method] = (make_step(model, call), model.count_parameters()["total_trainable"])
    peft_configs = {
        "peft-lora": LoraConfig(r=RANK, lora_alpha=1, target_modules=targets, task_type="CAUSAL_LM"),
        "peft-poly": PolyConfig(r=RANK, target_modules=targets, n_tasks=N_TASKS, n_skills=SKILLS, n_splits=1,
                                task_type="CAUSAL_LM"),
        "peft-mhr": PolyConfig(r=RANK, target_modules=targets, n_tasks=N_TASKS, n_skills=SKILLS, n_splits=HEADS,
                               task_type="CAUSAL_LM"),
    }
    for name, config in peft_configs.items():
        model = get_peft_model(sharing_copy(template), config)
        model.train()
        routing = {} if name == "peft-lora" else {"task_ids": task_ids}

        def peft_call(model=model, routing=routing) -> torch.Tensor:
            return model(**batch, **routing).loss

        found[name] = (make_step(model, peft_call), sum(p.numel() for p in model.parameters() if p.requires_grad))
    return found


def run_shape(shape: str, rounds: int, steps: int, mixed: bool) -> list[dict[str, object]]:
    template = build_base(shape)
    batch_size, length = BATCH[shape]
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, SHAPES[shape]["vocab_size"], (batch_size, length), generator=gen)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    task_ids = (torch.randint(0, N_TASKS, (batch_size,), generator=gen) if mixed
                else torch.full((batch_size,), 3, dtype=torch.long))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    found = variants(template, batch, task_ids, targets)
    times: dict[str, list[float]] = {name: [] for name in found}
    for name, (step, _) in found.items():  # warm-up: allocator, optimizer state
        step()
    for _ in range(rounds):
        for name, (step, _) in found.items():
            for _ in range(steps):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name in found:
        peer = {"lora": "peft-lora", "poly": "peft-poly", "mhr": "peft-mhr"}.get(name)
        rows.append({
            "model": shape, "batch": "mixed-task" if mixed else "single-task", "variant": name,
            "ms_per_step": round(1000 * median[name], 2), "trainable": found[name][1],
            "vs_our_lora": round(median[name] / median["lora"], 3),
            "vs_peft": round(median[name] / median[peer], 3) if peer else None,
            "samples": len(times[name]),
        })
    return rows


def print_table(rows: list[dict[str, object]]) -> None:
    header = f"{'model':<20}{'batch':<13}{'variant':<13}{'ms/step':>10}{'trainable':>12}{'ours/LoRA':>11}{'ours/peft':>11}"
    print(header)
    print("-" * len(header))
    for r in rows:
        peft_ratio = f"{r['vs_peft']:.3f}" if r["vs_peft"] is not None else ""
        print(f"{r['model']:<20}{r['batch']:<13}{r['variant']:<13}{r['ms_per_step']:>10.1f}{r['trainable']:>12,}"
              f"{r['vs_our_lora']:>11.3f}{peft_ratio:>11}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-llama,smollm2-135m-shape", help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--rounds", type=int, default=3, help="round-robin passes over all variants")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--batches", default="mixed,single", help="task mix of a batch: mixed and/or single")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--out", default="benchmarks/results/adapter_speed.json", help="JSON results file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for shape in args.models.split(","):
        for kind in args.batches.split(","):
            rows.extend(run_shape(shape, args.rounds, args.steps, mixed=kind == "mixed"))
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
