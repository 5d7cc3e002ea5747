"""Preparing, caching and reloading encoded datasets."""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path
from typing import Any, Callable

import datasets
import pytest
from rich.console import Console

from orchmoe_cli.data import dataset_cache as prepare_module
from orchmoe_cli.data.data_config import DataConfig
from orchmoe_cli.data.dataset_cache import load_prepared, prepare
from orchmoe_cli.errors import OrchmoeError

TRAIN = ["task001_alpha_qa", "task002_beta_title", "task003_gamma_qa"]
TEST = ["task101_delta_rewrite", "task102_epsilon_qa"]
COLUMNS = ["task", "task_index", "category", "id", "prompt", "prompt_ids", "references", "reference_ids"]


def _console() -> Console:
    return Console(file=io.StringIO(), width=200)


def _output(console: Console) -> str:
    return console.file.getvalue()  # type: ignore[attr-defined]


def _cfg(sni_dir: Path, tmp_path: Path, **changes: Any) -> DataConfig:
    return DataConfig(source=str(sni_dir), cache_dir=str(tmp_path / "cache"), **changes)


def test_encoder_decoder_prepare_manifest_and_rows(sni_dir: Path, tmp_path: Path, byt5: Any) -> None:
    cfg = _cfg(sni_dir, tmp_path, max_train_instances=4, max_test_instances=5, max_target_length=6)
    prepared = prepare(cfg, byt5, "byt5", True, console=_console())
    assert not prepared.from_cache and prepared.path.parent == tmp_path / "cache"
    manifest = prepared.manifest
    assert manifest["content_hash"] == prepared.path.name and manifest["tokenizer_id"] == "byt5"
    assert manifest["is_encoder_decoder"] is True and manifest["encoding"]["truncation_side"].startswith("left")
    assert manifest["encoding"]["num_pos_examples"] == 2 and "cache_dir" not in manifest["encoding"]
    assert [t["name"] for t in manifest["tasks"]] == TRAIN + TEST
    assert [t["index"] for t in manifest["tasks"]] == list(range(5))
    assert [t["split"] for t in manifest["tasks"]] == ["train"] * 3 + ["test"] * 2
    assert manifest["tasks"][1]["category"] == "Title Generation" and manifest["tasks"][1]["n_available"] == 6
    assert manifest["totals"] == {"train_tasks": 3, "test_tasks": 2, "train_instances": 12, "test_instances": 10,
                                  "pool_instances": 2, "truncated_prompts": 0, "filtered_tasks": 0}
    train, test = prepared.dataset["train"], prepared.dataset["test"]
    assert train.column_names == COLUMNS and len(train) == 12 and len(test) == 10
    assert test["id"] == [f"{name}-{i}" for name in TEST for i in range(5)]  # test: the first N, in order
    by_name = {t["name"]: t["index"] for t in manifest["tasks"]}
    for row in list(train) + list(test):
        assert row["task_index"] == by_name[row["task"]]
        assert row["prompt"].endswith("\nOutput: ") and row["prompt_ids"] == byt5(row["prompt"])["input_ids"]
        assert row["prompt_ids"][-1] == byt5.eos_token_id
        assert len(row["reference_ids"]) == len(row["references"])
        for ref, ids in zip(row["references"], row["reference_ids"]):
            assert ids == byt5(ref, truncation=True, max_length=6)["input_ids"] and ids[-1] == byt5.eos_token_id
    assert test[1]["references"] == ["answer 1", "other answer 1"]


