"""`model.quantization`: a bitsandbytes-quantised base (QLoRA's NF4, LLM.int8) trains float32 adapters, evaluates,
generates and exports (folding into the unquantised weights), all on the CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from test_train import final_adapter, write_recipe

from orchmoe_cli.core.base_models import load_model
from orchmoe_cli.recipe import load_recipe

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes missing")
TINY = "model.tiny={hidden_size: 64, num_layers: 2, num_heads: 4, intermediate_size: 128}"  # NF4 blocks of 64


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantised_base_loads_with_bitsandbytes_linears(bits: str) -> None:
    import bitsandbytes as bnb

    model = load_model(load_recipe(None, ["model.name=tiny-llama", TINY, f"model.quantization={bits}"]).model).model
    kind = bnb.nn.Linear4bit if bits == "4bit" else bnb.nn.Linear8bitLt
    assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj"), kind)
    assert not model.get_submodule("model.layers.0.self_attn.q_proj").weight.is_floating_point()


def test_4bit_refuses_layers_narrower_than_an_nf4_block() -> None:
    from orchmoe_cli.errors import OrchmoeError

    narrow = "model.tiny={hidden_size: 32, num_layers: 2, num_heads: 4, intermediate_size: 64}"
    with pytest.raises(OrchmoeError, match="NF4 block"):
        load_model(load_recipe(None, ["model.name=tiny-llama", narrow, "model.quantization=4bit"]).model)


def test_qlora_trains_evaluates_generates_and_exports_on_cpu(sni_dir: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", sni_dir, run, "tiny-llama", "orchmoe", steps=3, warmup_steps=0)
    quantised = ["model.quantization=4bit", TINY, "eval.max_instances=2", "eval.max_new_tokens=3"]
    assert run_cli(["train", str(recipe), *quantised]) == 0
    adapter = final_adapter(run)
    assert all(t.dtype == torch.float32 for t in adapter.values())
    assert any(float(t.abs().sum()) > 0 for name, t in adapter.items() if "lora_B" in name)  # B left zero: trained
    assert run_cli(["eval", str(recipe), *quantised, "eval.checkpoint=latest"]) == 0
    capsys.readouterr()
    assert run_cli(["generate", str(run), "a question"]) == 0  # the saved recipe asks for the quantised base
    assert "prediction" in json.loads(capsys.readouterr().out)
    merged = tmp_path / "merged"
    assert run_cli(["export", str(run), "--to", "merged", "--out", str(merged)]) == 0  # one per abstract task
    config = json.loads((merged / "abstract_task_0" / "config.json").read_text())
    assert "quantization_config" not in config  # folded into the full-precision weights
    out = tmp_path / "peft"
    assert run_cli(["export", str(run), "--to", "peft", "--out", str(out)]) == 0
    manifest = json.loads((out / "orchmoe_export.json").read_text())
    assert "unquantised" in manifest["trained_on"]


def test_4bit_computes_in_the_bases_half_dtype() -> None:
    """NF4 weights compute in float16 where the base is float16 (GPUs without native bf16), in bf16 otherwise."""
    from orchmoe_cli.core.base_models import quantization_config

    half = quantization_config(load_recipe(None, ["model.quantization=4bit", "model.dtype=float16"]).model)
    full = quantization_config(load_recipe(None, ["model.quantization=4bit", "model.dtype=float32"]).model)
    assert half.bnb_4bit_compute_dtype == torch.float16 and full.bnb_4bit_compute_dtype == torch.bfloat16
