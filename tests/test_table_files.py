"""Table files are read one by one, cells as they are: a value in one file never changes another file's, CSV cells
stay text, an edit is read again whatever its modification time, and every refusal names its file and line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from orchmoe_cli.data.data_config import ColumnMap, DataConfig
from orchmoe_cli.data.sources import resolve
from orchmoe_cli.data.tables import export_table
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.recipe import load_recipe


def _rows(task: str, split: str, outputs: list[Any]) -> list[dict[str, Any]]:
    return [{"task": task, "id": f"{task}-{i}", "input": f"in {i}", "output": out, "split": split}
            for i, out in enumerate(outputs)]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _references(source: Path, tmp_path: Path, **fields: Any) -> dict[str, list[list[str]]]:
    cfg = DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), **fields)
    found = resolve(cfg)
    return {split: [i.output for name in found.tasks[split] for i in next(
        task for task, _ in found.read_split(split, DataConfig(max_train_instances=99, seed=0))
        if task.name == name).instances] for split in ("train", "test")}


def test_a_number_in_one_file_of_a_folder_changes_no_other_file(tmp_path: Path) -> None:
    """Each file's types are its own: the text answers of a.jsonl stay text, b.jsonl's number is refused there."""
    folder = tmp_path / "tables"
    _jsonl(folder / "a.jsonl", _rows("a", "train", ["out 0", "out 1"]))
    _jsonl(folder / "b.jsonl", _rows("b", "test", ["out 0", 0.1]))
    with pytest.raises(OrchmoeError, match=r"b\.jsonl: line 2: output is a float \(0\.1\)"):
        _references(folder, tmp_path)
    _jsonl(folder / "b.jsonl", _rows("b", "test", [["out 0", "zero"], "out 1"]))  # a list in one file, text in another
    assert _references(folder, tmp_path) == {"train": [["out 0"], ["out 1"]], "test": [["out 0", "zero"], ["out 1"]]}


def test_csv_cells_stay_text(tmp_path: Path) -> None:
    """A CSV answer ``007`` is not the number 7 and ``NA`` is not missing; numeric ids are ids."""
    path = tmp_path / "t.csv"
    path.write_text('task,id,input,output,split\na,001,x,007,train\na,002,y,NA,train\nb,1,z,"0.10",test\n')
    assert _references(path, tmp_path) == {"train": [["007"], ["NA"]], "test": [["0.10"]]}
    (tmp_path / "dup.csv").write_text("task,input,input,output\na,x,y,z\n")
    with pytest.raises(OrchmoeError, match=r"dup\.csv: line 1: column 'input' is named twice"):
        resolve(DataConfig(source=str(tmp_path / "dup.csv"), cache_dir=str(tmp_path / "cache"))).tasks


def test_an_edit_that_keeps_the_modification_time_is_read_again(tmp_path: Path) -> None:
    """Local tables are read, not cached: an edit that keeps the file's time is seen."""
    path = _jsonl(tmp_path / "t.jsonl", _rows("a", "train", ["old"]) + _rows("b", "test", ["old"]))
    os.utime(path, (1_000_000_000, 1_000_000_000))
    assert _references(path, tmp_path)["test"] == [["old"]]
    _jsonl(path, _rows("a", "train", ["new"]) + _rows("b", "test", ["newer"]))  # cp -p, rsync -a, tar x
    os.utime(path, (1_000_000_000, 1_000_000_000))
    assert _references(path, tmp_path)["test"] == [["newer"]]


def test_files_of_a_folder_agree_on_ids_and_splits_not_on_instructions(tmp_path: Path) -> None:
    folder = tmp_path / "tables"
    _jsonl(folder / "a.jsonl", [{**row, "instruction": "Do it."} for row in _rows("a", "train", ["x"])])
    _jsonl(folder / "b.jsonl", _rows("b", "test", ["y"]))
    assert _references(folder, tmp_path) == {"train": [["x"]], "test": [["y"]]}
    _jsonl(folder / "b.jsonl", [{k: v for k, v in row.items() if k != "id"} for row in _rows("b", "test", ["y"])])
    with pytest.raises(OrchmoeError, match=r"b\.jsonl: no column 'id', which .*a\.jsonl has"):
        _references(folder, tmp_path)


