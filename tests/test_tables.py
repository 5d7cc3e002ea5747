"""Multi-task tables as a source: the same tasks as SNI files and as a JSONL / Parquet table prepare identically,
held-out tasks come from a split column, task lists or a seeded rule, every command runs on a table, and bad
tables get one line each."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import datasets
import pytest
from cli_runner import run_cli
from rich.console import Console
from tiny_recipe import tiny_recipe

from orchmoe_cli.data import tables
from orchmoe_cli.data.data_config import ColumnMap, DataConfig
from orchmoe_cli.data.dataset_cache import prepare
from orchmoe_cli.data.sni import resolve_source
from orchmoe_cli.data.sources import resolve
from orchmoe_cli.data.tables import TableSource, export_table
from orchmoe_cli.errors import OrchmoeError

QUIET = Console(file=io.StringIO())
SAME = ("task", "category", "id", "prompt", "prompt_ids", "references", "reference_ids")


def _table(sni_dir: Path, path: Path) -> Path:
    export_table(resolve_source(DataConfig(source=str(sni_dir))), path)
    return path


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_sni_files_and_a_table_of_them_prepare_identically(suffix: str, sni_dir: Path, tmp_path: Path,
                                                           byt5: Any) -> None:
    table = _table(sni_dir, tmp_path / f"tasks{suffix}")
    settings = {"num_pos_examples": 0, "max_test_instances": 3, "max_train_instances": 4,
                "cache_dir": str(tmp_path / "cache")}
    sni = prepare(DataConfig(source=str(sni_dir), **settings), byt5, "byt5", True, console=QUIET)
    own = prepare(DataConfig(source=str(table), **settings), byt5, "byt5", True, console=QUIET)
    assert isinstance(resolve(DataConfig(source=str(table))), TableSource)
    assert own.path != sni.path and own.manifest["source"]["format"] == "table"
    for split in ("train", "test", "pool"):
        for column in SAME:
            assert own.dataset[split][column] == sni.dataset[split][column], (split, column)
    keys = ("name", "split", "category", "n_instances", "n_pool")
    assert [{k: t[k] for k in keys} for t in own.manifest["tasks"]] == \
           [{k: t[k] for k in keys} for t in sni.manifest["tasks"]]


def test_held_out_tasks_from_a_seeded_rule_within_categories(sni_dir: Path, tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "split"} for r in _rows(_table(sni_dir, tmp_path / "t.jsonl"))]
    path = _write_jsonl(tmp_path / "nosplit.jsonl", rows)
    chosen = [resolve(DataConfig(source=str(path), heldout_tasks=share, seed=seed)).tasks
              for share, seed in ((0.4, 1), (0.4, 1), (2, 7))]
    assert chosen[0] == chosen[1] and len(chosen[0]["test"]) == 2 and len(chosen[2]["test"]) == 2
    assert set(chosen[0]["train"]) | set(chosen[0]["test"]) == {r["task"] for r in rows}
    with pytest.raises(OrchmoeError, match="needs held-out tasks"):
        resolve(DataConfig(source=str(path))).tasks


def test_every_command_runs_on_a_parquet_table(sni_dir: Path, tmp_path: Path) -> None:
    table = _table(sni_dir, tmp_path / "tasks.parquet")
    run = tmp_path / "run"
    recipe = tiny_recipe(
        tmp_path / "own.yaml", table, run, "{name: orchmoe, rank: 4, n_skills: 2, n_abstract_tasks: 2}",
        train="{steps: 2, batch_size: 4}",
        eval="{max_instances: 2, batch_size: 2, max_new_tokens: 4, checkpoint: latest}",
        adapt="{steps: 2, batch_size: 2, val_instances: 0, modes: [zero_shot, orchmoe], shots: [2], seeds: [1]}")
    for command in (["prepare"], ["train"], ["eval"], ["adapt", "--tasks", "task101_delta_rewrite"]):
        assert run_cli([command[0], str(recipe), *command[1:]]) == 0, command
    results = json.loads(next(run.glob("eval-step-*/results.json")).read_text())
    assert results["n_instances"] == 4 and {t["task"] for t in results["tasks"]} == {"task101_delta_rewrite",
                                                                                   "task102_epsilon_qa"}
    assert len((run / "adapt" / "adapt_results.jsonl").read_text().splitlines()) == 2
    assert run_cli(["inspect-routing", str(run), "--data", str(recipe), "--out", str(tmp_path / "r"),
                    "--format", "json"]) == 0
    report = json.loads((tmp_path / "r" / "routing.json").read_text())
    assert report["classifier"] is not None and report["rows"][0]["category"]


def _bad(tmp_path: Path, rows: list[dict[str, Any]] | str, **fields: Any) -> str:
    path = tmp_path / "bad.jsonl"
    if isinstance(rows, bytes):
        path.write_bytes(rows)
    else:
        path.write_text(rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source=str(path), cache_dir=str(tmp_path / "cache"), **fields)
    with pytest.raises(OrchmoeError) as info:
        resolve(cfg).tasks  # noqa: B018 - reading the rows is what fails
    return str(info.value)


ROW = {"task": "a", "input": "x", "output": "y", "split": "train"}


@pytest.mark.parametrize(("rows", "fields", "words"), [
    ([{k: v for k, v in ROW.items() if k != "output"}], {}, "no column 'output' (columns: task, input, split)"),
    ([ROW, {**ROW, "task": ""}], {}, "line 2: the task name is empty"),
    ([ROW, {**ROW, "task": "a "}], {}, "line 2: the task name 'a ' has spaces around it"),
    ([ROW, {**ROW, "task": "A"}], {}, "line 2: tasks 'a' and 'A' differ only in case"),
    ([ROW, {**ROW, "output": 3}], {}, "line 2: output is a int (3), expected text"),
    ([ROW, {**ROW, "output": []}], {}, "line 2: output is an empty list"),
    ([{**ROW, "id": "1"}, {**ROW, "id": "1"}], {}, "bad.jsonl: lines 1 and 2: task 'a' has instance id '1' twice"),
    ([{**ROW, "id": "1"}, {**ROW, "id": " "}], {}, "line 2: id is empty"),
    ([ROW, {**ROW, "output": " "}], {}, "line 2: output is empty"),
    ([ROW, {**ROW, "input": ""}], {}, "line 2: input is empty"),
    ([ROW, {**ROW, "split": ["train"]}], {}, "line 2: split is a list"),
    ('{"task": "a", "input": "x", "output": "y", "split": "train"}\n[1]\n', {}, "line 2: expected a JSON object"),
    ([ROW, {**ROW, "split": "test"}], {}, "task 'a' is in split 'train' and 'test'"),
    ([ROW, {**ROW, "split": None}], {}, "line 2: split is empty"),
    ([ROW, {**ROW, "task": "b", "split": "dev"}], {}, "split value(s) 'dev' are neither 'train' nor 'test'"),
    ([ROW, {**ROW, "task": "b"}], {}, "no held-out task"),
    ([ROW, {**ROW, "task": "b", "split": "test"}], {"heldout_tasks": 1}, "remove data.heldout_tasks, or the column"),
    ([ROW, {**ROW, "task": "b", "split": "test"}], {"columns": ColumnMap(instruction="instructoin")},
     "no column 'instructoin'"),
    ([{k: v for k, v in ROW.items() if k != "split"}, {"task": "b", "input": "x", "output": "y"}],
     {"heldout_tasks": 2}, "holds out 2 tasks of the table's 2; at most 1"),
    ("", {}, "the file is empty"),
    ("\n", {}, "the table has no rows"),
    ('{"task": "a", "input": "caf\xe9", "output": "y", "split": "train"}\n'.encode("latin-1"), {}, "is not UTF-8 text"),
    ([{"name": "a", "question": "x", "answer": "y"}], {"columns": ColumnMap(task="name", input="question")},
     "no column 'output'"),
])
def test_bad_tables_get_one_line_naming_file_and_column(rows: Any, fields: dict, words: str, tmp_path: Path) -> None:
    message = _bad(tmp_path, rows, **fields)
    assert words in message and str(tmp_path / "bad.jsonl") in message and "\n" not in message, message
    assert not list((tmp_path / "cache").glob("*/manifest.json"))  # nothing prepared


def test_a_hub_id_that_cannot_be_reached_is_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    cfg = DataConfig(source="nobody-here/no-such-dataset", cache_dir=str(tmp_path / "cache"))
    source = resolve(cfg)
    assert isinstance(source, TableSource) and source.hub_id == "nobody-here/no-such-dataset"
    with pytest.raises(OrchmoeError, match="nobody-here/no-such-dataset: cannot be read as a table"):
        source.tasks  # noqa: B018


def _table_with_task_lists(sni_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A JSONL table without a split column, and a directory of task lists that splits it."""
    rows = [{k: v for k, v in r.items() if k != "split"} for r in _rows(_table(sni_dir, tmp_path / "t.jsonl"))]
    path = _write_jsonl(tmp_path / "plain.jsonl", rows)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train_tasks.txt").write_text("task001_alpha_qa\ntask002_beta_title\n")
    (lists / "test_tasks.txt").write_text("task101_delta_rewrite\n")
    return path, lists


