"""`orchmoe adapt` sweeps as accumulated records, one rule per section, each a test that walks what it covers
followed by the cases that once broke it:

- binding (rule 3): ``sweep.json`` and every results line are bound to the base model, the checkpoint's digest
  and its origin; a continuation that differs in any recorded field is one line naming it and both values; one
  process writes a sweep directory at a time;
- checks first (rule 4): every list of the grid and every mode is checked before anything is loaded or written;
- damaged records (rule 5): every record a continuation reads goes through one reader that names file and line;
  a final line cut by a kill is dropped with a warning and its cell runs again;
- whole reports (rule 7): the summary shows every (task, mode, k) cell as valid markdown, and ``--keep-adapters``
  says which finished cells kept no adapter.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_runner import run_cli
from conftest import write_sni_dir
from rich.console import Console
from tiny_recipe import tiny_recipe

from orchmoe_cli.analysis.adaptation_report import (
    BINDING,
    POOL_SHIFT,
    PREDICTIONS,
    RESULTS,
    SWEEP,
    _markdown,
    cell_file_name,
    check_same_sweep,
    read_result_lines,
    read_results,
    summarise,
    summary_table,
)
from orchmoe_cli.analysis.pool_shift import answer_shift, read_shifts
from orchmoe_cli.commands import adapt as adapt_module
from orchmoe_cli.commands.common import adapt_list_override, with_option_overrides
from orchmoe_cli.core.records import read_jsonl
from orchmoe_cli.core.results import recorded_score_gap
from orchmoe_cli.core.run_lock import RunLock
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.fsutil import atomic_write_json
from orchmoe_cli.recipe import AdaptConfig, load_recipe

TASKS = ("task101_delta_rewrite", "task102_epsilon_qa")  # the held-out tasks: 3 evaluation + 3 pool instances
QUIET = Console(file=io.StringIO())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(recipe, checkpoint) of a 2-step tiny MHR run."""
    root = tmp_path_factory.mktemp("sweeps")
    recipe = tiny_recipe(root / "r.yaml", write_sni_dir(root / "sni"), root / "run",
                         "{name: mhr, rank: 4, alpha: 4, n_skills: 2, n_heads: 2}", train="{steps: 2, batch_size: 4}",
                         eval="{max_instances: 2, batch_size: 2, max_new_tokens: 4}",
                         adapt="{steps: 2, batch_size: 2, val_instances: 1, eval_every: 2}")
    assert run_cli(["train", str(recipe)]) == 0
    return recipe, root / "run" / "checkpoints" / "step-000002"


