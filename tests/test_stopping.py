"""Decoder-only generation stops at the first newline after some answer text; the criterion works on token
ids and must agree with decoding the whole answer, for byte-level and BPE vocabularies."""

from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from orchmoe_cli.core.base_models import byte_tokenizer
from orchmoe_cli.core.generation import NewlineTable, StopAtNewline


def _bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE whose merges glue newlines to text and to each other, as GPT-2-style ones do."""
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    corpus = ["answer.\n\nNext", " yes\n", "no\n\n", "  \n  text\n", "é ü\n", "title: a b c\n"] * 50
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")


def _reference(tokenizer: object, ids: torch.Tensor, prompt_length: int) -> list[bool]:
    """The definition: decode every row's answer and look for a newline after its first text."""
    texts = tokenizer.batch_decode(ids[:, prompt_length:], skip_special_tokens=True)
    return ["\n" in text.lstrip() for text in texts]


@pytest.mark.parametrize("make", [byte_tokenizer, _bpe_tokenizer], ids=["bytes", "bpe"])
def test_id_criterion_agrees_with_decoding(make) -> None:  # noqa: ANN001
    tokenizer = make()
    vocab = len(tokenizer)
    pieces = tokenizer.batch_decode([[i] for i in range(vocab)], skip_special_tokens=True)
    blank = [i for i, p in enumerate(pieces) if not p.strip()]  # whitespace, newlines, specials
    rng = random.Random(0)
    prompt_length = 3
    outcomes: set[bool] = set()
    for _ in range(40):
        rows = [[rng.randrange(vocab) for _ in range(prompt_length)]
                + [rng.choice(blank) if rng.random() < 0.5 else rng.randrange(vocab) for _ in range(rng.randrange(1, 9))]
                for _ in range(6)]
        width = max(map(len, rows))
        ids = torch.tensor([row + [tokenizer.eos_token_id] * (width - len(row)) for row in rows])
        expected = _reference(tokenizer, ids, prompt_length)
        got = StopAtNewline(NewlineTable(tokenizer), prompt_length)(ids, torch.zeros(len(rows), vocab)).tolist()
        assert got == expected, [tokenizer.decode(r[prompt_length:]) for r in rows]
        outcomes.update(expected)
    assert outcomes == {True, False}  # both kinds of row were checked
    # ids past the tokenizer's own (a model vocabulary padded beyond it) count as no text
    assert StopAtNewline(NewlineTable(tokenizer), 0)(torch.tensor([[vocab + 5]]), torch.zeros(1, 1)).tolist() == [False]
