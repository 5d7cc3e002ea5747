"""Batch prepared rows into tensors for training and for generation.

Training follows Tk-Instruct: each time an example is used, one of its references is drawn with
``rng.choice`` (a seeded ``random.Random`` passed in, so runs are reproducible). Decoder-only batches carry
``prompt_mask`` so an input-routed adapter can pool over the prompt alone, never over the answer it is
being trained to produce. Given the model's ``task_index`` (task name -> routing index), batches carry
``task_ids`` for task-routed adapters: -1 for a task the model does not know; without one, no task id at all.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from orchmoe_cli.errors import OrchmoeError

IGNORE_INDEX = -100


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (many decoder-only tokenizers define no pad token)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    raise OrchmoeError(f"tokenizer {type(tokenizer).__name__}: defines neither a pad nor an EOS token; "
                       "batches cannot be padded, choose a tokenizer that defines one")


def _pad(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        values = torch.tensor(row, dtype=torch.long)
        if left:
            out[i, width - len(row):] = values
        else:
            out[i, : len(row)] = values
    return out


def _with_task_ids(batch: dict[str, torch.Tensor], features: Sequence[Mapping[str, Any]],
                   task_index: Mapping[str, int] | None) -> dict[str, torch.Tensor]:
    if task_index is not None:
        batch["task_ids"] = torch.tensor([task_index.get(f["task"], -1) for f in features], dtype=torch.long)
    return batch


@dataclass
class TrainCollator:
    """Right-padded training batches.

    Encoder-decoder: ``input_ids``, ``attention_mask``, ``labels`` (the sampled reference, -100 padding).
    Decoder-only: ``input_ids`` = prompt + reference, ``labels`` = the reference ids (EOS included) at their
    positions and -100 on the prompt and padding, ``attention_mask``, ``prompt_mask`` (1 on prompt tokens).
    """

    pad_token_id: int
    is_encoder_decoder: bool
    rng: random.Random
    task_index: Mapping[str, int] | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [list(f["prompt_ids"]) for f in features]
        targets = [list(self.rng.choice(f["reference_ids"])) for f in features]
        if self.is_encoder_decoder:
            batch = {
                "input_ids": _pad(prompts, self.pad_token_id),
                "attention_mask": _pad([[1] * len(p) for p in prompts], 0),
                "labels": _pad(targets, IGNORE_INDEX),
            }
        else:
            batch = {
                "input_ids": _pad([p + t for p, t in zip(prompts, targets)], self.pad_token_id),
                "attention_mask": _pad([[1] * (len(p) + len(t)) for p, t in zip(prompts, targets)], 0),
                "labels": _pad([[IGNORE_INDEX] * len(p) + t for p, t in zip(prompts, targets)], IGNORE_INDEX),
                "prompt_mask": _pad([[1] * len(p) + [0] * len(t) for p, t in zip(prompts, targets)], 0),
            }
        return _with_task_ids(batch, features, self.task_index)


@dataclass
class GenerationCollator:
    """Prompt-only batches for ``generate``: left-padded for decoder-only models (so every prompt ends
    where generation starts), right-padded for encoder-decoder models."""

    pad_token_id: int
    is_encoder_decoder: bool
    task_index: Mapping[str, int] | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [list(f["prompt_ids"]) for f in features]
        left = not self.is_encoder_decoder
        batch = {
            "input_ids": _pad(prompts, self.pad_token_id, left=left),
            "attention_mask": _pad([[1] * len(p) for p in prompts], 0, left=left),
        }
        return _with_task_ids(batch, features, self.task_index)