def test_a_task_list_splits_a_table(sni_dir: Path, tmp_path: Path) -> None:
    path, lists = _table_with_task_lists(sni_dir, tmp_path)
    tasks = resolve(DataConfig(source=str(path), split_dir=str(lists))).tasks
    assert tasks == {"train": ("task001_alpha_qa", "task002_beta_title"), "test": ("task101_delta_rewrite",)}


def test_prepare_says_which_instruction_it_used_and_which_tasks_are_short(tmp_path: Path, byt5: Any) -> None:
    rows = [{"task": "a", "input": f"x{i}", "output": "y", "split": "train", "instruction": f"Do {i % 2}."}
            for i in range(4)] + [{"task": "b", "input": "z", "output": "w", "split": "test", "instruction": "B."}]
    path = _write_jsonl(tmp_path / "t.jsonl", rows)
    console = Console(file=io.StringIO(), width=300)
    prepared = prepare(DataConfig(source=str(path), cache_dir=str(tmp_path / "cache"), num_pos_examples=0,
                                  max_test_instances=3), byt5, "byt5", True, console=console)
    said = console.file.getvalue()  # type: ignore[attr-defined]
    assert "1 task(s) have rows whose instruction differs from the task's first one" in said and "a (2)" in said
    assert "1 held-out task(s) have fewer than data.max_test_instances (3)" in said
    assert all(p.startswith("Definition: Do 0.") for p in prepared.dataset["train"]["prompt"])


