"""Where adapters go: default targets per architecture, overrides, HyperLoader placement."""

from __future__ import annotations

import pytest
import torch
from adapter_fixtures import BUILDERS, TASKS
from transformers import GPT2Config, GPT2LMHeadModel

from orchmoe_cli.adapters import MethodConfig, attach_adapters
from orchmoe_cli.adapters.budget import hidden_size, resolve
from orchmoe_cli.adapters.hyperloader import HyperAdapterLinear, HyperLoRALinear
from orchmoe_cli.adapters.layer import SkillLoRALinear
from orchmoe_cli.adapters.registry import spec_of
from orchmoe_cli.errors import OrchmoeError


def _sites(arch: str, method: str, **fields: object) -> dict[str, tuple[str, str, int]]:
    base = BUILDERS[arch]()
    resolved = resolve(MethodConfig(name=method, **fields), hidden_size(base))  # type: ignore[arg-type]
    spec = spec_of(method)
    return {s.name: (s.kind, s.stack, s.position) for s in spec.family(spec).plan(base, resolved)}


def test_default_targets_cover_attention_and_feed_forward() -> None:
    t5 = _sites("t5", "poly")
    assert len(t5) == 2 * 6 + 2 * 10  # encoder q k v o wi wo; decoder adds cross-attention q k v o
    assert "decoder.block.1.layer.1.EncDecAttention.v" in t5 and "encoder.block.0.layer.1.DenseReluDense.wo" in t5
    llama = _sites("llama", "mhr")
    assert sorted({n.rsplit(".", 1)[1] for n in llama}) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                             "up_proj", "v_proj"]
    assert len(_sites("t5", "lora", target_modules=["SelfAttention.q", "wi*"])) == 4 + 4


def test_hyperloader_placement_and_position_ids() -> None:
    t5 = _sites("t5", "hyperloader")
    decoder = {n.split("block.1.")[1]: pos for n, (_, stack, pos) in t5.items() if n.startswith("decoder.block.1")}
    assert decoder == {"layer.0.SelfAttention.q": 2, "layer.0.SelfAttention.v": 3, "layer.0.SelfAttention.o": 1,
                       "layer.1.EncDecAttention.q": 4, "layer.1.EncDecAttention.v": 5, "layer.2.DenseReluDense.wo": 0}
    encoder = {n.split("block.0.")[1]: pos for n, (_, _, pos) in t5.items() if n.startswith("encoder.block.0")}
    assert encoder == {"layer.0.SelfAttention.q": 2, "layer.0.SelfAttention.v": 3, "layer.0.SelfAttention.o": 1,
                       "layer.1.DenseReluDense.wo": 0}
    llama = _sites("llama", "hyperloader")
    assert {n: v for n, v in llama.items() if n.startswith("model.layers.0.")} == {
        "model.layers.0.self_attn.q_proj": ("hyper_lora", "decoder", 2),
        "model.layers.0.self_attn.v_proj": ("hyper_lora", "decoder", 3),
        "model.layers.0.self_attn.o_proj": ("hyper_adapter", "decoder", 1),
        "model.layers.0.mlp.down_proj": ("hyper_adapter", "decoder", 0)}
    model = attach_adapters(BUILDERS["t5"](), MethodConfig(name="hyperloader"), TASKS)
    assert set(model.hyper.stacks) == {"encoder", "decoder"}
    assert isinstance(model.base.decoder.block[0].layer[2].DenseReluDense.wo, HyperAdapterLinear)
    assert isinstance(model.base.encoder.block[0].layer[0].SelfAttention.q, HyperLoRALinear)
    with pytest.raises(OrchmoeError, match="already carries a hyperloader adapter"):
        attach_adapters(BUILDERS["llama"](), MethodConfig(name="hyperloader", target_modules=["o_proj"]), TASKS)
    # explicit LoRA targets in some layers bring the bottleneck adapters to those layers only
    top = _sites("llama", "hyperloader", target_modules=["layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"])
    assert all(".layers.1." in name for name in top) and len(top) == 4, top


def test_wrappers_keep_the_base_weight_reachable_and_frozen() -> None:
    model = attach_adapters(BUILDERS["t5"](), MethodConfig(name="poly"), TASKS)
    wo = model.base.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, SkillLoRALinear) and wo.weight is wo.base_layer.weight
    assert not any(p.requires_grad for n, p in model.base.named_parameters() if "base_layer" in n)
    assert not model.base.shared.weight.requires_grad


def test_architectures_without_defaults_need_explicit_linear_targets() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=384, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(OrchmoeError, match="no default targets for model type 'gpt2'"):
        attach_adapters(gpt2, MethodConfig(name="lora"), TASKS)
    with pytest.raises(OrchmoeError, match="'c_attn' matches no linear layer"):  # GPT-2 uses Conv1D, not Linear
        attach_adapters(gpt2, MethodConfig(name="lora", target_modules=["c_attn"]), TASKS)
    model = attach_adapters(gpt2, MethodConfig(name="lora", target_modules=["lm_head"]), TASKS)
    assert model.count_parameters()["adapters"] == 8 * (32 + 384)
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 6]])).logits).all()
