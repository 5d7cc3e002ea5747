"""Every method on a tiny T5 and a tiny Llama: training, generation, routing, merging, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapter_fixtures import BUILDERS, METHODS, TASKS, make_batch, perturb
from tolerance import DEFAULT_ULPS, assert_close_scaled, assert_differs_scaled
from transformers import StoppingCriteria, StoppingCriteriaList

from orchmoe_cli.adapters import AdaptedModel, MethodConfig, attach_adapters, load_adapted
from orchmoe_cli.adapters.registry import SPECS
from orchmoe_cli.core.checkpoint import checkpoint_digest

ARCHS = list(BUILDERS)
ROUTED = [m for m in METHODS if SPECS[m].family.allocation_tensor or SPECS[m].family.inspects_generated_adapters]
# HyperLoader outputs are worse conditioned: perturbed generators make adapter weights of several units
# (G s with |s| about sqrt(projected_dim)) and post-LayerNorm adapters amplify rounding; between kernel
# paths its logits drift up to about 100 ulps apart where the other methods stay under 10
HYPER_ULPS = 1024


def _adapted(arch: str, method: str, seed: int = 0, **fields: object) -> AdaptedModel:
    model = attach_adapters(BUILDERS[arch](seed), MethodConfig(name=method, **fields), TASKS)  # type: ignore[arg-type]
    perturb(model, scale=0.3)
    return model.eval()


def _task_ids(method: str, ids: list[int]) -> dict[str, torch.Tensor]:
    return {} if method == "orchmoe" else {"task_ids": torch.tensor(ids)}


def _logits(model: AdaptedModel, batch: dict[str, torch.Tensor], **routing: torch.Tensor) -> torch.Tensor:
    batch = {k: v for k, v in batch.items() if k != "labels"}
    if model.base.config.is_encoder_decoder:
        batch["decoder_input_ids"] = torch.arange(3, 8).repeat(batch["input_ids"].shape[0], 1)
    with torch.no_grad():
        return model(**batch, **routing).logits


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_training_steps_and_generation(arch: str, method: str) -> None:
    base = BUILDERS[arch]()
    batch = make_batch(base)
    with torch.no_grad():
        base_logits = base(**batch).logits
    model = attach_adapters(base, MethodConfig(name=method), TASKS)
    with torch.no_grad():  # B (and HyperLoader's G_B, LN gain) start at zero: the base model, unchanged
        assert_close_scaled(model(**batch, **_task_ids(method, [0, 1, 2])).logits, base_logits)
    # a small perturbation: at 0.1 HyperLoader's generated T5 adapters compute values in the hundreds, float32
    # gradients lose digits (0.6% off float64) and 4 AdamW steps end above or below the start depending on the
    # CPU's kernels; at 0.02 every method drops the loss by 0.17 or more on every kernel path tried
    perturb(model, scale=0.02)
    groups = model.parameter_groups()
    optimizer = torch.optim.AdamW([{"params": p} for p in groups.values()], lr=1e-2)
    routing = _task_ids(method, [0, 1, -1])
    with torch.no_grad():
        before = model(**batch, **routing).loss
    model.train()
    for _ in range(4):
        out = model(**batch, **routing)
        loss = out.loss + sum(out.aux_losses.values())
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None for ps in groups.values() for p in ps)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert model(**batch, **routing).loss < before
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if not base.config.is_encoder_decoder:  # decoder-only generation wants left padding
        ids, mask = ids.flip(1), mask.flip(1)
    routing = _task_ids(method, [0, 2, 1])
    greedy = model.generate(ids, mask, max_new_tokens=5, do_sample=False, **routing)
    no_cache = model.generate(ids, mask, max_new_tokens=5, do_sample=False, use_cache=False, **routing)
    beams = model.generate(ids, mask, max_new_tokens=5, num_beams=4, num_return_sequences=2, do_sample=False,
                           **routing)
    assert torch.equal(greedy, no_cache)
    assert greedy.shape[0] == 3 and beams.shape[0] == 6


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_task_rows_are_independent_of_batch_mates(arch: str, method: str) -> None:
    model = _adapted(arch, method)
    torch.manual_seed(5)
    a, b, c = (torch.randint(3, 384, (1, 6)) for _ in range(3))
    first = {"input_ids": torch.cat([a, b, c]), "attention_mask": torch.ones(3, 6, dtype=torch.long)}
    second = {"input_ids": torch.cat([a, c, b]), "attention_mask": torch.ones(3, 6, dtype=torch.long)}
    alone = {"input_ids": a, "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    one = _logits(model, first, **_task_ids(method, [0, 1, 2]))
    two = _logits(model, second, **_task_ids(method, [0, 2, -1]))
    solo = _logits(model, alone, **_task_ids(method, [0]))
    # equal up to float rounding: the batch size and the batch mates' routing change the matmul kernels
    ulps = HYPER_ULPS if method == "hyperloader" else DEFAULT_ULPS
    assert_close_scaled(two[0], one[0], ulps)
    assert_close_scaled(solo[0], one[0], ulps)
    if method in ("poly", "mhr", "hyperloader"):  # task routing really changes the output
        assert_differs_scaled(_logits(model, first, task_ids=torch.tensor([0, 2, 2]))[1], one[1], ulps)
    kwargs = {"max_new_tokens": 4, "num_beams": 4, "num_return_sequences": 2, "do_sample": False}
    in_batch = model.generate(first["input_ids"], first["attention_mask"], **_task_ids(method, [0, 1, 2]), **kwargs)
    by_itself = model.generate(a, alone["attention_mask"], **_task_ids(method, [0]), **kwargs)
    assert torch.equal(in_batch[:2], by_itself)


@pytest.mark.parametrize("method", METHODS)
def test_merged_and_unmerged_agree(method: str) -> None:
    model = _adapted("llama", method)
    batch = make_batch(model.base)
    if not SPECS[method].family.mergeable:
        with pytest.raises(Exception, match="cannot be merged"):
            model.merge(0)
        return
    weight = model.base.model.layers[0].self_attn.q_proj.weight.clone()
    for task in (1, None):
        routing = _task_ids(method, [-1 if task is None else task] * 3)
        unmerged = _logits(model, batch, **routing)
        model.merge(task)
        merged = _logits(model, batch, **routing)
        model.unmerge()
        assert_close_scaled(merged, unmerged)
    assert torch.equal(model.base.model.layers[0].self_attn.q_proj.weight, weight)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_round_trip(arch: str, method: str, tmp_path: Path) -> None:
    model = _adapted(arch, method)
    model.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "tasks.json"}
    loaded = load_adapted(BUILDERS[arch](), tmp_path).eval()
    assert loaded.task_names == TASKS and loaded.method == model.method
    saved, restored = model.adapter_state_dict(), loaded.adapter_state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    batch = make_batch(model.base)
    routing = _task_ids(method, [2, 0, -1])
    assert torch.equal(_logits(model, batch, **routing), _logits(loaded, batch, **routing))


def test_checkpoint_digest_counts_weights_by_content_not_header_order(tmp_path: Path) -> None:
    # safetensors writes its metadata keys in an order that changes between processes: a checkpoint saved
    # again with the same tensors (a retrained run) must keep its digest, or a resumed sweep refuses it
    model = _adapted("llama", "mhr")
    model.save(tmp_path / "a")
    digest = checkpoint_digest(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    data = weights.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    reordered = {"__metadata__": dict(reversed(header.pop("__metadata__").items())), **dict(reversed(header.items()))}
    text = json.dumps(reordered).encode()
    weights.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size:])
    assert weights.read_bytes() != data and checkpoint_digest(tmp_path / "a") == digest
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).view(-1)[0] += 1.0
    model.save(tmp_path / "b")
    assert checkpoint_digest(tmp_path / "b") != digest  # a changed tensor is another checkpoint


@pytest.mark.parametrize("arch", ARCHS)
def test_orchmoe_never_needs_a_task_id(arch: str) -> None:
    model = _adapted(arch, "orchmoe", task_supervision_weight=0.5, load_balance_weight=0.01)
    batch = make_batch(model.base)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        out = model(**batch, category_ids=torch.tensor([1, -1, 3]))
        loss, aux = out.loss, out.aux_losses  # the auxiliary losses travel in the output
        assert set(aux) == {"mutual_information", "load_balance", "task_supervision"}
        optimizer.zero_grad()
        (loss + sum(aux.values())).backward()
        optimizer.step()
    assert model.task_classifier.proj.weight.grad is not None
    model.eval()
    out = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 3
    ids_ignored = _logits(model, batch, task_ids=torch.tensor([5, 6, 7]))  # out of range, and never read
    assert torch.equal(ids_ignored, _logits(model, batch))
    with model.routing(input_ids=batch["input_ids"], prompt_mask=batch["attention_mask"]) as state:
        assert state is not None and state.task_probs is not None
        assert_close_scaled(state.task_probs.sum(-1), torch.ones(3))


def test_orchmoe_routes_decoder_only_training_from_the_prompt_alone() -> None:
    model = _adapted("llama", "orchmoe")
    batch = make_batch(model.base)
    prompt = batch["attention_mask"] * (batch["labels"] == -100)
    with torch.no_grad():
        with_default = model(**batch).loss
        explicit = model(**batch, prompt_mask=prompt).loss
        everything = model(**batch, prompt_mask=batch["attention_mask"]).loss
    assert with_default == explicit and with_default != everything
    changed = batch["input_ids"].clone()
    changed[:, -1] = 7  # a target token: the routing must not see it
    with model.routing(input_ids=changed, prompt_mask=prompt) as one:
        pass
    with model.routing(input_ids=batch["input_ids"], prompt_mask=prompt) as two:
        pass
    assert one is not None and two is not None
    assert_close_scaled(one.task_probs, two.task_probs)


@pytest.mark.parametrize("method", ["poly_mu", "mhr_mu"])
def test_mu_variants_learn_routing_in_training_and_average_at_eval(method: str, tmp_path: Path) -> None:
    model = _adapted("t5", method)
    batch = make_batch(model.base)
    by_task = [_logits(model, batch, task_ids=torch.tensor([t] * 3)) for t in (0, 2, -1)]
    # at eval every route is the same uniform weights buffer, so the very same kernels run: bit-identical
    assert torch.equal(by_task[0], by_task[1])
    assert torch.equal(by_task[0], by_task[2])
    assert torch.equal(_logits(model, batch), by_task[0])  # eval needs no task id at all
    model.train()
    model(**batch, task_ids=torch.tensor([0, 1, 2])).loss.backward()
    assert "routers" in model.parameter_groups()
    model.to_average()
    assert "routers" not in model.parameter_groups() and model.count_parameters()["routers"] == 0
    model.eval()
    assert torch.equal(_logits(model, batch), by_task[0])
    model.save(tmp_path)
    loaded = load_adapted(BUILDERS["t5"](), tmp_path).eval()
    assert loaded.averaged
    assert torch.equal(_logits(loaded, batch), by_task[0])


def test_hyperloader_unseen_task_uses_the_mean_task_embedding() -> None:
    model = _adapted("t5", "hyperloader")
    batch = make_batch(model.base)
    with torch.no_grad():
        table = model.hyper.task_embedding
        table[1] = (table[0] + table[2]) / 2  # task 1 now sits exactly at the mean of all three
    assert_close_scaled(model.hyper.task_vectors(torch.tensor([-1, 1])), table[[1, 1]])
    # the two task vectors differ by rounding (a mean of three rows against the stored mean of two), and the
    # hypernetwork and its post-LayerNorm adapters amplify that gap: up to 255 ulps seen
    assert_close_scaled(_logits(model, batch, task_ids=torch.tensor([-1] * 3)),
                        _logits(model, batch, task_ids=torch.tensor([1] * 3)), ulps=2 * HYPER_ULPS)
    assert model.count_parameters()["other"] > 0  # the base layer norms, as the HyperLoader code trains them
    assert set(model.parameter_groups()) == {"hypernetwork", "other"}


def test_counts_and_groups_are_consistent() -> None:
    for method in METHODS:
        model = attach_adapters(BUILDERS["llama"](), MethodConfig(name=method), TASKS)
        counts = model.count_parameters()
        groups = model.parameter_groups()
        assert counts["total_trainable"] == sum(p.numel() for ps in groups.values() for p in ps)
        assert counts["total_trainable"] == sum(counts[g] for g in ("adapters", "routers", "hypernetwork", "other"))
        assert counts["base"] == sum(p.numel() for p in BUILDERS["llama"]().parameters())
        assert sum(t.numel() for t in model.adapter_state_dict().values()) == counts["total_trainable"]


@pytest.mark.parametrize("method", ROUTED)
@pytest.mark.parametrize("arch", ARCHS)
def test_activation_checkpointing_recomputes_with_the_same_routing(arch: str, method: str) -> None:
    grads = []
    for checkpointing in (False, True):
        model = _adapted(arch, method)
        if checkpointing:
            model.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch.manual_seed(0)  # same Gumbel draws and dropout in both runs (checkpointing replays the RNG state)
        # checkpointing turns the KV cache off; the plain run must too, or T5's decoder takes another code path
        model(**make_batch(model.base), **_task_ids(method, [0, 1, 2]), use_cache=False).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for ps in model.parameter_groups().values() for p in ps]))
    assert torch.equal(grads[0], grads[1])  # a replay of the same kernels on the same inputs


@pytest.mark.parametrize("method", ["mhr", "orchmoe", "hyperloader"])
def test_bfloat16_base_model(method: str) -> None:
    base = BUILDERS["llama"]().to(torch.bfloat16)
    model = attach_adapters(base, MethodConfig(name=method), TASKS)  # type: ignore[arg-type]
    perturb(model, scale=0.1)
    model.train()
    out = model(**make_batch(base), **_task_ids(method, [0, 1, 2]))
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == p.dtype for ps in model.parameter_groups().values() for p in ps)


@pytest.mark.parametrize("method", [m for m in ROUTED if not SPECS[m].family.inspects_generated_adapters])
def test_inference_reuses_the_mixed_skills_and_matches_the_autograd_path(method: str) -> None:
    """Without autograd a layer mixes its skills once per routing context (generation's decoding steps reuse
    them): the output equals the autograd path exactly, and a new context with new weights mixes afresh."""
    model = _adapted("llama", method)
    batch = {k: v for k, v in make_batch(model.base).items() if k != "labels"}
    routing = _task_ids(method, [0, 1, 2])
    with torch.enable_grad():
        expected = model(**batch, **routing).logits.detach()
    with torch.no_grad(), model.routing(input_ids=batch["input_ids"], prompt_mask=batch["attention_mask"],
                                        **routing) as state:
        first = model.base(**batch).logits
        assert len(state.mixed) == len(model.layers)  # every adapted layer cached its pair
        again = model.base(**batch).logits
    assert torch.equal(first, again)
    assert_close_scaled(first, expected)
    perturb(model, scale=0.3, seed=1)
    with torch.enable_grad():
        changed = model(**batch, **routing).logits.detach()
    assert_close_scaled(_logits(model, batch, **routing), changed)


class _RecordsMerged(StoppingCriteria):
    """Notes at every decoding step whether the model's adapted layers sit folded into the base weights."""

    def __init__(self, model: AdaptedModel) -> None:
        self.model = model
        self.seen: list[bool] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        layers = self.model.layers
        self.seen.append(bool(layers) and all(layer.merged for layer in layers))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("method", METHODS)
