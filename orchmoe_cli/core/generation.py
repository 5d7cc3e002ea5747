"""Batched generation as `eval`, `adapt` and `generate` run it: task-grouped batches, greedy or beam search,
decoder-only answers cut at their first newline."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from orchmoe_cli.data.collate import GenerationCollator, pad_token_id
from orchmoe_cli.recipe import EvalConfig


def _task_batches(rows: Sequence[dict], batch_size: int) -> Iterator[list[dict]]:
    """Batches that never mix tasks, longest prompts first inside a task (less padding, early OOM)."""
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    for task_rows in by_task.values():
        ordered = sorted(task_rows, key=lambda r: -len(r["prompt_ids"]))
        for start in range(0, len(ordered), batch_size):
            yield ordered[start : start + batch_size]


class NewlineTable:
    """Per vocabulary piece: has text, has a newline, has a newline after its own text. Built once per tokenizer by
    whoever generates with it (a sweep builds one and passes it to every generation), moved to a device once."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
        self.table = torch.tensor(  # + a last all-false row for ids past the tokenizer's own
            [[bool(p.strip()), "\n" in p, "\n" in p.lstrip() and bool(p.strip())] for p in pieces]
            + [[False, False, False]])

    def on(self, device: torch.device) -> torch.Tensor:
        if self.table.device != device:
            self.table = self.table.to(device)
        return self.table


class StopAtNewline(StoppingCriteria):
    """Decoder-only models continue past the answer: a row is done at its first newline after some text.

    Checked on token ids through the tokenizer's :class:`NewlineTable`, so a decoding step costs a few tensor ops
    instead of decoding every row's whole answer again; the result is the same as
    ``"\\n" in decoded_answer.lstrip()``. Stateless, so beam reordering is harmless."""

    def __init__(self, newlines: NewlineTable, prompt_length: int) -> None:
        self.newlines, self.prompt_length = newlines, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        table = self.newlines.on(input_ids.device)
        answer = input_ids[:, self.prompt_length :].clamp(max=len(table) - 1)
        flags = table[answer]  # (rows, new tokens, 3)
        text, newline, newline_after_own_text = flags.unbind(-1)
        text_before = (text.cumsum(1) - text.long()) > 0
        return (newline_after_own_text | (newline & text_before)).any(1)


def _clean(text: str, is_encoder_decoder: bool) -> str:
    """Decoder-only answers end at the first newline after the answer text."""
    text = text.strip()
    if not is_encoder_decoder:
        text = text.split("\n", 1)[0].strip()
    return text


def generate_predictions(
    model: Any, tokenizer: Any, is_encoder_decoder: bool, rows: Sequence[dict], cfg: EvalConfig,
    task_index: Mapping[str, int] | None, on_batch: Callable[[list[dict], list[str]], None],
    shard: tuple[int, int] = (0, 1), newlines: NewlineTable | None = None,
) -> None:
    """Generate for ``rows`` batch by batch, calling ``on_batch(rows, predictions)`` after each.

    ``task_index`` maps task names to the model's routing indices (None: the model reads no task id).
    ``shard = (rank, world)``: this process takes every world-th batch (data-parallel evaluation).
    ``newlines``: the tokenizer's table for decoder-only stopping, when the caller generates repeatedly."""
    if not is_encoder_decoder and newlines is None:
        newlines = NewlineTable(tokenizer)
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    collate = GenerationCollator(pad_id, is_encoder_decoder, task_index)
    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": cfg.max_new_tokens, "num_beams": cfg.num_beams, "do_sample": False,
        "pad_token_id": pad_id, "eos_token_id": tokenizer.eos_token_id,
    }
    rank, world = shard
    for number, batch_rows in enumerate(_task_batches(rows, cfg.batch_size)):
        if number % world != rank:
            continue
        batch = collate(batch_rows)
        if not is_encoder_decoder:
            stop = StopAtNewline(newlines, batch["input_ids"].shape[1])  # type: ignore[arg-type]
            gen_kwargs["stopping_criteria"] = StoppingCriteriaList([stop])
        routing = {"task_ids": batch["task_ids"]} if "task_ids" in batch else {}  # the model moves them
        with torch.inference_mode():
            output = model.generate(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                **routing, **gen_kwargs,
            )
        if not is_encoder_decoder:
            output = output[:, batch["input_ids"].shape[1] :]
        texts = tokenizer.batch_decode(output, skip_special_tokens=True)
        on_batch(batch_rows, [_clean(t, is_encoder_decoder) for t in texts])


def describe_routing(model: Any, rows: Sequence[dict], batch_size: int, pad_id: int, is_encoder_decoder: bool,
                     task_index: Mapping[str, int] | None) -> dict[str, dict[str, Any]]:
    """How each row's prompt is routed ({row id: JSON values}), batch by batch as generation batches them; empty
    for a base model, which has no routing."""
    describe = getattr(model, "describe_routing", None)
    if describe is None:
        return {}
    collate = GenerationCollator(pad_id, is_encoder_decoder, task_index)
    found: dict[str, dict[str, Any]] = {}
    for batch_rows in _task_batches(rows, batch_size):
        batch = collate(batch_rows)
        task = batch_rows[0]["task"] or None
        described = describe(batch["input_ids"], batch["attention_mask"], batch.get("task_ids"), task)
        found.update((row["id"], info) for row, info in zip(batch_rows, described))
    return found
