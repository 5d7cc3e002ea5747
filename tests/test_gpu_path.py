"""What a bf16 GPU run changes, shown on the CPU: folding a LoRA into half-precision weights, trainable norms in
half precision, OrchMoE's classifier under autocast, adaptation row masks that follow the table, cuBLAS in
deterministic mode. (The multi-process parts are in ``test_distributed.py``.)"""

from __future__ import annotations

import os

import pytest
import torch
from adapter_fixtures import TASKS, make_batch, perturb, tiny_llama
from tolerance import tolerances

from orchmoe_cli.adapters import MethodConfig, attach_adapters
from orchmoe_cli.adapters.budget import layer_norm_parameters
from orchmoe_cli.adapters.registry import spec_of
from orchmoe_cli.core.fit import make_accelerator
from orchmoe_cli.recipe import TrainConfig


def _adapted(method: str, dtype: torch.dtype, **fields: object):  # noqa: ANN202 - an AdaptedModel
    base = tiny_llama().to(dtype)
    model = attach_adapters(base, MethodConfig(name=method, rank=4, n_skills=2, **fields), TASKS)  # type: ignore[arg-type]
    perturb(model, scale=0.05)
    return model.eval()


@pytest.mark.parametrize("method", ["lora", "poly", "mhr"])
def test_a_half_precision_base_generates_unmerged_and_keeps_the_adapter(method: str) -> None:
    """Folding rounds W0 + dW to bf16, losing much of a small update; so a bf16 base generates unmerged, and its
    logits stay within bf16 resolution of the fp32 model's, like an unmerged method's."""
    batch = make_batch(tiny_llama())
    ids = torch.zeros(batch["input_ids"].shape[0], dtype=torch.long)
    routing = {} if method == "lora" else {"task_ids": ids}
    exact = _adapted(method, torch.float32)
    half = _adapted(method, torch.bfloat16)
    assert exact.folds_exactly and not half.folds_exactly
    with torch.no_grad():
        reference = exact(**batch, **routing).logits
        with half.routing(**routing) as state, half._merged_for(state):
            assert not any(layer.merged for layer in half.layers)  # what generation does on this base
            unmerged = half(**batch, **routing).logits.float()
        half.merge(0 if routing else None)  # what folding would have done
        merged = half(**batch, **routing).logits.float()
        half.unmerge()
    atol, _ = tolerances(reference, ulps=8 / torch.finfo(torch.float32).eps * torch.finfo(torch.bfloat16).eps)
    unmerged_error = (unmerged - reference).abs().max().item()
    assert unmerged_error <= atol, (unmerged_error, atol)  # bf16 resolution of the fp32 logits
    assert not torch.equal(merged, unmerged)  # folding rounds W0 + dW to bf16 (what it keeps: test_export.py)