def test_single_routing_batches_generate_merged_and_get_the_exact_weights_back(method: str) -> None:
    """A batch whose rows all route alike generates with its LoRA folded in (no adapter op per decoding
    step) and scores as the unmerged path does; mixed batches, OrchMoE and HyperLoader stay unmerged."""
    model = _adapted("llama", method)
    batch = make_batch(model.base)
    ids, mask = batch["input_ids"].flip(1), batch["attention_mask"].flip(1)  # left padding
    weights = {name: p.detach().clone() for name, p in model.base.named_parameters()}
    kwargs = {"max_new_tokens": 4, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    for rows in ([1, 1, 1], [0, 1, 2]):
        routing = _task_ids(method, rows)
        record = _RecordsMerged(model)
        out = model.generate(ids, mask, stopping_criteria=StoppingCriteriaList([record]), **kwargs, **routing)
        with model.routing(input_ids=ids, prompt_mask=mask, **routing):  # the unmerged path
            reference = model.base.generate(input_ids=ids, attention_mask=mask, **kwargs)
        folds = SPECS[method].family.mergeable and (len(set(rows)) == 1 or not SPECS[method].family.needs_task_ids)
        assert record.seen and set(record.seen) == {folds}
        assert torch.equal(out.sequences, reference.sequences)
        assert_close_scaled(torch.stack(out.scores), torch.stack(reference.scores))
        assert not any(layer.merged for layer in model.layers)
        assert all(torch.equal(p, weights[name]) for name, p in model.base.named_parameters())
