"""Training and generation batches."""

from __future__ import annotations

import io
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from rich.console import Console

from orchmoe_cli.data.collate import IGNORE_INDEX, GenerationCollator, TrainCollator, pad_token_id
from orchmoe_cli.data.data_config import DataConfig
from orchmoe_cli.data.dataset_cache import prepare
from orchmoe_cli.errors import OrchmoeError

ROWS = [
    {"task": "task_d", "prompt_ids": [11, 12, 13], "reference_ids": [[21, 1]]},
    {"task": "task_a", "prompt_ids": [14, 15, 16, 17, 18], "reference_ids": [[22, 23, 24, 1]]},
]
TASK_INDEX = {"task_a": 0, "task_b": 1, "task_c": 2, "task_d": 3}  # a model's name -> routing index


def test_encoder_decoder_training_batch() -> None:
    batch = TrainCollator(pad_token_id=0, is_encoder_decoder=True, rng=random.Random(0), task_index=TASK_INDEX)(ROWS)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 0, 0], [14, 15, 16, 17, 18]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[21, 1, IGNORE_INDEX, IGNORE_INDEX], [22, 23, 24, 1]]
    assert batch["task_ids"].tolist() == [3, 0] and batch["task_ids"].dtype == torch.long
    assert "prompt_mask" not in batch


def test_decoder_only_labels_only_on_output_tokens() -> None:
    batch = TrainCollator(pad_token_id=0, is_encoder_decoder=False, rng=random.Random(0), task_index=TASK_INDEX)(ROWS)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 1, 0, 0, 0, 0], [14, 15, 16, 17, 18, 22, 23, 24, 1]]
    ignore = IGNORE_INDEX
    assert batch["labels"].tolist() == [[ignore] * 3 + [21, 1] + [ignore] * 4, [ignore] * 5 + [22, 23, 24, 1]]
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 4, [1] * 9]
    assert batch["prompt_mask"].tolist() == [[1] * 3 + [0] * 6, [1] * 5 + [0] * 4]
    assert batch["task_ids"].tolist() == [3, 0]


def test_reference_is_sampled_with_the_given_rng() -> None:
    rows = [{"task": "task_a", "prompt_ids": [5], "reference_ids": [[7, 1], [8, 1], [9, 1]]}]

    def draws(seed: int) -> list[int]:
        collate = TrainCollator(pad_token_id=0, is_encoder_decoder=True, rng=random.Random(seed))
        return [collate(rows)["labels"][0, 0].item() for _ in range(30)]

    assert draws(1) == draws(1) and draws(1) != draws(2)
    assert set(draws(1)) == {7, 8, 9}


def test_generation_padding_sides() -> None:
    left = GenerationCollator(pad_token_id=0, is_encoder_decoder=False, task_index=TASK_INDEX)(ROWS)
    assert left["input_ids"].tolist() == [[0, 0, 11, 12, 13], [14, 15, 16, 17, 18]]
    assert left["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1] * 5]
    assert left["task_ids"].tolist() == [3, 0] and set(left) == {"input_ids", "attention_mask", "task_ids"}
    right = GenerationCollator(pad_token_id=0, is_encoder_decoder=True)(ROWS)
    assert right["input_ids"].tolist() == [[11, 12, 13, 0, 0], [14, 15, 16, 17, 18]]
    assert right["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]


def test_task_ids_come_from_the_model_map_only() -> None:
    """An unknown task gets -1; a model that reads no task id (no map) gets no task_ids at all."""
    unknown = GenerationCollator(0, False, {"task_a": 0})(ROWS)
    assert unknown["task_ids"].tolist() == [-1, 0]
    for collate in (GenerationCollator(0, False), TrainCollator(0, False, random.Random(0))):
        assert "task_ids" not in collate(ROWS)


def test_pad_token_id_falls_back_to_eos() -> None:
    assert pad_token_id(SimpleNamespace(pad_token_id=0, eos_token_id=2)) == 0
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    with pytest.raises(OrchmoeError, match="neither a pad nor an EOS"):
        pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None))


def test_decoder_only_batch_from_prepared_rows(sni_dir: Path, tmp_path: Path, bos_tokenizer: Any) -> None:
    cfg = DataConfig(source=str(sni_dir), cache_dir=str(tmp_path / "cache"))
    prepared = prepare(cfg, bos_tokenizer, "bos", False, console=Console(file=io.StringIO()))
    rows = list(prepared.dataset["train"].select(range(4)))
    batch = TrainCollator(pad_token_id(bos_tokenizer), False, random.Random(0))(rows)
    for i, row in enumerate(rows):
        labels = batch["labels"][i]
        answer = bos_tokenizer.decode(labels[labels != IGNORE_INDEX].tolist(), skip_special_tokens=True)
        assert answer.startswith(" ") and answer[1:] in row["references"]  # the space after "Output:"
        prompt = batch["input_ids"][i][batch["prompt_mask"][i].bool()].tolist()
        assert prompt == row["prompt_ids"] and prompt[0] == bos_tokenizer.bos_token_id
    generation = GenerationCollator(pad_token_id(bos_tokenizer), False)(rows)
    assert generation["attention_mask"][:, -1].all()  # left padding: every prompt ends at the last column
