"""Numeric equivalence with peft (LoRA, Poly, MHR), peft export and import."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from adapter_fixtures import BUILDERS, TASKS, make_batch, perturb
from peft import LoraConfig, PeftModel, PolyConfig, get_peft_model
from tolerance import assert_close_scaled

from orchmoe_cli.adapters import AdaptedModel, MethodConfig, attach_adapters, load_adapted
from orchmoe_cli.errors import OrchmoeError

ARCHS = list(BUILDERS)
TASK_IDS = torch.tensor([0, 2, 1])


def _inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    batch = make_batch(model)
    batch.pop("labels")
    if model.config.is_encoder_decoder:
        batch["decoder_input_ids"] = torch.arange(3, 8).repeat(3, 1)
    return batch


def _ours(arch: str, method: str, **fields: object) -> tuple[AdaptedModel, torch.nn.Module]:
    """Our adapted model with random adapter weights, and an untouched copy of its base."""
    base = BUILDERS[arch]()
    pristine = copy.deepcopy(base)
    model = attach_adapters(base, MethodConfig(name=method, **fields), TASKS)  # type: ignore[arg-type]
    perturb(model, scale=0.2)
    return model.eval(), pristine


def _our_logits(model: AdaptedModel, batch: dict[str, torch.Tensor], task_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, task_ids=task_ids).logits


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_poly_and_mhr_match_peft_poly_model(arch: str, heads: int) -> None:
    model, pristine = _ours(arch, "poly" if heads == 1 else "mhr", n_skills=3, rank=4, n_heads=heads)
    layers = {name.removeprefix("base."): m for name, m in model.named_modules() if hasattr(m, "lora_A")}
    config = PolyConfig(r=4, target_modules=sorted(layers), n_tasks=len(TASKS), n_skills=3, n_splits=heads)
    theirs = get_peft_model(pristine, config).eval()
    with torch.no_grad():
        for name, layer in layers.items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.poly_lora_A["default"].copy_(layer.lora_A)
            peft_layer.poly_lora_B["default"].copy_(layer.lora_B)
            peft_layer.poly_router["default"].module_logits.copy_(layer.router.logits)
    batch = _inputs(model.base)
    with torch.no_grad():
        expected = theirs.base_model(**batch, task_ids=TASK_IDS).logits  # PolyModel passes task_ids on
    assert_close_scaled(_our_logits(model, batch, TASK_IDS), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_matches_peft_lora(arch: str) -> None:
    model, pristine = _ours(arch, "lora", rank=4, alpha=8.0)
    layers = {name.removeprefix("base."): m for name, m in model.named_modules() if hasattr(m, "lora_A")}
    theirs = get_peft_model(pristine, LoraConfig(r=4, lora_alpha=8, target_modules=sorted(layers))).eval()
    with torch.no_grad():
        for name, layer in layers.items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A[0, 0].T)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B[0, 0].T)
    batch = _inputs(model.base)
    with torch.no_grad():
        expected = theirs(**batch).logits
    assert_close_scaled(_our_logits(model, batch, TASK_IDS), expected)


@pytest.mark.parametrize("method", ["lora", "poly", "mhr"])
@pytest.mark.parametrize("arch", ARCHS)
def test_export_loads_in_peft_with_the_same_outputs(arch: str, method: str, tmp_path: Path) -> None:
    model, pristine = _ours(arch, method, alpha=2.0)
    model.export_peft(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == ("LORA" if method == "lora" else "POLY")
    assert json.loads((tmp_path / "tasks.json").read_text()) == TASKS
    theirs = PeftModel.from_pretrained(pristine, str(tmp_path)).eval()
    batch = _inputs(model.base)
    with torch.no_grad():
        expected = theirs(**batch, **({} if method == "lora" else {"task_ids": TASK_IDS})).logits
    assert_close_scaled(_our_logits(model, batch, TASK_IDS), expected)


@pytest.mark.parametrize("method", ["poly_mu", "orchmoe", "hyperloader"])
def test_export_refuses_methods_peft_cannot_express(method: str, tmp_path: Path) -> None:
    model, _ = _ours("llama", method)
    with pytest.raises(OrchmoeError, match="no peft equivalent"):
        model.export_peft(tmp_path)
    poly, _ = _ours("llama", "poly")
    poly.to_average()
    with pytest.raises(OrchmoeError, match="average"):
        poly.export_peft(tmp_path)


@pytest.mark.parametrize("kind", ["lora", "poly", "mhr"])
@pytest.mark.parametrize("arch", ARCHS)
def test_import_peft_lora_and_poly_checkpoints(arch: str, kind: str, tmp_path: Path) -> None:
    torch.manual_seed(4)
    base = BUILDERS[arch]()
    targets = ["q", "v", "wo"] if arch == "t5" else ["q_proj", "v_proj", "down_proj"]
    config = (LoraConfig(r=4, lora_alpha=16, target_modules=targets) if kind == "lora" else
              PolyConfig(r=4, target_modules=targets, n_tasks=3, n_skills=2, n_splits=1 if kind == "poly" else 2))
    theirs = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora" in name or "poly" in name:
                param.normal_(std=0.2)
    theirs.save_pretrained(str(tmp_path))
    theirs.eval()
    batch = _inputs(base)
    with torch.no_grad():
        expected = theirs.base_model(**batch, **({} if kind == "lora" else {"task_ids": TASK_IDS})).logits
    ours = load_adapted(BUILDERS[arch](), tmp_path).eval()
    assert ours.method.name == kind
    if kind != "lora":
        assert ours.task_names == ["task_0", "task_1", "task_2"]
    assert_close_scaled(_our_logits(ours, batch, TASK_IDS), expected)


def test_import_refuses_unsupported_peft_options_and_pickles(tmp_path: Path) -> None:
    theirs = get_peft_model(BUILDERS["llama"](), LoraConfig(r=4, target_modules=["q_proj"], use_rslora=True))
    theirs.save_pretrained(str(tmp_path / "rslora"))
    with pytest.raises(OrchmoeError, match="use_rslora"):
        load_adapted(BUILDERS["llama"](), tmp_path / "rslora")
    (tmp_path / "rslora" / "adapter_model.safetensors").rename(tmp_path / "rslora" / "adapter_model.bin")
    config = json.loads((tmp_path / "rslora" / "adapter_config.json").read_text())
    config["use_rslora"] = False
    (tmp_path / "rslora" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(OrchmoeError, match="pickle"):
        load_adapted(BUILDERS["llama"](), tmp_path / "rslora")
