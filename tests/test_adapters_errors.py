"""Clear one-line errors: recipe method fields, attaching, routing and bad checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapter_fixtures import BUILDERS, TASKS, make_batch
from safetensors.torch import load_file, save_file

from orchmoe_cli.adapters import MethodConfig, attach_adapters, load_adapted
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.recipe import load_recipe


def test_recipe_method_section_is_strict() -> None:
    method = load_recipe(None, ["method.name=mhr", "method.budget=800k", "method.alpha=2"]).method
    assert (method.name, method.budget_count, method.alpha, method.n_heads) == ("mhr", 800_000, 2.0, None)
    bad = {
        "method.name=mhr,method.n_heads=1": r"method.n_heads \(set on the command line\): mhr needs n_heads > 1",
        "method.name=poly,method.n_heads=2": r"method.n_heads \(set on the command line\): poly routes with one head",
        "method.budget=lots": r"method.budget \(set on the command line\): expected a parameter count",
        "method.rank=0": r"method.rank \(set on the command line\): must be >= 1",
        "method.dropout=1.0": r"method.dropout \(set on the command line\): must be < 1",
        "method.router_temperature=0": r"method.router_temperature \(set on the command line\): must be > 0",
        "method.n_skill=4": "did you mean 'n_skills'",
    }
    for overrides, message in bad.items():
        with pytest.raises(OrchmoeError, match=message):
            load_recipe(None, overrides.split(","))


def test_attach_errors() -> None:
    with pytest.raises(OrchmoeError, match=r"method.target_modules: 'q_projj' .*did you mean 'q_proj'"):
        attach_adapters(BUILDERS["llama"](), MethodConfig(name="lora", target_modules=["q_projj"]), TASKS)
    with pytest.raises(OrchmoeError, match=r"method.n_heads: 3 must divide"):
        attach_adapters(BUILDERS["llama"](), MethodConfig(name="mhr", n_heads=3), TASKS)
    with pytest.raises(OrchmoeError, match="no adapters to attach"):
        attach_adapters(BUILDERS["llama"](), MethodConfig(name="none"), TASKS)
    with pytest.raises(OrchmoeError, match="give the names of the training tasks"):
        attach_adapters(BUILDERS["llama"](), MethodConfig(name="poly"), [])
    with pytest.raises(OrchmoeError, match="'copy' appears twice"):
        attach_adapters(BUILDERS["llama"](), MethodConfig(name="poly"), ["copy", "copy"])
    model = attach_adapters(BUILDERS["llama"](), MethodConfig(name="lora", target_modules=["q_proj", "layers.1.*"]),
                            TASKS)
    adapted = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    assert len(adapted) == 2 + 7 - 1  # q_proj in both layers, and every linear of layer 1


def test_routing_errors() -> None:
    model = attach_adapters(BUILDERS["t5"](), MethodConfig(name="poly"), TASKS)
    batch = make_batch(model.base)
    with pytest.raises(OrchmoeError, match="poly routes by task id"):
        model(**batch)
    with pytest.raises(OrchmoeError, match="task id 3 is out of range"):
        model(**batch, task_ids=torch.tensor([0, 3, 1]))
    with (pytest.raises(OrchmoeError, match="routing was set for 2 sequences"),
          model.routing(task_ids=torch.tensor([0, 1]))):
        model.base(**batch)
    orch = attach_adapters(BUILDERS["t5"](), MethodConfig(name="orchmoe"), [])
    with pytest.raises(OrchmoeError, match="orchmoe routes from the prompt"), orch.routing():
        pass


def test_bad_checkpoints(tmp_path: Path) -> None:
    model = attach_adapters(BUILDERS["llama"](), MethodConfig(name="poly", rank=4), TASKS)
    good = tmp_path / "good"
    model.save(good)
    with pytest.raises(OrchmoeError, match="checkpoint directory not found"):
        load_adapted(BUILDERS["llama"](), tmp_path / "nowhere")

    def broken(name: str, edit_config: dict | None = None, edit_tensors: bool = False) -> Path:
        target = tmp_path / name
        target.mkdir()
        for f in good.iterdir():
            (target / f.name).write_bytes(f.read_bytes())
        if edit_config is not None:
            config = json.loads((target / "adapter_config.json").read_text())
            config["method"].update(edit_config)
            (target / "adapter_config.json").write_text(json.dumps(config))
        if edit_tensors:
            tensors = load_file(str(target / "adapter_model.safetensors"))
            first = sorted(tensors)[0]
            tensors[first] = torch.zeros(1, 2)
            save_file(tensors, str(target / "adapter_model.safetensors"))
        return target

    cases = {
        broken("rank", {"rank": 8}): r"tensor base\..*lora_A has shape \(1, 8, 64, 4\), expected \(1, 8, 64, 8\)",
        broken("method", {"name": "lora", "n_skills": 1}): "unexpected tensor .*router.logits for method lora",
        broken("shape", edit_tensors=True): r"has shape \(1, 2\)",
        broken("field", {"rank": "four"}): "method.rank: expected an integer",
    }
    for directory, message in cases.items():
        with pytest.raises(OrchmoeError, match=message):
            load_adapted(BUILDERS["llama"](), directory)
    (broken("weights") / "adapter_model.safetensors").unlink()
    with pytest.raises(OrchmoeError, match=r"adapter_model\.safetensors: file not found"):
        load_adapted(BUILDERS["llama"](), tmp_path / "weights")
    with pytest.raises(OrchmoeError, match=r"base_model\.model_type is 'llama'"):
        load_adapted(BUILDERS["t5"](), good)
    (broken("json") / "adapter_config.json").write_text("{not json")
    with pytest.raises(OrchmoeError, match="not valid JSON"):
        load_adapted(BUILDERS["llama"](), tmp_path / "json")
    untouched = BUILDERS["llama"]()
    with pytest.raises(OrchmoeError):
        load_adapted(untouched, tmp_path / "rank")
    assert not any(hasattr(m, "lora_A") for m in untouched.modules())  # checked before attaching