def test_a_template_of_your_own_builds_the_prompts(sni_dir: Path, tmp_path: Path, byt5: Any) -> None:
    table = _table(sni_dir, tmp_path / "t.jsonl")
    cfg = DataConfig(source=str(table), cache_dir=str(tmp_path / "cache"),
                     template="[{task}] {instruction}\n{input}\nA: ")
    prepared = prepare(cfg, byt5, "byt5", True, console=QUIET)
    first = prepared.dataset["test"][0]
    assert first["prompt"] == f"[{first['task']}] In this task ({first['task']}), you answer a short question\n" \
                              "Question 0 of task101_delta_rewrite?\nA: "
    with pytest.raises(OrchmoeError, match=r"template \(set on the command line\): \{answer\} is not one of "
                                           r"instruction, input, task, category"):
        from orchmoe_cli.recipe import load_recipe

        load_recipe(None, ["data.template='Q: {answer}'"])


def test_chat_template_wraps_each_prompt_as_a_user_turn(sni_dir: Path, tmp_path: Path, byt5: Any) -> None:
    from orchmoe_cli.core.base_models import byte_tokenizer

    tokenizer = byte_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
    cfg = DataConfig(source=str(_table(sni_dir, tmp_path / "t.jsonl")), cache_dir=str(tmp_path / "cache"),
                     chat_template=True, num_pos_examples=0, max_source_length=64)
    prepared = prepare(cfg, tokenizer, "bytes", False, console=QUIET)
    row = prepared.dataset["test"][0]
    head = tokenizer("<u>", add_special_tokens=False)["input_ids"]
    tail = tokenizer("</u><a>", add_special_tokens=False)["input_ids"]
    assert row["prompt_ids"][: len(head)] == head and row["prompt_ids"][-len(tail):] == tail
    assert len(row["prompt_ids"]) == 64  # the message is cut from the left, the turn's markers stay whole
    reference = tokenizer(row["references"][0], add_special_tokens=False)["input_ids"]
    assert row["reference_ids"][0] == reference + [tokenizer.eos_token_id]  # no leading space after the turn
    with pytest.raises(OrchmoeError, match="data.chat_template: .* encoder-decoder"):
        prepare(cfg, byt5, "byt5", True, console=QUIET)


def test_a_table_keeps_the_rows_sni_caps_keep(tmp_path: Path) -> None:
    rows = [{"task": name, "input": f"{name} {i}", "output": [f"o{i}", "p"], "split": split}
            for name, split in (("a", "train"), ("b", "test")) for i in range(50)]
    source = resolve(DataConfig(source=str(_write_jsonl(tmp_path / "t.jsonl", rows))))
    cfg = DataConfig(max_train_instances=7, max_test_instances=5, max_pool_instances=9, seed=11)
    shuffled = [f"a {i}" for i in range(50)]
    random.Random(11).shuffle(shuffled)  # Tk-Instruct's sample: shuffle the task's instances, keep the first N
    [(train, no_pool)] = list(source.read_split("train", cfg))
    [(test, pool)] = list(source.read_split("test", cfg))
    assert [i.input for i in train.instances] == shuffled[:7] and no_pool == []
    assert [i.input for i in test.instances] == [f"b {i}" for i in range(5)]
    assert [i.input for i in pool] == [f"b {i}" for i in range(5, 14)] and pool[0].output == ["o5", "p"]
    assert train.n_available == test.n_available == 50


def test_a_prepared_table_is_found_again_without_grouping_its_rows(sni_dir: Path, tmp_path: Path, byt5: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path, lists = _table_with_task_lists(sni_dir, tmp_path)
    cfg = DataConfig(source=str(path), split_dir=str(lists), cache_dir=str(tmp_path / "cache"), num_pos_examples=0)
    first = prepare(cfg, byt5, "byt5", True, console=QUIET)

    def no_grouping(*args: Any) -> None:
        raise AssertionError("the cache key needs no grouping")

    with monkeypatch.context() as patch:
        patch.setattr(tables, "_group", no_grouping)
        again = prepare(cfg, byt5, "byt5", True, console=QUIET)
    assert again.from_cache and again.path == first.path
    (lists / "test_tasks.txt").write_text("task102_epsilon_qa\n")  # another held-out choice is another key
    other = prepare(cfg, byt5, "byt5", True, console=QUIET)
    assert not other.from_cache and other.path != first.path
    assert [t["name"] for t in other.manifest["tasks"] if t["split"] == "test"] == ["task102_epsilon_qa"]