def _sweep(trained: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    recipe, checkpoint = trained
    own = [] if any(item.startswith("adapt.checkpoint=") for item in extra) else [f"adapt.checkpoint={checkpoint}"]
    return ["adapt", str(recipe), *own, f"adapt.output_dir={out}", *extra]


ZERO_SHOT = ("--modes", "zero_shot", "--tasks", ",".join(TASKS))


@pytest.fixture(scope="module")
def finished(trained: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished sweep: zero_shot on both held-out tasks (two results lines)."""
    out = tmp_path_factory.mktemp("finished") / "sweep"
    assert run_cli(_sweep(trained, out, *ZERO_SHOT)) == 0
    return out


@pytest.fixture
def sweep(finished: Path, tmp_path: Path) -> Path:
    """A private copy of the finished sweep."""
    return Path(shutil.copytree(finished, tmp_path / "sweep"))


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys of the cells that run, in order."""
    calls: list[str] = []
    real = adapt_module.run_cell
    monkeypatch.setattr(adapt_module, "run_cell", lambda cell, *rest: (calls.append(cell.key), real(cell, *rest))[1])
    return calls


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_error(capsys: pytest.CaptureFixture[str], code: int) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err + captured.out and code == 2 and len(lines) == 1, (code, captured.err)
    assert lines[0].startswith("error: ")
    return lines[0]


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def leaves(record: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[str, tuple[str, ...]]]:
    """(dotted name, key path) of every leaf value of a nested record."""
    for name, value in record.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, (*path, name))
        else:
            yield ".".join((*path, name)), (*path, name)


def leaf(record: dict[str, Any], path: tuple[str, ...]) -> Any:
    for name in path:
        record = record[name]
    return record


def with_leaf(record: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A copy of ``record`` with the leaf at ``path`` replaced."""
    record = json.loads(json.dumps(record))
    leaf(record, path[:-1])[path[-1]] = value
    return record


def changed(value: Any) -> Any:
    """Another value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    return "another" if value is None else f"{value}-other"


# --------------------------------------------------------------------------- rule 3: records are bound


def test_every_recorded_field_is_compared_on_continuing(finished: Path, tmp_path: Path) -> None:
    """Walk every field sweep.json records (settings, data, base model, checkpoint, origin): a continuation whose
    value differs is one line naming that field and both values; the same walk over what every results line
    binds, line by line."""
    identity = json.loads((finished / SWEEP).read_text())
    assert set(identity["base"]) >= {"architecture", "hidden_size", "intermediate_size", "layers", "parameters",
                                     "dtype", "quantization"} and set(BINDING) <= set(identity)
    for row in lines_of(finished / RESULTS):
        assert {name: row[name] for name in BINDING} == {name: identity[name] for name in BINDING}
    walked = list(leaves(identity))
    assert len(walked) > 20
    for name, path in walked:
        current = leaf(identity, path)
        out = tmp_path / name
        out.mkdir()
        (out / SWEEP).write_text(json.dumps(with_leaf(identity, path, changed(current))))
        with pytest.raises(OrchmoeError) as info:
            check_same_sweep(out, identity)
        assert f"{name}={changed(current)!r} (this run: {current!r})" in str(info.value), str(info.value)

    binding = {name: identity[name] for name in BINDING}
    for name, path in leaves(binding):
        first, second = lines_of(finished / RESULTS)
        results = tmp_path / f"{name}.jsonl"
        write_lines(results, [first, with_leaf(second, path, changed(leaf(second, path)))])
        expected = re.escape(f"{results}: line 2: its cell was made with {name}=")
        with pytest.raises(OrchmoeError, match=expected):  # on continuing this sweep
            read_result_lines(results, binding)
        with pytest.raises(OrchmoeError, match=expected):  # in any summary: lines of two sweeps never mix
            read_results(results)


@pytest.mark.parametrize(("override", "field", "values"), [
    ("model.tiny.hidden_size=64", "base.hidden_size", ("32", "64")),
    ("model.dtype=bfloat16", "base.dtype", ("'float32'", "'bfloat16'")),
    ("model.tiny.seed=7", "base.tiny.seed", ("0", "7")),
], ids=["another-width", "bfloat16", "other-weights"])
def test_new_seeds_on_another_base_are_refused(trained: tuple[Path, Path], tmp_path: Path, capsys,
                                               override: str, field: str, values: tuple[str, str]) -> None:
    """The bare base model (no checkpoint to differ): a wider base, another dtype or other weights are another
    base, never more seeds of the same cell."""
    out = tmp_path / "out"
    args = ["adapt", str(trained[0]), "adapt.checkpoint=none", f"adapt.output_dir={out}", "--modes", "lora_scratch",
            "--shots", "1", "--tasks", TASKS[0]]
    assert run_cli([*args, "--seeds", "1"]) == 0
    before = snapshot(out)
    capsys.readouterr()
    line = one_error(capsys, run_cli([*args, "--seeds", "2", override]))
    assert f"{field}={values[0]} (this run: {values[1]})" in line and "adapt.output_dir" in line, line
    assert snapshot(out) == before


def test_lines_of_another_checkpoint_are_refused_not_summarised(sweep: Path, trained: tuple[Path, Path], capsys,
                                                                ran: list[str]) -> None:
    rows = lines_of(sweep / RESULTS)
    rows[1]["checkpoint_sha256"] = "0" * 64  # a line another sweep appended
    write_lines(sweep / RESULTS, rows)
    before = snapshot(sweep)
    line = one_error(capsys, run_cli(_sweep(trained, sweep, *ZERO_SHOT)))
    assert f"{sweep / RESULTS}: line 2: its cell was made with checkpoint_sha256='{'0' * 64}'" in line, line
    assert snapshot(sweep) == before and ran == []
    with pytest.raises(OrchmoeError, match="line 2"):
        summarise(read_results(sweep / RESULTS))


def test_one_process_writes_a_sweep_directory(sweep: Path, trained: tuple[Path, Path], capsys,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A second sweep on a directory in use is refused in one line naming it and the holder's pid, and writes
    nothing; the sweep holds the lock while its cells run, and leaves none behind."""
    before = snapshot(sweep)
    with RunLock(sweep):
        line = one_error(capsys, run_cli(_sweep(trained, sweep, "--modes", "zero_shot,mhr_z", "--shots", "1")))
        assert str(sweep) in line and f"pid {os.getpid()}" in line, line
    assert snapshot(sweep) == before

    held = []
    real = adapt_module.run_cell
    monkeypatch.setattr(adapt_module, "run_cell", lambda cell, s: (
        held.append(json.loads((s.out / ".lock").read_text())["pid"]), real(cell, s))[1])
    assert run_cli(_sweep(trained, sweep, "--modes", "zero_shot,mhr_z", "--shots", "1", "--tasks", TASKS[0])) == 0
    assert held == [os.getpid()] and not (sweep / ".lock").exists()


# --------------------------------------------------------------------------- rule 4: checks first


def _grid_lists() -> list[str]:
    hints = typing.get_type_hints(AdaptConfig)
    return [f.name for f in dataclasses.fields(AdaptConfig)
            if list in (typing.get_origin(hints[f.name]), *map(typing.get_origin, typing.get_args(hints[f.name])))]


def test_every_list_of_the_grid_is_checked_up_front() -> None:
    """Walk the adapt section's list fields: each refuses an empty list and a value twice whenever a recipe is read
    (every command reads the whole recipe); seeds refuse what the generators cannot take; modes refuse what needs a
    missing checkpoint before anything loads."""
    sample = {"modes": ["zero_shot", "lora_scratch"], "shots": [1, 2], "seeds": [1, 2], "tasks": list(TASKS)}
    assert sorted(_grid_lists()) == sorted(sample)
    for name in sample:
        for value, words in (([], "is empty"), ([sample[name][0], *sample[name]], "is listed twice")):
            with pytest.raises(OrchmoeError, match=words) as info:
                load_recipe(None, [f"adapt.{name}={json.dumps(value)}"])
            assert info.value.field == f"adapt.{name}"
    for seeds in ([-1], [2**32], [0, 2**32 - 1]):
        if seeds[-1] == 2**32 - 1:
            assert load_recipe(None, [f"adapt.seeds={seeds}"]).adapt.seeds == seeds
            continue
        with pytest.raises(OrchmoeError, match=f"got {seeds[0]}"):
            load_recipe(None, [f"adapt.seeds={seeds}"])
    with pytest.raises(OrchmoeError, match=r"every k must be at least 1, got \[0\]"):
        load_recipe(None, ["adapt.shots=[0]"])
    for mode in sorted(adapt_module.adapt_modes()):
        adapt_module.check_grid(AdaptConfig(modes=[mode]), True)
        with pytest.raises(OrchmoeError, match=f"'{mode}' adapts a trained"):
            adapt_module.check_grid(AdaptConfig(modes=["zero_shot", "lora_scratch", mode]), False)


def test_every_command_refuses_a_bad_adapt_section(trained: tuple[Path, Path], capsys) -> None:
    """A recipe is read whole: `train` refuses adapt.shots=[0] as `adapt` does, not only when a sweep runs."""
    for command in (["train", str(trained[0])], ["eval", str(trained[0])], ["prepare", str(trained[0])]):
        line = one_error(capsys, run_cli([*command, "adapt.shots=[0]"]))
        assert "adapt.shots (set on the command line): every k must be at least 1" in line, line


UP_FRONT = [
    (("adapt.checkpoint=none", "--modes", "zero_shot,lora_scratch,mhr_z"), "adapt.modes", "adapt.checkpoint is none"),
    (("--seeds=-1",), "adapt.seeds", "got -1"),
    (("--seeds", str(2**32)), "adapt.seeds", f"got {2**32}"),
    (("--modes", ""), "adapt.modes", "is empty"),
    (("--tasks", ""), "adapt.tasks", "is empty"),
    (("--shots", "1,1"), "adapt.shots", "1 is listed twice"),
    (("--seeds", "5,5"), "adapt.seeds", "5 is listed twice"),
    (("--modes", "zero_shot,zero_shot"), "adapt.modes", "'zero_shot' is listed twice"),
    (("--tasks", f"{TASKS[0]},{TASKS[0]}"), "adapt.tasks", f"'{TASKS[0]}' is listed twice"),
]


@pytest.mark.parametrize("option, value", [("--shots", "1,,2"), ("--tasks", f"{TASKS[0]},"), ("--seeds", ",5"),
                                           ("--modes", "zero_shot,,lora_scratch")])
def test_an_empty_item_in_a_list_option_is_refused(trained: tuple[Path, Path], tmp_path: Path, capsys,
                                                   ran: list[str], option: str, value: str) -> None:
    line = one_error(capsys, run_cli(_sweep(trained, tmp_path / "out", "--modes", "zero_shot", option, value)))
    assert f"{option}: '{value}' has an empty item" in line and ran == [], line


@pytest.mark.parametrize(("extra", "field", "words"), UP_FRONT, ids=[f"{f}:{w}" for _, f, w in UP_FRONT])
def test_a_bad_grid_is_refused_before_any_cell(trained: tuple[Path, Path], tmp_path: Path, capsys, ran: list[str],
                                               extra: tuple[str, ...], field: str, words: str) -> None:
    out = tmp_path / "out"
    line = one_error(capsys, run_cli(_sweep(trained, out, "--modes", "zero_shot", "--shots", "1", *extra)))
    assert f"{trained[0]}: {field} (set on the command line): " in line and words in line, line
    assert ran == [] and not out.exists()


@pytest.mark.parametrize("marker", [True, False], ids=["kept-adapter", "adapted-tasks"])
def test_an_adapted_adapter_is_not_adapted_again(trained: tuple[Path, Path], tmp_path: Path, capsys,
                                                 ran: list[str], marker: bool) -> None:
    kept_sweep = tmp_path / "kept"
    assert run_cli(_sweep(trained, kept_sweep, "--modes", "mhr_z", "--shots", "1", "--tasks", TASKS[0],
                          "--keep-adapters")) == 0
    [adapter] = (kept_sweep / "cells").glob("*/adapter")
    if not marker:  # kept before the marker existed: its adapter_config.json still lists the adapted task
        (adapter / adapt_module.KEPT).unlink()
    ran.clear()
    capsys.readouterr()  # the first sweep's own output
    out = tmp_path / "again"
    line = one_error(capsys, run_cli(["adapt", str(trained[0]), f"adapt.checkpoint={adapter}",
                                      f"adapt.output_dir={out}", *ZERO_SHOT]))
    named = f"{adapter / adapt_module.KEPT}: " if marker else f"{adapter / 'adapter_config.json'}: adapted_tasks"
    assert "adapt.checkpoint" in line and named in line, line
    assert ran == [] and not out.exists()


# --------------------------------------------------------------------------- rule 5: damaged records

DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "not-json": lambda data: b"{oops\n" + data.split(b"\n", 1)[1],  # the first line (every record has several)
    "not-an-object": lambda data: b"[1, 2]\n" + data.split(b"\n", 1)[1],
    "not-utf8": lambda data: data.replace(b'"', b'"\xff', 1),
    "cut-short": lambda data: data[:-12],
}


def _continue(out: Path) -> list[dict[str, Any]]:
    """What a continuation of the sweep reads (sweep.json, the results, every cell's predictions, and the pool
    measures its summary shows)."""
    identity = json.loads((out.parent / "identity.json").read_text())
    adapt_module._finished(out, [], identity, False, True, QUIET)
    if (out / POOL_SHIFT).is_file():
        read_shifts(out / POOL_SHIFT)
    return read_results(out / RESULTS)


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_every_record_a_continuation_reads_names_its_damage(finished: Path, tmp_path: Path, damage: str) -> None:
    """Walk every record file of a sweep directory (all but the summaries it writes): each damage is one error
    naming the file (and the line of a JSON Lines file), except a results line cut short at the end: dropped,
    so its cell runs again."""
    base = Path(shutil.copytree(finished, tmp_path / "base"))  # with the pool measures a trained cell leaves
    atomic_write_json(base / POOL_SHIFT, {TASKS[0]: answer_shift(["a b"] * 10, ["a"] * 10).as_dict()})
    records = sorted(p.relative_to(base) for p in base.rglob("*.json*") if not p.name.startswith("adapt_summary"))
    assert {str(p) for p in records} >= {SWEEP, RESULTS, POOL_SHIFT} and any(p.parts[0] == PREDICTIONS for p in records)
    (tmp_path / "identity.json").write_bytes((finished / SWEEP).read_bytes())
    for record in records:
        out = tmp_path / "sweep"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(base, out)
        target = out / record
        target.write_bytes(DAMAGES[damage](target.read_bytes()))
        if damage == "cut-short" and str(record) == RESULTS:
            assert [row["key"] for row in _continue(out)] == [f"{TASKS[0]}/zero_shot/k0/s0"]
            assert target.read_bytes().endswith(b"}\n")  # the cut line is gone before the next append
            continue
        with pytest.raises(OrchmoeError) as info:
            _continue(out)
        message = str(info.value)
        assert message.startswith(f"{target}: ") and len(message.splitlines()) == 1, message
        if target.suffix == ".jsonl":
            assert message.startswith(f"{target}: line "), message


@pytest.mark.parametrize("edited", ["results-line", "cell-predictions"])
def test_a_score_its_per_instance_rows_do_not_give_is_refused(finished: Path, tmp_path: Path, edited: str) -> None:
    """The summary tables read the recorded scores and the intervals the per-instance rows: edited or swapped
    afterwards, the two would tell different stories, so reading them is refused naming the file and cell."""
    out = Path(shutil.copytree(finished, tmp_path / "sweep"))
    lines = (out / RESULTS).read_text(encoding="utf-8").splitlines(keepends=True)
    first = json.loads(lines[0])
    if edited == "results-line":
        lines[0] = json.dumps({**first, "rougeL": first["rougeL"] + 7.5}) + "\n"
        (out / RESULTS).write_text("".join(lines), encoding="utf-8")
    else:
        cell = out / PREDICTIONS / f"{cell_file_name(first['key'])}.jsonl"
        rows = [json.loads(line) for line in cell.read_text(encoding="utf-8").splitlines()]
        other = 0.0 if first["rougeL"] > 50 else 1.0
        cell.write_text("".join(json.dumps({**row, "rougeL": other}) + "\n" for row in rows), encoding="utf-8")
    identity = json.loads((out / SWEEP).read_text())
    for reader in (lambda: adapt_module._finished(out, [], identity, False, False, QUIET),  # before any cell
                   lambda: read_results(out / RESULTS)):  # and every summary
        with pytest.raises(OrchmoeError) as info:
            reader()
        assert str(info.value).startswith(f"{out / RESULTS}: cell {first['key']}: rougeL "), info.value


def test_a_recorded_score_is_compared_at_its_rounding() -> None:
    rows = [0.1, 0.2, 0.25]  # 18.3333... points
    assert recorded_score_gap({"rougeL": 18.3333}, {"rougeL": rows}) is None
    for recorded in ({"rougeL": 18.34}, {"rougeL": True}, {"rougeL": "18.3333"}, {}, {"rougeL": float("nan")}):
        assert "per-instance scores give 18.3333" in str(recorded_score_gap(recorded, {"rougeL": rows}))
    assert "no per-instance scores" in str(recorded_score_gap({"rougeL": 0.0}, {"rougeL": []}))  # none vouch


def test_the_reader_skips_blank_lines_and_ends_a_whole_unterminated_line(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_bytes(b'{"a": 1}\n\n  \n{"a": 2}')
    lines = read_jsonl(path, cut_ok=True)
    assert lines.records == [{"a": 1}, {"a": 2}] and lines.cut is None
    lines.repair()
    assert path.read_bytes() == b'{"a": 1}\n\n  \n{"a": 2}\n'
    path.write_bytes(b'{"a": 1}\n{"a": 2')
    with pytest.raises(OrchmoeError, match="line 2: not valid JSON"):
        read_jsonl(path)  # only where a cut can happen is it forgiven


def test_a_cut_last_line_is_dropped_with_a_warning_and_its_cell_redone(sweep: Path, trained: tuple[Path, Path],
                                                                       capsys, ran: list[str]) -> None:
    data = (sweep / RESULTS).read_bytes()
    (sweep / RESULTS).write_bytes(data[: len(data) - 40])  # what SIGKILL or a full disk leaves
    assert run_cli(_sweep(trained, sweep, *ZERO_SHOT)) == 0
    err = capsys.readouterr().err  # a warning: on standard error, apart from the results
    assert f"warning: {sweep / RESULTS}: line 2 was cut short" in " ".join(err.split()), err
    assert ran == [f"{TASKS[1]}/zero_shot/k0/s0"]
    assert [row["key"] for row in lines_of(sweep / RESULTS)] == [f"{task}/zero_shot/k0/s0" for task in TASKS]


def test_a_blank_line_is_skipped(sweep: Path, trained: tuple[Path, Path], ran: list[str]) -> None:
    first, second = (sweep / RESULTS).read_text().splitlines()
    (sweep / RESULTS).write_text(f"{first}\n\n{second}\n")
    assert run_cli(_sweep(trained, sweep, *ZERO_SHOT)) == 0
    assert ran == [] and len(read_results(sweep / RESULTS)) == 2


DAMAGED_LINES: list[tuple[str, Callable[[list[dict[str, Any]]], str], str]] = [
    ("no-key", lambda rows: json.dumps({k: v for k, v in rows[0].items() if k != "key"}), "line 1: 'key' is missing"),
    ("scores-null", lambda rows: json.dumps({**rows[0], "scores": None}), "line 1: 'scores' is None"),
    ("invalid-json", lambda rows: json.dumps(rows[0])[:30], "line 1: not valid JSON"),
    ("a-list", lambda rows: "[1, 2]", "line 1: expected a JSON object, got list"),
    ("a-cell-twice", lambda rows: json.dumps(rows[1]), f"line 2: cell {TASKS[1]}/zero_shot/k0/s0 is already"),
]


@pytest.mark.parametrize(("bad", "words"), [(b, w) for _, b, w in DAMAGED_LINES], ids=[i for i, _, _ in DAMAGED_LINES])
def test_a_damaged_line_in_the_middle_is_one_line(sweep: Path, trained: tuple[Path, Path], capsys, ran: list[str],
                                                  bad: Callable[[list[dict[str, Any]]], str], words: str) -> None:
    rows = lines_of(sweep / RESULTS)
    (sweep / RESULTS).write_text(f"{bad(rows)}\n{json.dumps(rows[1])}\n")
    before = snapshot(sweep)
    line = one_error(capsys, run_cli(_sweep(trained, sweep, *ZERO_SHOT)))
    assert f"{sweep / RESULTS}: {words}" in line, line
    assert snapshot(sweep) == before and ran == []


@pytest.mark.parametrize(("content", "words"), [("[1, 2]", "expected a JSON object (the sweep's settings), got list"),
                                                ('{"checkpoint_sha256": ', "not valid JSON")], ids=["list", "cut"])
def test_a_damaged_sweep_record_is_one_line(sweep: Path, trained: tuple[Path, Path], capsys, ran: list[str],
                                            content: str, words: str) -> None:
    (sweep / SWEEP).write_text(content)
    before = snapshot(sweep)
    line = one_error(capsys, run_cli(_sweep(trained, sweep, *ZERO_SHOT)))
    assert f"{sweep / SWEEP}: " in line and words in line, line
    assert snapshot(sweep) == before and ran == []


# --------------------------------------------------------------------------- rule 7: whole reports


def _markdown_tables(text: str) -> list[list[list[str]]]:
    tables, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def _row(task: str, mode: str, shots: int, seed: int, score: float) -> dict[str, Any]:
    return {"task": task, "mode": mode, "shots": shots, "seed": seed, "trainable": 1, "rougeL": score,
            "key": f"{task}/{mode}/k{shots}/s{seed}", "scores": {(task, "0"): score / 100}}


@pytest.mark.parametrize("grown", [
    [[_row(TASKS[0], "zero_shot", 0, 0, 10.0)], [_row(TASKS[1], "mhr_z", 2, 1, 20.0)]],
    [[_row(TASKS[0], "zero_shot", 0, 0, 10.0), _row(TASKS[0], "mhr_z", 2, 1, 30.0)],
     [_row(TASKS[1], "mhr_z", 4, 1, 20.0)], [_row(TASKS[1], "lora_scratch", 4, 1, 40.0)]],
    [[]],
], ids=["disjoint", "task-by-task", "empty"])
def test_the_summary_shows_every_cell_as_valid_markdown(grown: list[list[dict[str, Any]]]) -> None:
    """However the grid grew, run by run: a column per (mode, k), a row per task, every cell's mean in its
    place, and one markdown table whose every row has the header's columns."""
    rows = [row for run in grown for row in run]
    summary = summarise(rows)
    [table] = _markdown_tables(_markdown(summary))
    header, separator, *body = table
    assert len(separator) == len(header) and all(len(line) == len(header) for line in body), table
    assert all(set(cell) <= set("-:") and cell for cell in separator)
    for row in rows:
        label = row["mode"] if row["shots"] == 0 else f"{row['mode']} k={row['shots']}"
        [line] = [line for line in body if line[0] == row["task"]]
        assert line[header.index(label)] == f"{row['rougeL']:.2f} ± 0.00"
    assert len(summary_table(summary).columns) == len(header)
    assert len(header) == 1 + len({(row["mode"], row["shots"]) for row in rows})


def test_a_grid_grown_task_by_task_reports_every_cell(sweep: Path, trained: tuple[Path, Path]) -> None:
    assert run_cli(_sweep(trained, sweep, "--modes", "mhr_z", "--shots", "1", "--tasks", TASKS[1])) == 0
    table, pools = _markdown_tables((sweep / "adapt_summary.md").read_text())
    assert [line[0] for line in pools[2:]] == [TASKS[1]]  # the pool of the one task a cell trained on
    header, _, *body = table
    shown = {(line[0], header[i]) for line in body for i in range(1, len(header)) if line[i] != "-"}
    assert shown >= {(TASKS[0], "zero_shot"), (TASKS[1], "zero_shot"), (TASKS[1], "mhr_z k=1")}, table
    assert all(len(line) == len(header) for line in table)
    assert run_cli(_sweep(trained, sweep, "--modes", "mhr_z", "--shots", "1", "--tasks", TASKS[0])) == 0
    _, pools = _markdown_tables((sweep / "adapt_summary.md").read_text())
    assert {line[0] for line in pools[2:]} == {TASKS[0], TASKS[1]}  # every task a recorded cell trained on


def test_keep_adapters_on_finished_cells_says_they_kept_none(sweep: Path, trained: tuple[Path, Path], capsys,
                                                             ran: list[str]) -> None:
    assert run_cli(_sweep(trained, sweep, *ZERO_SHOT, "--keep-adapters")) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: --keep-adapters: 2 finished cell(s) ran without it, so their adapters were not kept" in out, out
    assert ran == [] and not (sweep / "cells").exists()


@pytest.mark.parametrize("content", ["[1, 2]", '{"t": 5}', '{"t": {"top_evaluation": 1}}', "{oops"])
def test_a_hand_edited_pool_measure_file_is_one_line(sweep: Path, trained: tuple[Path, Path], capsys,
                                                    content: str) -> None:
    (sweep / "pool_shift.json").write_text(content, encoding="utf-8")
    line = one_error(capsys, run_cli(_sweep(trained, sweep, *ZERO_SHOT)))  # nothing to train: the file stays
    assert f"{sweep / 'pool_shift.json'}: " in line and "remove it and run the sweep again" in line, line


CLASHES = [("--shots", "1", "adapt.shots=[2]"), ("--seeds", "5", "adapt={seeds: [6]}"),
           ("--modes", "mhr_z", "adapt.modes=[zero_shot]"), ("--tasks", TASKS[0], f"adapt.tasks=[{TASKS[1]}]"),
           ("--keep-adapters", None, "adapt.keep_adapters=false")]


@pytest.mark.parametrize(("option", "value", "override"), CLASHES, ids=[c[0] for c in CLASHES])
def test_an_option_and_an_override_of_one_field_are_refused(trained: tuple[Path, Path], tmp_path: Path, capsys,
                                                            ran: list[str], option: str, value: str | None,
                                                            override: str) -> None:
    """Which one should win is a guess, so neither does: one line names both, nothing runs or is written."""
    out = tmp_path / "out"
    given = (option,) if value is None else (option, value)
    line = one_error(capsys, run_cli(_sweep(trained, out, override, *given)))
    field = "adapt." + option.removeprefix("--").replace("-", "_")
    assert f"{trained[0]}: {field} (set on the command line): {option} and the override '{override}'" in line, line
    assert ran == [] and not out.exists()


def test_an_option_beside_an_override_of_another_field_is_kept(trained: tuple[Path, Path], tmp_path: Path) -> None:
    every = with_option_overrides(["adapt.shots=[1]", "adapt={seeds: [5]}"],
                                  {"--modes": adapt_list_override("modes", "zero_shot", str), "--tasks": None})
    adapt = load_recipe(trained[0], every).adapt
    assert (adapt.shots, adapt.seeds, adapt.modes) == ([1], [5], ["zero_shot"])
