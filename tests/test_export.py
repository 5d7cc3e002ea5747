"""`orchmoe export`: every exported peft LoRA and merged model computes what orchmoe computes for the inputs its
routing serves (per task, the average of skills, one abstract task of OrchMoE); what cannot be exact is refused."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from adapter_fixtures import BUILDERS, TASKS, make_batch, perturb
from peft import PeftModel
from tolerance import assert_close_scaled
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from orchmoe_cli.adapters import AdaptedModel, MethodConfig, attach_adapters
from orchmoe_cli.adapters.context import RoutingState
from orchmoe_cli.adapters.layer import fold
from orchmoe_cli.core.base_models import byte_tokenizer
from orchmoe_cli.core.model_export import EXPORT_MANIFEST, export_model
from orchmoe_cli.errors import OrchmoeError

ARCHS = list(BUILDERS)
TASK_ROUTED = ("poly", "mhr")


def _model(arch: str, method: str, **fields: object) -> tuple[AdaptedModel, torch.nn.Module]:
    base = BUILDERS[arch]()
    pristine = copy.deepcopy(base)
    heads = {"n_heads": 4} if method.startswith("mhr") else {}
    skills = {} if method == "lora" else {"n_skills": 3}
    model = attach_adapters(base, MethodConfig(name=method, rank=4, **skills, **heads, **fields), TASKS)  # type: ignore[arg-type]
    perturb(model, scale=0.2)
    return model.eval(), pristine


def _inputs(base: torch.nn.Module, rows: int = 3) -> dict[str, torch.Tensor]:
    batch = make_batch(base, batch=rows)
    batch.pop("labels")
    if base.config.is_encoder_decoder:
        batch["decoder_input_ids"] = torch.arange(3, 8).repeat(rows, 1)
    return batch


def _ours(model: AdaptedModel, batch: dict[str, torch.Tensor], task: int | None) -> torch.Tensor:
    routing = {} if model.task_index is None else {"task_ids": torch.full((batch["input_ids"].shape[0],), task)}
    with torch.no_grad():
        return model(**batch, **routing).logits


def _peft_logits(pristine: torch.nn.Module, directory: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return PeftModel.from_pretrained(copy.deepcopy(pristine), str(directory)).eval()(**batch).logits


@pytest.mark.parametrize("method", ["lora", "poly", "mhr", "poly_mu", "mhr_mu"])
@pytest.mark.parametrize("arch", ARCHS)
def test_exported_peft_lora_and_merged_model_equal_orchmoe(arch: str, method: str, tmp_path: Path) -> None:
    model, pristine = _model(arch, method)
    batch = _inputs(model.base)
    tasks = [TASKS[2]] if method in TASK_ROUTED else []
    export_model(model, byte_tokenizer(), tmp_path, "tiny", "peft", tasks, tmp_path / "peft")
    export_model(model, byte_tokenizer(), tmp_path, "tiny", "merged", tasks, tmp_path / "merged")
    expected = _ours(model, batch, 2 if method in TASK_ROUTED else -1)
    assert_close_scaled(_peft_logits(pristine, tmp_path / "peft", batch), expected)
    auto = AutoModelForSeq2SeqLM if model.base.config.is_encoder_decoder else AutoModelForCausalLM
    with torch.no_grad():
        merged = auto.from_pretrained(tmp_path / "merged").eval()(**batch).logits
    assert_close_scaled(merged, expected)
    manifest = json.loads((tmp_path / "peft" / EXPORT_MANIFEST).read_text())
    assert manifest["method"] == method and len(manifest["adapters"]) == 1


@pytest.mark.parametrize("method", TASK_ROUTED)
@pytest.mark.parametrize("arch", ARCHS)
def test_several_tasks_in_one_peft_model_route_each_row_to_its_task(arch: str, method: str, tmp_path: Path) -> None:
    """``--all-tasks``: one adapter per task; peft's ``adapter_names=`` gives every row its own task's logits."""
    model, pristine = _model(arch, method)
    manifest = export_model(model, byte_tokenizer(), tmp_path, "tiny", "peft", None, tmp_path / "out")
    names = [entry["name"] for entry in manifest["adapters"]]
    assert names == TASKS and manifest["peft_poly"] == "peft-poly"
    peft_model = PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "out" / names[0]),
                                           adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(tmp_path / "out" / name), adapter_name=name)
    batch = _inputs(model.base, rows=len(names))
    with torch.no_grad():
        mixed = peft_model.eval()(**batch, adapter_names=names).logits
        ours = model(**batch, task_ids=torch.arange(len(names))).logits
    assert_close_scaled(mixed, ours)


@pytest.mark.parametrize("arch", ARCHS)
def test_orchmoe_abstract_task_lora_equals_the_soft_model_for_a_one_hot_prompt(arch: str, tmp_path: Path) -> None:
    model, pristine = _model(arch, "orchmoe", n_abstract_tasks=3)
    manifest = export_model(model, byte_tokenizer(), tmp_path, "tiny", "peft", [], tmp_path / "out")
    assert [e["name"] for e in manifest["adapters"]] == ["abstract_task_0", "abstract_task_1", "abstract_task_2"]
    assert (tmp_path / "out" / "router" / "task_classifier.safetensors").is_file()
    batch = _inputs(model.base)
    for t in range(3):
        one_hot = torch.nn.functional.one_hot(torch.full((3,), t), 3).float()
        state = RoutingState(3, task_probs=one_hot)  # every row's prompt routed wholly to abstract task t
        previous, model.slot.state = model.slot.state, state
        try:
            with torch.no_grad():
                expected = model.base(**batch).logits
        finally:
            model.slot.state = previous
        assert_close_scaled(_peft_logits(pristine, tmp_path / "out" / f"abstract_task_{t}", batch), expected)


def test_folding_rounds_once_so_bf16_weights_are_the_closest_to_the_exact_sum() -> None:
    """W0 + dW computed in float32 and rounded once is, entry by entry, the bf16 value nearest the exact sum; adding a
    bf16-rounded update in bf16 rounds twice and lands farther away on some entries."""
    torch.manual_seed(0)
    weight = (torch.randn(128, 128) * 0.05).bfloat16()
    a, b = torch.randn(128, 8) * 0.02, torch.randn(8, 128) * 0.02
    exact = weight.float() + 2.0 * (a @ b).T
    ours = (fold(weight, a, b, 2.0).float() - exact).abs()
    naive = ((weight + (2.0 * (a @ b).T).bfloat16()).float() - exact).abs()
    assert bool((ours <= naive).all()) and bool((ours < naive).any())


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_export_reports_how_much_of_the_update_its_dtype_keeps(arch: str, tmp_path: Path) -> None:
    model, _ = _model(arch, "lora")
    full = export_model(model, byte_tokenizer(), tmp_path, "tiny", "merged", [], tmp_path / "fp32")
    assert full["adapters"][0]["update_kept"] == pytest.approx(1.0, abs=1e-3)
    model.base.to(torch.bfloat16)
    for layer in model.layers:  # adapters stay in float32 on a bf16 base, as training keeps them; a small update
        layer.lora_A.data, layer.lora_B.data = layer.lora_A.data.float(), layer.lora_B.data.float() * 1e-3
    half = export_model(model, byte_tokenizer(), tmp_path, "tiny", "merged", [], tmp_path / "bf16")
    assert 0 < half["adapters"][0]["update_kept"] < 1 and half["dtype"] == "bfloat16"
    saved = AutoModelForCausalLM if not model.base.config.is_encoder_decoder else AutoModelForSeq2SeqLM
    loaded = saved.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    name, (a, b) = next(iter(model.fixed_loras(None).items()))
    expected = fold(model.base.get_submodule(name).weight, a, b, model.lora_scale)
    assert torch.equal(loaded.get_submodule(name).weight, expected)


def test_refusals_write_nothing(tmp_path: Path) -> None:
    poly, _ = _model("llama", "poly")
    with pytest.raises(OrchmoeError, match="did you mean"):
        export_model(poly, byte_tokenizer(), tmp_path, "tiny", "peft", [TASKS[0] + "x"], tmp_path / "a")
    with pytest.raises(OrchmoeError, match="--all-tasks"):
        export_model(poly, byte_tokenizer(), tmp_path, "tiny", "peft", [], tmp_path / "b")
    hyper, _ = _model("llama", "hyperloader")
    with pytest.raises(OrchmoeError, match="bottleneck adapters"):
        export_model(hyper, byte_tokenizer(), tmp_path, "tiny", "merged", None, tmp_path / "c")
    kept = tmp_path / "mine"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(OrchmoeError, match="already exists"):
        export_model(poly, byte_tokenizer(), tmp_path, "tiny", "peft", None, kept)
    assert (kept / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_auto_precision_exports_float32_whether_or_not_a_gpu_is_visible(sni_dir: Path, tmp_path: Path,
                                                                        monkeypatch) -> None:
    """Export runs on the CPU, so ``model.dtype: auto`` (bf16 where a GPU computes in it) would make the merged
    model depend on the machine that exports it, and round most of a small update away."""
    from cli_runner import run_cli
    from test_train import write_recipe

    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", sni_dir, run, "tiny-llama", "lora", steps=1)
    assert run_cli(["train", str(recipe)]) == 0
    monkeypatch.setattr("orchmoe_cli.core.base_models.native_bf16", lambda: True)
    assert run_cli(["export", str(run), "--to", "merged", "--out", str(tmp_path / "merged")]) == 0
    manifest = json.loads((tmp_path / "merged" / EXPORT_MANIFEST).read_text())
    assert manifest["dtype"] == "float32" and manifest["adapters"][0]["update_kept"] == pytest.approx(1.0, abs=1e-3)
