"""Training throughput on the quickstart data: `orchmoe train` (lora, orchmoe, mhr) against what a user would pick
instead, Hugging Face `Trainer` + a peft LoRA of the same rank, targets, learning rate and batch, each with random
and with length-grouped batches.

    python benchmarks/train_throughput.py                 # 30 steps per run, about 12 minutes on 2 cores
    python benchmarks/train_throughput.py --steps 10      # a quick look

The number is useful tokens per second: the non-padding tokens (prompt + answer) of the batches a run trained on,
over its training time (model loading excluded, the first step included on both sides). Padding is reported as
useful / computed tokens (computed = batch rows x longest row). Every run trains the same 480 rows of SmolLM2-135M-
Instruct from the same recipe (`recipes/quickstart.yaml`), in its own process, one after another; the JSON goes
to benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "quickstart.yaml"


def orchmoe_run(method: str, grouped: bool, steps: int, out: Path) -> dict[str, float]:
    """`orchmoe train` for ``steps``; tokens/s from its own log (non-padding tokens over the loop's time)."""
    run = out / f"{method}-{'grouped' if grouped else 'random'}"
    command = [str(Path(sys.executable).parent / "orchmoe"), "train", str(RECIPE), f"method.name={method}",
               f"train.steps={steps}", f"train.log_every={steps}", f"train.group_by_length={str(grouped).lower()}",
               "train.warmup_steps=0", f"output.dir={run}", "train.resume=never"]
    if method == "mhr":
        command.append("method.n_heads=4")
    subprocess.run(command, check=True, capture_output=True, text=True)
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    return {"tokens_per_s": last["tokens_per_s"]}


def hf_run(grouped: bool, steps: int, out: Path) -> dict[str, float]:
    """Hugging Face Trainer + peft LoRA (rank 8, alpha 8, the recipe's target layers) on the same prepared rows."""
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from rich.console import Console
    from transformers import Trainer, TrainingArguments

    from orchmoe_cli.core.base_models import load_model
    from orchmoe_cli.core.recipe_data import prepare_data
    from orchmoe_cli.data.collate import TrainCollator, pad_token_id
    from orchmoe_cli.recipe import load_recipe

    recipe = load_recipe(RECIPE, ["method.name=lora"])
    prepared = prepare_data(recipe, Console(quiet=True))
    rows = prepared.dataset["train"].select_columns(["prompt_ids", "reference_ids"])
    rows = rows.map(lambda r: {"length": len(r["prompt_ids"]) + len(r["reference_ids"][0])})
    loaded = load_model(recipe.model)
    model = get_peft_model(loaded.model, LoraConfig(r=8, lora_alpha=8, target_modules=r".*layers\.2[4-9].*_proj",
                                                    lora_dropout=0.0, task_type="CAUSAL_LM"))
    collate = TrainCollator(pad_token_id(loaded.tokenizer), False, random.Random(0))
    seen = {"useful": 0, "computed": 0}

    def collator(features: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate(features)
        batch.pop("prompt_mask")
        seen["useful"] += int(batch["attention_mask"].sum())
        seen["computed"] += batch["attention_mask"].numel()
        return batch

    args = TrainingArguments(
        output_dir=str(out / f"hf-{'grouped' if grouped else 'random'}"), per_device_train_batch_size=8,
        max_steps=steps, learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=steps, report_to=[],
        save_strategy="no", use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if grouped else "random", length_column_name="length", seed=42)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    started = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - started
    return {"tokens_per_s": seen["useful"] / elapsed, "useful_share": seen["useful"] / seen["computed"]}


def padding_share(grouped: bool, batches: int = 60) -> float:
    """Useful / computed tokens of orchmoe's first ``batches`` batches of 8 on the quickstart training rows."""
    from rich.console import Console

    from orchmoe_cli.core.recipe_data import prepare_data
    from orchmoe_cli.core.sampling import TaskBatchSampler
    from orchmoe_cli.data.rows import TaskRows
    from orchmoe_cli.recipe import load_recipe

    rows = TaskRows(prepare_data(load_recipe(RECIPE), Console(quiet=True)).dataset["train"])
    lengths = rows.lengths().tolist()
    sampler = TaskBatchSampler(rows.task_codes.tolist(), 8, "mixed", 42, lengths=lengths if grouped else None)
    useful = computed = 0
    for index in range(batches):
        batch = [lengths[i] for i in sampler.batch(index)]
        useful, computed = useful + sum(batch), computed + max(batch) * len(batch)
    return useful / computed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_throughput.json"))
    parser.add_argument("--only", choices=["orchmoe", "hf"], help="one side only, e.g. to rerun it")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for grouped in (False, True):
            label = "grouped" if grouped else "random"
            if args.only != "hf":
                for method in ("lora", "orchmoe", "mhr"):
                    results[f"orchmoe {method} {label}"] = {**orchmoe_run(method, grouped, args.steps, Path(tmp)),
                                                            "useful_share": padding_share(grouped)}
                    print(f"orchmoe {method} {label}: {results[f'orchmoe {method} {label}']}", flush=True)
            if args.only != "orchmoe":
                results[f"hf-trainer+peft lora {label}"] = hf_run(grouped, args.steps, Path(tmp))
                print(f"hf {label}: {results[f'hf-trainer+peft lora {label}']}", flush=True)
    ratios = {}
    base = results.get("orchmoe lora random", {}).get("tokens_per_s")
    hf = results.get("hf-trainer+peft lora grouped", {}).get("tokens_per_s")
    if base and "orchmoe lora grouped" in results:
        ratios["orchmoe lora grouped / random"] = results["orchmoe lora grouped"]["tokens_per_s"] / base
    if hf and "orchmoe lora grouped" in results:
        ratios["orchmoe lora grouped / hf grouped"] = results["orchmoe lora grouped"]["tokens_per_s"] / hf
    record = {"date": time.strftime("%Y-%m-%d"), "steps": args.steps, "cpus": os.cpu_count(),
              "machine": platform.processor() or platform.machine(), "load_at_end": os.getloadavg()[0],
              "results": results, "ratios": ratios}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