def test_trainable_norms_stay_float32_on_a_half_precision_base_and_train() -> None:
    model = _adapted("hyperloader", torch.bfloat16, task_embedding_dim=8, projected_dim=8, hidden_dim=8)
    norms = layer_norm_parameters(model.base)
    assert norms and all(p.dtype == torch.float32 and p.requires_grad for p in norms.values())
    before = {name: p.detach().clone() for name, p in norms.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = make_batch(model.base)
    model.train()
    for _ in range(3):
        out = model(**batch, task_ids=torch.tensor([0, 1, 2]))
        assert out.logits.dtype == torch.bfloat16  # the rest of the model still computes in bf16
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    changed = sum(int((p != before[name]).sum()) for name, p in norms.items())
    total = sum(p.numel() for p in norms.values())
    assert changed > 0.9 * total, (changed, total)  # in bf16 most entries of a gain near 1 would not move


def test_orchmoe_routes_in_float32_under_autocast() -> None:
    """Training under bf16 autocast and evaluation without it see the same p(t|x)."""
    model = _adapted("orchmoe", torch.float32)
    batch = make_batch(model.base)
    with torch.no_grad():
        plain = model.task_distribution(batch["input_ids"], batch["attention_mask"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with model.routing(input_ids=batch["input_ids"], prompt_mask=batch["attention_mask"]) as state:
                autocast = state.task_probs
    assert autocast.dtype == torch.float32 and torch.equal(autocast, plain)


def test_new_task_rows_stay_fixed_after_the_table_moves() -> None:
    """The row mask is indices, not a tensor made on the device the table had then: a model moved afterwards (to
    a GPU, or here to float64) still trains only the new row."""
    from orchmoe_cli.adapters.few_shot import prepare_for_adaptation

    model = _adapted("poly", torch.float32)
    prepare_for_adaptation(model, "poly_z", "a_new_task")
    model.double()
    batch = make_batch(model.base)
    model.train()
    model(**batch, task_ids=torch.full((3,), len(TASKS))).loss.backward()
    grads = [layer.router.logits.grad for layer in model.layers]
    assert all(g is not None and g.dtype == torch.float64 for g in grads)
    assert all(not g[: len(TASKS)].any() and g[len(TASKS)].any() for g in grads)


def test_deterministic_mode_sets_the_cublas_workspace(monkeypatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        make_accelerator(TrainConfig(deterministic=True), spec_of("lora"))
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"])
def test_deepspeed_and_fsdp_are_refused_in_one_line(variable: str, monkeypatch) -> None:
    from orchmoe_cli.errors import OrchmoeError

    monkeypatch.setenv(variable, "true")
    with pytest.raises(OrchmoeError, match="is not supported yet; orchmoe trains data-parallel"):
        make_accelerator(TrainConfig(), spec_of("lora"))


def test_a_loaded_float16_t5_keeps_the_modules_transformers_keeps_in_float32(tmp_path) -> None:
    """T5's feed-forward output (``wo``) overflows in float16; transformers loads it in float32 and the base
    model stays so (a second cast to the recipe's dtype undid that)."""
    from orchmoe_cli.core.base_models import load_model
    from orchmoe_cli.recipe import load_recipe

    tiny = load_model(load_recipe(None, ["model.name=tiny-t5"]).model)
    local = tmp_path / "t5"
    tiny.model.save_pretrained(local)
    tiny.tokenizer.save_pretrained(local)
    loaded = load_model(load_recipe(None, [f"model.name={local}", "model.dtype=float16"]).model).model
    kept = {name for name, p in loaded.named_parameters() if p.dtype == torch.float32}
    assert kept and all(".wo." in name for name in kept)
    assert loaded.get_input_embeddings().weight.dtype == torch.float16


def test_auto_precision_scales_the_loss_for_a_float16_base_on_a_gpu(monkeypatch) -> None:
    """A float16 base (the pre-Ampere setting) trains with fp16 autocast and accelerate's loss scaling: without it,
    gradients flowing back through the float16 base underflow. fp16 is refused where there is no GPU."""
    from orchmoe_cli.core.base_models import resolve_precision
    from orchmoe_cli.errors import OrchmoeError

    monkeypatch.setattr("orchmoe_cli.core.base_models.native_bf16", lambda: True)
    assert resolve_precision("auto", half_base=True, use_cuda=True) == "fp16"
    assert resolve_precision("auto", half_base=False, use_cuda=True) == "bf16"
    assert resolve_precision("no", half_base=True, use_cuda=True) == "no"
    monkeypatch.setattr("orchmoe_cli.core.base_models.native_bf16", lambda: False)
    assert resolve_precision("auto", half_base=False, use_cuda=True) == "no"
    assert resolve_precision("auto", half_base=True, use_cuda=False) == "no"
    with pytest.raises(OrchmoeError, match="need a GPU") as refused:
        resolve_precision("fp16", half_base=True, use_cuda=False)
    assert refused.value.field == "train.mixed_precision"


def test_a_model_already_on_this_gpu_is_not_moved_again(monkeypatch) -> None:
    """accelerate names one process's GPU ``cuda``, parameters say ``cuda:0``: the same place, so a quantised model
    loaded there is left as it is (moving packed weights again can corrupt them)."""
    from orchmoe_cli.core.base_models import _same_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert _same_device(torch.device("cuda", 0), torch.device("cuda"))
    assert not _same_device(torch.device("cuda", 1), torch.device("cuda"))
    assert not _same_device(torch.device("cpu"), torch.device("cuda"))
    assert _same_device(torch.device("cpu"), torch.device("cpu"))
    assert not _same_device(torch.device("cuda", 0), torch.device("cuda", 1))
