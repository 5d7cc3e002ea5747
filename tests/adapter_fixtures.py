"""Tiny base models and batches for the adapter tests (random init from configs, no downloads)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, T5Config, T5ForConditionalGeneration

from orchmoe_cli.adapters.registry import SPECS

VOCAB = 384
TASKS = ["copy", "reverse", "upper"]
METHODS = list(SPECS)  # every registered method (the registry is the one list)


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(config).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                         bos_token_id=None)
    return LlamaForCausalLM(config).eval()


BUILDERS = {"t5": tiny_t5, "llama": tiny_llama}


def make_batch(base: PreTrainedModel, batch: int = 3, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """A training batch with padding in the last row; decoder-only labels mask the prompt half."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, -2:] = 0
    if base.config.is_encoder_decoder:
        labels = torch.randint(3, VOCAB, (batch, 4), generator=gen)
    else:
        if base.config.pad_token_id is not None:
            input_ids[-1, -2:] = base.config.pad_token_id
        labels = input_ids.clone()
        labels[:, : length // 2] = -100
        labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def perturb(model: torch.nn.Module, seed: int = 3, scale: float = 0.5) -> None:
    """Give every adapter tensor random values, so tests see non-trivial adapters (B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_adapter_parameters():  # type: ignore[attr-defined]
            param.add_(torch.randn(param.shape, generator=gen) * scale)