def test_csv_rows_keep_their_lines_and_pandas_index_columns_are_left_out(tmp_path: Path) -> None:
    """``DataFrame.to_csv`` writes an unnamed index column; a quoted cell may span lines; a blank answer is refused
    (it would score an empty prediction as right)."""
    path = tmp_path / "t.csv"
    path.write_text(',task,input,output,split\n0,a,"two\nlines",x,train\n1,b,y,z,1\n')
    found = resolve(DataConfig(source=str(path), cache_dir=str(tmp_path / "cache"), test_value="1"))
    assert found.tasks == {"train": ("a",), "test": ("b",)}
    path.write_text(',task,input,output,split\n0,a,"two\nlines",x,train\n1,b,y,,test\n')
    with pytest.raises(OrchmoeError, match=r"t\.csv: line 4: output is empty"):
        resolve(DataConfig(source=str(path), cache_dir=str(tmp_path / "cache"))).tasks


def test_parquet_splits_may_be_integers(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"task": ["a", "b"], "input": ["x", "y"], "output": [["p"], ["q", "r"]],
                             "split": [0, 1]}), path)
    assert _references(path, tmp_path, train_value="0", test_value="1") == {"train": [["p"]], "test": [["q", "r"]]}


def test_task_lists_of_a_table_are_checked_as_sni_split_files(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "split"} for r in _rows("a", "", ["x"]) + _rows("b", "", ["y"])]
    path = _jsonl(tmp_path / "t.jsonl", rows)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train_tasks.txt").write_text("a\nb\n")
    (lists / "test_tasks.txt").write_text("b\n")
    with pytest.raises(OrchmoeError, match=r"test_tasks\.txt: line 1: task 'b' is also in .*train_tasks\.txt"):
        _references(path, tmp_path, split_dir=str(lists))
    (lists / "train_tasks.txt").write_text("a\na\n")
    with pytest.raises(OrchmoeError, match="line 2: task 'a' is listed twice"):
        _references(path, tmp_path, split_dir=str(lists))
    with pytest.raises(OrchmoeError, match=rf"is a file; .*did you mean data.split_dir={lists}\?"):
        resolve(DataConfig(source=str(path), split_dir=str(lists / "train_tasks.txt")))


def test_a_table_source_not_found_looks_nearby(tmp_path: Path) -> None:
    _jsonl(tmp_path / "data" / "sub" / "tasks.jsonl", _rows("a", "train", ["x"]))
    with pytest.raises(OrchmoeError, match=r"table file '.*tasks\.jsnol' not found \(did you mean 'tasks\.jsonl'\?\)"):
        resolve(DataConfig(source=str(tmp_path / "data" / "sub" / "tasks.jsnol")))
    with pytest.raises(OrchmoeError, match=r"holds no table file, but .*sub do\(es\): did you mean data.source="):
        resolve(DataConfig(source=str(tmp_path / "data")))
    here = Path.cwd()
    os.chdir(tmp_path)
    try:  # owner/name with a local folder as owner, or a table suffix, is a path, never sent to the hub
        with pytest.raises(OrchmoeError, match="table file 'data/tasks.jsonl' not found"):
            resolve(DataConfig(source="data/tasks.jsonl"))
    finally:
        os.chdir(here)