def test_second_run_uses_cache_and_changes_make_new_hash(sni_dir: Path, tmp_path: Path, byt5: Any) -> None:
    cfg = _cfg(sni_dir, tmp_path)
    first = prepare(cfg, byt5, "byt5", True, console=_console())
    console = _console()
    again = prepare(cfg, byt5, "byt5", True, console=console)
    assert again.from_cache and again.path == first.path and "using cached" in _output(console)
    assert again.manifest == first.manifest
    elsewhere = prepare(_cfg(sni_dir, tmp_path / "other"), byt5, "byt5", True, console=_console())
    assert elsewhere.path.name == first.path.name  # cache_dir is not part of the hash
    other_setting = prepare(_cfg(sni_dir, tmp_path, num_pos_examples=1), byt5, "byt5", True, console=_console())
    other_kind = prepare(cfg, byt5, "byt5", False, console=_console())
    task_file = sni_dir / "tasks" / f"{TEST[0]}.json"
    task_file.write_text(task_file.read_text().replace("Question 0 of", "Question zero of"))
    edited = prepare(cfg, byt5, "byt5", True, console=_console())
    names = {first.path.name, other_setting.path.name, other_kind.path.name, edited.path.name}
    assert len(names) == 4
    assert "Question zero of" in edited.dataset["test"][0]["prompt"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(names)  # no temporary leftovers


def test_failure_leaves_nothing_behind(sni_dir: Path, tmp_path: Path, byt5: Any,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = prepare_module.encode_prompts
    monkeypatch.setattr(prepare_module, "encode_prompts", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare(_cfg(sni_dir, tmp_path), byt5, "byt5", True, console=_console())
    assert list((tmp_path / "cache").iterdir()) == []


def test_full_disk_is_one_error_and_leaves_nothing_behind(sni_dir: Path, tmp_path: Path, byt5: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: Any, path: str, *args: Any, **kwargs: Any) -> None:
        Path(path, "train").mkdir(parents=True)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(path, "train", "data.arrow")))

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", full)
    with pytest.raises(OrchmoeError, match=f"{tmp_path / 'cache'}: no space left on the device"):
        prepare(_cfg(sni_dir, tmp_path), byt5, "byt5", True, console=_console())
    assert list((tmp_path / "cache").iterdir()) == []


def test_broken_cache_entry_is_rebuilt(sni_dir: Path, tmp_path: Path, byt5: Any) -> None:
    cfg = _cfg(sni_dir, tmp_path)
    first = prepare(cfg, byt5, "byt5", True, console=_console())
    (first.path / "manifest.json").write_text("{not json")
    rebuilt = prepare(cfg, byt5, "byt5", True, console=_console())
    assert not rebuilt.from_cache and rebuilt.path == first.path
    assert load_prepared(first.path).manifest["content_hash"] == first.path.name


def test_load_prepared_errors(tmp_path: Path) -> None:
    with pytest.raises(OrchmoeError, match="not a readable prepared dataset"):
        load_prepared(tmp_path)


def test_language_filter_is_reported(sni_dir: Path, tmp_path: Path, byt5: Any, write_task: Callable,
                                     make_task: Callable) -> None:
    write_task(sni_dir / "tasks" / f"{TRAIN[1]}.json", {**make_task(TRAIN[1]), "Input_language": ["Spanish"]})
    console = _console()
    prepared = prepare(_cfg(sni_dir, tmp_path), byt5, "byt5", True, console=console)
    assert prepared.manifest["language_filter"] == {"languages": ["English"], "filtered_tasks": [TRAIN[1]]}
    assert [t["name"] for t in prepared.manifest["tasks"]] == [TRAIN[0], TRAIN[2]] + TEST
    assert prepared.manifest["totals"]["filtered_tasks"] == 1 and "skipped 1 task" in _output(console)
    with pytest.raises(OrchmoeError, match="train_tasks.txt: no task left after the language filter"):
        prepare(_cfg(sni_dir, tmp_path, languages=["Spanish"]), byt5, "byt5", True, console=_console())


def test_decoder_only_truncates_prompt_from_the_left(sni_dir: Path, tmp_path: Path, byt5: Any) -> None:
    cfg = _cfg(sni_dir, tmp_path, max_source_length=60, max_target_length=5)
    prepared = prepare(cfg, byt5, "byt5", False, console=_console())
    assert prepared.manifest["encoding"]["truncation_side"].startswith("left")
    assert prepared.manifest["totals"]["truncated_prompts"] == 30
    for row in prepared.dataset["train"]:
        assert len(row["prompt"]) > 60  # the string is kept whole, the ids are cut
        # the prompt's trailing space moves to the start of the answer
        assert row["prompt_ids"] == byt5(row["prompt"].rstrip(" "), add_special_tokens=False)["input_ids"][-60:]
        assert byt5.decode(row["prompt_ids"]).endswith("\nOutput:")
        for ref, ids in zip(row["references"], row["reference_ids"]):
            assert ids == byt5(" " + ref, add_special_tokens=False)["input_ids"][:4] + [byt5.eos_token_id]


def test_decoder_only_keeps_a_default_bos(sni_dir: Path, tmp_path: Path, bos_tokenizer: Any) -> None:
    cfg = _cfg(sni_dir, tmp_path, max_source_length=40)
    prepared = prepare(cfg, bos_tokenizer, "bos", False, console=_console())
    row = prepared.dataset["test"][0]
    assert row["prompt_ids"][0] == bos_tokenizer.bos_token_id and len(row["prompt_ids"]) == 40
    assert bos_tokenizer.decode(row["prompt_ids"][1:]).endswith("\nOutput:")
    assert row["reference_ids"][0] == bos_tokenizer(" answer 0", add_special_tokens=False)["input_ids"] + [2]
    manifest = json.loads((prepared.path / "manifest.json").read_text())
    assert manifest["tokenizer_id"] == "bos" and manifest["is_encoder_decoder"] is False


def test_local_model_tokenizer_edits_change_the_tokenizer_id(tmp_path: Path) -> None:
    """A prepared dataset is keyed by the tokenizer id: for a local directory it covers the tokenizer files."""
    from orchmoe_cli.core.base_models import load_model, load_tokenizer
    from orchmoe_cli.recipe import load_recipe

    tiny = load_model(load_recipe(None, ["model.name=tiny-llama"]).model)
    local = tmp_path / "model"
    tiny.model.save_pretrained(local)
    tiny.tokenizer.save_pretrained(local)
    cfg = load_recipe(None, [f"model.name={local}"]).model
    before = load_tokenizer(cfg).tokenizer_id
    config = json.loads((local / "tokenizer_config.json").read_text())
    config["model_max_length"] = 77
    (local / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(cfg).tokenizer_id != before and before.startswith(str(local))


def test_held_out_tasks_keep_an_adaptation_pool_apart_from_evaluation(sni_dir: Path, tmp_path: Path,
                                                                     byt5: Any) -> None:
    """Instances after the evaluation ones go to the `pool` split; no evaluation id is ever in it."""
    prepared = prepare(_cfg(sni_dir, tmp_path, max_test_instances=4, max_pool_instances=1), byt5, "byt5", True,
                       console=_console())
    pool, test = prepared.dataset["pool"], prepared.dataset["test"]
    assert pool["id"] == [f"{name}-4" for name in TEST]  # Instances[4:5] of each held-out task
    assert not set(pool["id"]) & set(test["id"]) and pool.column_names == test.column_names
    assert [t.get("n_pool") for t in prepared.manifest["tasks"] if t["split"] == "test"] == [1, 1]
    console = _console()
    none = prepare(_cfg(sni_dir, tmp_path, max_test_instances=6), byt5, "byt5", True, console=console)
    assert len(none.dataset["pool"]) == 0  # 6 instances each: nothing beyond the evaluation ones
    assert "2 held-out task(s) have no instances beyond the evaluation ones" in _output(console)
