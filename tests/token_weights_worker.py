"""Run by tests/test_distributed.py under `accelerate launch --num_processes 2`: each process takes half of one
batch of 8 (answers of 2 tokens on one process, 8 on the other) and backpropagates with the training loop's
micro-step; the gradients data parallelism averages must equal those of the whole batch in one process."""

from __future__ import annotations

import copy
import sys

import torch
from accelerate import Accelerator

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from adapter_fixtures import make_batch, perturb, tiny_llama  # noqa: E402
from tolerance import assert_close_scaled  # noqa: E402

from orchmoe_cli.adapters import MethodConfig, attach_adapters  # noqa: E402
from orchmoe_cli.core.steps import lm_loss, micro_step, target_tokens  # noqa: E402


def main() -> None:
    accelerator = Accelerator(cpu=True)
    model = attach_adapters(tiny_llama(), MethodConfig(name="lora", rank=4), [])
    perturb(model, scale=0.2)
    model.train()
    batch = make_batch(model.base, batch=8, length=12)
    labels = torch.full_like(batch["input_ids"], -100)
    for row in range(8):  # rows 0, 2, 4, 6 (process 0) answer in 2 tokens, the others in 8
        answer = 2 if row % 2 == 0 else 8
        labels[row, 12 - answer:] = batch["input_ids"][row, 12 - answer:]
    batch = {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(labels), "labels": labels}
    reference = copy.deepcopy(model)
    params = [p for p in reference.parameters() if p.requires_grad]
    expected = torch.autograd.grad(lm_loss(reference, batch, causal=True, label_smoothing=0.0)[0], params)

    mine = {k: v[accelerator.process_index :: accelerator.num_processes] for k, v in batch.items()}
    own = target_tokens(mine["labels"], causal=True)
    step_tokens = accelerator.reduce(torch.tensor(own), "sum")
    prepared = accelerator.prepare(model)
    with accelerator.accumulate(prepared):
        micro_step(accelerator, prepared, mine, step_tokens, True, 0.0)
    for param, grad in zip([p for p in model.parameters() if p.requires_grad], expected, strict=True):
        assert_close_scaled(param.grad, grad)
    print(f"process {accelerator.process_index}: gradients equal one process's on the whole batch")


if __name__ == "__main__":
    main()
