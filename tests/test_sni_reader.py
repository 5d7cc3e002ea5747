"""Reading, validating and capping SNI task and split files."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

import pytest

from orchmoe_cli.data import sni_task
from orchmoe_cli.data.data_config import DataConfig
from orchmoe_cli.data.sni import bundled_dir, cap_instances, matches_languages, read_split, resolve_source
from orchmoe_cli.data.sni_task import MAX_TEXT_CHARS, read_task
from orchmoe_cli.errors import OrchmoeError

SNI_TRAIN_TASKS = ("task001_alpha_qa", "task002_beta_title", "task003_gamma_qa")  # as written by `sni_dir`
SNI_TEST_TASKS = ("task101_delta_rewrite", "task102_epsilon_qa")


def _set(key: str, value: Any) -> Callable[[dict], dict]:
    def mutate(task: dict) -> dict:
        task[key] = value
        return task
    return mutate


def _drop(key: str) -> Callable[[dict], dict]:
    def mutate(task: dict) -> dict:
        del task[key]
        return task
    return mutate


def _edit(path: tuple, value: Any) -> Callable[[dict], dict]:
    """Set a nested field, e.g. ("Instances", 3, "output")."""
    def mutate(task: dict) -> dict:
        node = task
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
        return task
    return mutate


def _drop_nested(path: tuple) -> Callable[[dict], dict]:
    def mutate(task: dict) -> dict:
        node = task
        for part in path[:-1]:
            node = node[part]
        del node[path[-1]]
        return task
    return mutate


MALFORMED_TASKS = [
    pytest.param(lambda t: b'{"Definition": ["x"],\n "Instances": [,]}', "line 2", id="invalid-json"),
    pytest.param(lambda t: b'{"Definition": ["caf\xe9"]}', "UTF-8", id="not-utf8"),
    pytest.param(lambda t: [t], "top level", id="top-level-list"),
    pytest.param(_drop("Definition"), "Definition: missing", id="missing-definition"),
    pytest.param(_drop("Instances"), "Instances: missing", id="missing-instances"),
    pytest.param(_drop("Categories"), "Categories: missing", id="missing-categories"),
    pytest.param(_drop("Positive Examples"), "Positive Examples: missing", id="missing-positive-examples"),
    pytest.param(_set("Definition", "a string"), "Definition: expected a non-empty list", id="definition-string"),
    pytest.param(_set("Definition", []), "Definition: expected a non-empty list", id="definition-empty"),
    pytest.param(_set("Definition", [7]), "Definition[0]: expected a string", id="definition-not-string"),
    pytest.param(_set("Categories", []), "Categories: expected a non-empty list", id="categories-empty"),
    pytest.param(_set("Instances", []), "Instances: expected a non-empty list", id="instances-empty"),
    pytest.param(_edit(("Instances", 2), "text"), "Instances[2]: expected an object", id="instance-not-object"),
    pytest.param(_drop_nested(("Instances", 1, "id")), "Instances[1].id: missing", id="instance-missing-id"),
    pytest.param(_edit(("Instances", 0, "input"), 5), "Instances[0].input: expected a string", id="input-number"),
    pytest.param(_edit(("Instances", 3, "output"), "answer"), "Instances[3].output: expected a non-empty list",
                 id="output-string"),
    pytest.param(_edit(("Instances", 3, "output"), []), "Instances[3].output: expected a non-empty list",
                 id="output-empty"),
    pytest.param(_edit(("Instances", 4, "output"), ["ok", None]), "Instances[4].output[1]: expected a string",
                 id="output-null-reference"),
    pytest.param(_set("Positive Examples", {}), "Positive Examples: expected a list", id="examples-object"),
    pytest.param(_edit(("Positive Examples", 0, "output"), ["a"]), "Positive Examples[0].output: expected a string",
                 id="example-output-list"),
    pytest.param(_drop_nested(("Negative Examples", 1, "input")), "Negative Examples[1].input: missing",
                 id="negative-missing-input"),
    pytest.param(_edit(("Negative Examples", 1, "explanation"), 3), "Negative Examples[1].explanation",
                 id="explanation-number"),
    pytest.param(_set("Input_language", "English"), "Input_language: expected a list", id="language-string"),
    pytest.param(lambda t: b"[" * 100_000 + b"]" * 100_000, "nested too deeply", id="json-too-deep"),
    pytest.param(lambda t: b'{"Definition": ' + b"9" * 5000 + b"}", "too many digits", id="json-huge-integer"),
    pytest.param(_edit(("Instances", 3, "input"), "ok \ud800"), "Instances[3].input: character 3 is a lone surrogate",
                 id="lone-surrogate"),
    pytest.param(_edit(("Instances", 4, "id"), "task002_beta_title-1"),
                 "Instances[4].id: 'task002_beta_title-1' is also the id of Instances[1]", id="duplicate-id"),
    pytest.param(_edit(("Instances", 0, "input"), "x" * (MAX_TEXT_CHARS + 1)), "Instances[0].input: 1,048,577",
                 id="text-too-long"),
    pytest.param(_edit(("Definition", 0), "x" * (MAX_TEXT_CHARS + 1)), "Definition[0]: 1,048,577",
                 id="definition-too-long"),
]


@pytest.mark.parametrize(("mutate", "expected"), MALFORMED_TASKS)
def test_malformed_task_file_names_file_and_field(sni_dir: Path, make_task: Callable, write_task: Callable,
                                                  mutate: Callable, expected: str) -> None:
    name = SNI_TRAIN_TASKS[1]
    path = write_task(sni_dir / "tasks" / f"{name}.json", mutate(make_task(name)))
    cfg = DataConfig(source=str(sni_dir))
    layout = resolve_source(cfg)
    with pytest.raises(OrchmoeError) as info:
        list(read_split(layout, "train", cfg))
    message = str(info.value)
    assert str(path) in message and expected in message
    assert "\n" not in message and ("fix the task file" in message or "re-save" in message)


def _append(name: str, text: str) -> Callable[[Path], Path]:
    def mutate(root: Path) -> Path:
        path = root / name
        path.write_text(path.read_text() + text)
        return path
    return mutate


def _replace(name: str, data: bytes | None) -> Callable[[Path], Path]:
    def mutate(root: Path) -> Path:
        path = root / name
        if data is None:
            path.unlink()
        else:
            path.write_bytes(data)
        return path
    return mutate


MALFORMED_SPLITS = [
    pytest.param(_append("train_tasks.txt", f"{SNI_TRAIN_TASKS[0]}\n"), "line 4: task 'task001_alpha_qa' is listed "
                 "twice", id="duplicate"),
    pytest.param(_append("train_tasks.txt", "task999_missing\n"), "line 4: task 'task999_missing' has no file",
                 id="missing-task-file"),
    pytest.param(_append("test_tasks.txt", f"\n{SNI_TRAIN_TASKS[2]}\n"), "line 4: task 'task003_gamma_qa' is also in",
                 id="in-both-splits"),
    pytest.param(_replace("test_tasks.txt", None), "split file not found", id="missing-split-file"),
    pytest.param(_replace("train_tasks.txt", b"\n  \n"), "lists no tasks", id="empty-split-file"),
    pytest.param(_replace("train_tasks.txt", b"task001_alpha_qa\n\xff\n"), "line 2: not UTF-8", id="not-utf8"),
]


@pytest.mark.parametrize(("mutate", "expected"), MALFORMED_SPLITS)
def test_malformed_split_file_names_file_and_line(sni_dir: Path, mutate: Callable, expected: str) -> None:
    path = mutate(sni_dir)
    with pytest.raises(OrchmoeError) as info:
        resolve_source(DataConfig(source=str(sni_dir)))
    assert str(path) in str(info.value) and expected in str(info.value)


def test_oversized_task_file_is_refused_before_reading(sni_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = sni_dir / "tasks" / f"{SNI_TRAIN_TASKS[0]}.json"
    monkeypatch.setattr(sni_task, "MAX_FILE_BYTES", path.stat().st_size - 1)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self} was read"))
    with pytest.raises(OrchmoeError, match=rf"{path.name}: task file is [\d,]+ bytes, more than the [\d,]+ allowed"):
        read_task(path)


def test_missing_source_and_split_dirs(tmp_path: Path, sni_dir: Path) -> None:
    with pytest.raises(OrchmoeError, match="data.source: directory .* not found"):
        resolve_source(DataConfig(source=str(tmp_path / "nope")))
    with pytest.raises(OrchmoeError, match="data.split_dir: directory .* not found"):
        resolve_source(DataConfig(source=str(sni_dir), split_dir=str(tmp_path / "nope")))
    (sni_dir / "train_tasks.txt").unlink()
    with pytest.raises(OrchmoeError, match="no split file train_tasks.txt in .*splits/default"):
        resolve_source(DataConfig(source=str(sni_dir)))


def test_layouts(sni_dir: Path, tmp_path: Path) -> None:
    layout = resolve_source(DataConfig(source=str(sni_dir)))
    assert layout.task_dir == sni_dir / "tasks"
    assert layout.tasks == {"train": SNI_TRAIN_TASKS, "test": SNI_TEST_TASKS}
    # upstream layout: splits/default, and task files directly in the source directory
    flat = tmp_path / "flat"
    (sni_dir / "tasks").rename(flat)
    (flat / "splits" / "default").mkdir(parents=True)
    for split in ("train_tasks.txt", "test_tasks.txt"):
        (sni_dir / split).rename(flat / "splits" / "default" / split)
    layout = resolve_source(DataConfig(source=str(flat)))
    assert layout.task_dir == flat and layout.split_files["test"] == flat / "splits" / "default" / "test_tasks.txt"
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "mine.txt").write_text(SNI_TRAIN_TASKS[0])
    (custom / "held_out.txt").write_text(SNI_TEST_TASKS[0])
    layout = resolve_source(DataConfig(source=str(flat), split_dir=str(custom), train_split="mine.txt",
                                       test_split="held_out.txt"))
    assert layout.tasks == {"train": SNI_TRAIN_TASKS[:1], "test": SNI_TEST_TASKS[:1]}


def test_read_task_fields(sni_dir: Path) -> None:
    task = read_task(sni_dir / "tasks" / f"{SNI_TRAIN_TASKS[1]}.json")
    assert task.name == SNI_TRAIN_TASKS[1] and task.category == "Title Generation"
    assert len(task.positive_examples) == 3 and task.negative_examples[1].explanation == "neg why 2"
    assert task.instances[1].output == ["answer 1", "other answer 1"] and task.n_available == 6


def test_language_filter(tmp_path: Path, make_task: Callable, write_task: Callable) -> None:
    def task_with(**languages: Any) -> Any:
        data = {**make_task("task1_x"), **languages}
        for key in [k for k, v in languages.items() if v is None]:
            del data[key]
        return read_task(write_task(tmp_path / "task1_x.json", data))

    assert matches_languages(task_with(), ["English"])
    mixed = task_with(Output_language=["English", "Spanish"])
    assert not matches_languages(mixed, ["English"]) and matches_languages(mixed, ["English", "Spanish"])
    assert not matches_languages(task_with(Instruction_language=["German"]), ["English"])
    missing = task_with(Input_language=None, Output_language=None, Instruction_language=None)
    assert matches_languages(missing, ["English"])  # missing fields keep the task


def test_caps(sni_dir: Path, make_task: Callable, write_task: Callable) -> None:
    write_task(sni_dir / "tasks" / f"{SNI_TRAIN_TASKS[0]}.json", make_task(SNI_TRAIN_TASKS[0], n_instances=40))
    task = read_task(sni_dir / "tasks" / f"{SNI_TRAIN_TASKS[0]}.json")
    cfg = DataConfig(max_train_instances=10, max_test_instances=7, seed=3)
    sampled = cap_instances(task, "train", cfg)
    expected = list(task.instances)
    random.Random(3).shuffle(expected)
    assert sampled.instances == expected[:10]
    assert cap_instances(task, "train", cfg).instances == sampled.instances  # deterministic
    assert cap_instances(task, "train", DataConfig(max_train_instances=10, seed=4)).instances != sampled.instances
    assert cap_instances(task, "test", cfg).instances == task.instances[:7]
    assert sampled.n_available == 40 and len(task.instances) == 40  # the original is untouched


def test_bundled_sample_reads_and_is_small() -> None:
    cfg = DataConfig()
    layout = resolve_source(cfg)
    assert len(layout.tasks["train"]) == 12 and len(layout.tasks["test"]) == 5
    readme = (bundled_dir() / "README.md").read_text(encoding="utf-8")
    categories = set()
    for split in ("train", "test"):
        for task, pool in read_split(layout, split, cfg):
            assert task.name in readme and matches_languages(task, cfg.languages)
            assert len(pool) == (100 if split == "test" else 0)  # every bundled held-out task has a pool
            categories.add(task.category)
    assert len(categories) == 17
    assert sum(p.stat().st_size for p in bundled_dir().iterdir() if p.is_file()) < 3_000_000
    first = read_task(bundled_dir() / "task033_winogrande_answer_generation.json")
    assert len(first.instances) == 200