def test_task_input_and_output_are_three_columns_and_a_named_column_must_exist(tmp_path: Path) -> None:
    with pytest.raises(OrchmoeError, match="data.columns.output .*column 'input' is already data.columns.input"):
        load_recipe(None, ["data.columns.output=input"])
    assert load_recipe(None, ["data.columns.task=category"]).data.columns.category == "category"  # as it was
    path = _jsonl(tmp_path / "t.jsonl", _rows("a", "train", ["x"]) + _rows("b", "test", ["y"]))
    with pytest.raises(OrchmoeError, match="no column 'categroy'"):
        _references(path, tmp_path, columns=ColumnMap(category="categroy"))
    rows = [{**row, "split": "not a split"} for row in _rows("a", "train", ["x"])]  # null: the column is not read
    _jsonl(tmp_path / "lists" / "train_tasks.txt", []).write_text("a\n")
    (tmp_path / "lists" / "test_tasks.txt").write_text("b\n")
    path = _jsonl(tmp_path / "t.jsonl", rows + [{**row, "split": "x"} for row in _rows("b", "", ["y"])])
    assert _references(path, tmp_path, columns=ColumnMap(split=None), split_dir=str(tmp_path / "lists")) == \
        {"train": [["x"]], "test": [["y"]]}


def test_an_exported_table_is_written_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchmoe_cli.data.sni import resolve_source

    def full_disk(self: Any, path: str, **kwargs: Any) -> None:
        Path(path).write_text("half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("datasets.Dataset.to_json", full_disk)
    target = tmp_path / "new" / "deeper" / "t.jsonl"
    with pytest.raises(OrchmoeError, match="no space left on the device"):
        export_table(resolve_source(DataConfig()), target)
    assert list(tmp_path.iterdir()) == []  # no half file, no folder it made


def test_cells_are_read_as_written_or_refused(tmp_path: Path) -> None:
    """A stray quote in a TSV or CSV cell is refused with its line (read leniently, it merged two rows into one
    input), a non-text instruction is refused (a list of one, SNI's shape, is its text), and a hidden file of a
    folder is not read."""
    tsv = tmp_path / "t.tsv"
    tsv.write_text('task\tinput\toutput\tsplit\na\t"Hello\tworld\ttrain\nb\tsays she" ok\t"No"\ttest\n')
    with pytest.raises(OrchmoeError, match=r"t\.tsv: line 3: not valid CSV"):
        resolve(DataConfig(source=str(tsv), cache_dir=str(tmp_path / "cache"))).tasks
    bad = tmp_path / "bad.csv"
    bad.write_text('task,input,output,split\na,"5" inches,x,train\n')
    with pytest.raises(OrchmoeError, match=r"bad\.csv: line 2: not valid CSV"):
        resolve(DataConfig(source=str(bad), cache_dir=str(tmp_path / "cache"))).tasks
    rows = [{**row, "instruction": ["Do it."]} for row in _rows("a", "train", ["x"]) + _rows("b", "test", ["y"])]
    source = resolve(DataConfig(source=str(_jsonl(tmp_path / "i.jsonl", rows)), cache_dir=str(tmp_path / "c")))
    assert next(source.read_split("train", DataConfig()))[0].definition == ["Do it."]
    _jsonl(tmp_path / "n.jsonl", [{**rows[0], "instruction": 3}, rows[1]])
    with pytest.raises(OrchmoeError, match=r"n\.jsonl: line 1: instruction is a int"):
        resolve(DataConfig(source=str(tmp_path / "n.jsonl"), cache_dir=str(tmp_path / "c"))).tasks
    folder = tmp_path / "folder"
    _jsonl(folder / "a.jsonl", _rows("a", "train", ["x"]) + _rows("b", "test", ["y"]))
    _jsonl(folder / ".backup.jsonl", _rows("a", "train", ["old"]))
    _jsonl(folder / "sub" / "c.jsonl", _rows("c", "train", ["z"]))
    found = resolve(DataConfig(source=str(folder), cache_dir=str(tmp_path / "c")))
    assert found.tasks == {"train": ("a",), "test": ("b",)}
    assert any("tables in subfolders are not read" in note for note in found.notes())


def test_an_optional_column_a_required_role_reads_is_not_read_twice(tmp_path: Path) -> None:
    """``task: category`` (a table whose tasks are named in its category column) leaves no category column;
    naming a required role's column for an optional role is refused."""
    rows = [{"category": r["task"], "instruction": r["input"], "output": r["output"], "split": r["split"]}
            for r in _rows("a", "train", ["x", "y"]) + _rows("b", "test", ["z"])]
    path = _jsonl(tmp_path / "t.jsonl", rows)
    found = resolve(DataConfig(source=str(path), cache_dir=str(tmp_path / "c"),
                               columns=ColumnMap(task="category", input="instruction")))
    train = next(found.read_split("train", DataConfig()))[0]
    assert train.definition == [] and train.category == "uncategorized"
    with pytest.raises(OrchmoeError, match="data.columns.split .*column 'category' is already data.columns.task"):
        load_recipe(None, ["data.columns={task: category, split: category}"])


def test_task_lists_and_heldout_tasks_are_one_choice_and_unlisted_tasks_are_said(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "split"}
            for name in ("alpha", "beta", "delta") for r in _rows(name, "", ["x"])]
    path = _jsonl(tmp_path / "t.jsonl", rows)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train_tasks.txt").write_text("alpha\n")
    (lists / "test_tasks.txt").write_text("beta\n")
    with pytest.raises(OrchmoeError, match="task lists in .* already say which tasks are held out"):
        _references(path, tmp_path, split_dir=str(lists), heldout_tasks=1)
    found = resolve(DataConfig(source=str(path), split_dir=str(lists), cache_dir=str(tmp_path / "c")))
    assert found.tasks == {"train": ("alpha",), "test": ("beta",)}
    assert any("in neither task list and are left out: delta" in note for note in found.notes())
    other = {"task": "alpha", "id": "alpha-9", "input": "in 9", "output": "x", "category": "C1"}  # alpha is C0 first
    _jsonl(path, [{**row, "category": "C0"} for row in rows] + [other])
    again = resolve(DataConfig(source=str(path), split_dir=str(lists), cache_dir=str(tmp_path / "c")))
    assert any("task(s) have rows of another category than the task's first row" in n for n in again.notes())
    (lists / "test_tasks.txt").write_text("Beta\n")
    with pytest.raises(OrchmoeError, match="task 'Beta' has no rows in the table \\(did you mean 'beta'\\?\\)"):
        _references(path, tmp_path, split_dir=str(lists))


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json"])
def test_pandas_written_tables_read_as_the_jsonl_they_came_from(suffix: str, tmp_path: Path) -> None:
    """Quotes, delimiters and Windows line ends inside cells survive pandas' CSV / TSV quoting and its JSON."""
    import pandas as pd

    rows = [{"task": "a", "id": "1", "input": '"He is dead!" Then,\tthey left.\r\nNext line', "output": 'say "no"',
             "split": "train"},
            {"task": "b", "id": "2", "input": "plain", "output": "007", "split": "test"}]
    jsonl = _jsonl(tmp_path / "t.jsonl", rows)
    path = tmp_path / f"t{suffix}"
    frame = pd.DataFrame(rows)
    if suffix == ".json":
        frame.to_json(path, orient="records")
    else:
        frame.to_csv(path, sep="\t" if suffix == ".tsv" else ",")
    def inputs(source: Path) -> list[str]:
        found = resolve(DataConfig(source=str(source), cache_dir=str(tmp_path / "c")))
        return [i.input for split in ("train", "test") for task, _ in found.read_split(split, DataConfig())
                for i in task.instances]
    assert inputs(path) == inputs(jsonl) == [rows[0]["input"], "plain"]
    assert _references(path, tmp_path) == _references(jsonl, tmp_path) == {"train": [['say "no"']], "test": [["007"]]}
