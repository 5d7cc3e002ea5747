"""`orchmoe compare`: find each run's per-instance scores, read them, compare them, write the chosen output."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from orchmoe_cli.analysis.bootstrap import RESAMPLES, SEED
from orchmoe_cli.analysis.comparison import as_dict, compare_runs, comparison_table, forest_plot, to_csv, to_markdown
from orchmoe_cli.core.records import read_jsonl
from orchmoe_cli.core.results import check_vouched
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.fsutil import distinct
from orchmoe_cli.paths import claim_file, inside, listing, not_found_hint, user_path

PREDICTIONS = "predictions.jsonl"  # what `orchmoe eval` writes into its evaluation directory
FORMATS = ("table", "json", "csv", "markdown")
SCORES = ("rougeL", "exact_match")
_HOW = "orchmoe eval writes one per evaluation directory"


def find_predictions(path: Path) -> Path:
    """The predictions file a RUN names: a JSONL file itself; else ``predictions.jsonl`` in the directory, in the
    one directory below it that has one (a run's output directory), or in the directory above (a file or folder
    inside an evaluation directory)."""
    if not path.exists():
        raise OrchmoeError(f"{path}: no such file or directory{not_found_hint(path)}")
    if path.is_file():
        if path.suffix == ".jsonl":
            return path
        if (path.parent / PREDICTIONS).is_file():
            return path.parent / PREDICTIONS
        raise OrchmoeError(f"{path}: not a predictions JSONL file, and no {PREDICTIONS} beside it ({_HOW})")
    if (path / PREDICTIONS).is_file():
        return path / PREDICTIONS
    try:
        below = sorted(d for d in path.iterdir() if (d / PREDICTIONS).is_file())
    except OSError as exc:
        raise OrchmoeError(f"{path}: cannot read the directory ({exc.strerror})") from None
    if len(below) > 1:
        raise OrchmoeError(f"{path}: holds {len(below)} evaluations ({', '.join(d.name for d in below)}); "
                           f"which one? pass its directory, e.g. {below[0]}")
    if below:
        return below[0] / PREDICTIONS
    if (path.parent / PREDICTIONS).is_file():
        return path.parent / PREDICTIONS
    near = _evaluations_near(path)
    hint = f"; near it: {listing(near)}: pass one of them" if near else ""
    raise OrchmoeError(f"{path}: no {PREDICTIONS} in it, in a directory below it or in the one above ({_HOW})"
                       f"{hint or '; pass an evaluation directory or a predictions JSONL file'}")


def _evaluations_near(folder: Path) -> list[Path]:
    """What ``folder`` may have meant: the JSONL files in it (``lora.predictions.jsonl`` ...), else the evaluation
    directories beside it or beside its parent (a checkpoint's evaluations sit in its run, next to ``checkpoints/``)."""
    files = sorted(p for p in folder.glob("*.jsonl") if p.is_file() and not p.name.startswith(".")
                   and p.name != "metrics.jsonl")  # a run's training log is no evaluation
    if files:
        return files
    for above in (folder.parent, folder.parent.parent):
        found = inside(above, lambda d: d.is_dir() and (d / PREDICTIONS).is_file())
        if found:  # a checkpoint's own evaluations first (eval-step-000002-*)
            return sorted(found, key=lambda d: folder.name not in d.name)
    return []


def label_path(given: Path, found: Path) -> Path:
    """What names a run: the directory the user gave when the file is inside it (a run's output directory
    names its evaluation), else the evaluation directory, or the JSONL file with its own name."""
    if given.is_dir() and given in found.parents:
        return given
    return found.parent if found.name == PREDICTIONS else found


def _stem(name: str) -> str:
    return name.removesuffix(".jsonl").removesuffix(".predictions")  # lora.predictions.jsonl -> lora


def distinct_labels(paths: list[Path]) -> list[str]:
    """Each path's name (a file without ``.predictions.jsonl``); names that clash are lengthened with their
    parent directories (``a/lora``, ``b/lora``) until they differ, two files of one folder keep their whole names,
    and the same file given twice gets ``#2`` (:func:`fsutil.distinct`): every run its own label."""
    resolved = [p.resolve() for p in paths]
    stems = [p.name if sum(_stem(q.name) == _stem(p.name) and q.parent == p.parent and q != p for q in resolved)
             else _stem(p.name) for p in resolved]
    parts = [[*p.parent.parts[1:], stem] for p, stem in zip(resolved, stems)]
    depth = [1] * len(paths)
    while True:
        labels = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clashing = [i for i, label in enumerate(labels) if depth[i] < len(parts[i]) and any(
            other == label and parts[j] != parts[i] for j, other in enumerate(labels))]
        if not clashing:
            return distinct(labels)
        for i in clashing:
            depth[i] += 1


def _problem(row: dict[str, Any]) -> str | None:
    """What keeps a predictions line from being compared, or None."""
    missing = [field for field in ("task", "id", *SCORES) if field not in row]
    if missing:
        return f"no '{missing[0]}' field (a predictions row has task, id, rougeL and exact_match; {_HOW})"
    for field in SCORES:
        value = row[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            return f"{field} is {value!r}, expected a per-instance score between 0 and 1"
    return None


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """Per-instance rows of a predictions JSONL file, read by the one validating record reader; a damaged line or
    an instance scored twice is an error naming the file and line, and a file its evaluation's results.json does
    not vouch for is refused (:func:`core.results.check_vouched`)."""
    check_vouched(path)
    rows: list[dict[str, Any]] = []
    first_line: dict[tuple[str, str], int] = {}
    lines = read_jsonl(path, _problem)
    for number, record in zip(lines.numbers, lines.records):
        row = {"task": str(record["task"]), "id": str(record["id"]), **{f: float(record[f]) for f in SCORES}}
        key = (row["task"], row["id"])
        if key in first_line:
            raise OrchmoeError(f"{path}: line {number}: task {key[0]}, id '{key[1]}' is already scored on line "
                               f"{first_line[key]}; each instance may appear once")
        first_line[key] = number
        rows.append(row)
    if not rows:
        raise OrchmoeError(f"{path}: holds no predictions")
    return rows


def _plot_target(plot: str) -> Path:
    target = claim_file(plot, "--plot", option=True)
    if target.suffix.lower() != ".png":
        raise OrchmoeError(f"--plot: {target} should end in .png (the plot is a PNG)")
    return target


def compare(runs: list[str], output_format: str, plot: str | None, samples: int | None, seed: int | None,
            console: Console, err_console: Console) -> None:
    """Read every run, compare them with the first, write the plot (when asked) and then the output on
    standard output. Every input is checked before anything is written."""
    if output_format not in FORMATS:
        raise OrchmoeError(f"--format: '{output_format}' is not one of {', '.join(FORMATS)}")
    plot_path = _plot_target(plot) if plot is not None else None
    given = [user_path(run, "RUN", option=True) for run in runs]
    found = [find_predictions(path) for path in given]
    labels = distinct_labels([label_path(g, f) for g, f in zip(given, found)])
    comparison = compare_runs({label: read_predictions(path) for label, path in zip(labels, found)},
                              resamples=RESAMPLES if samples is None else samples, seed=SEED if seed is None else seed)
    if plot_path is not None:
        forest_plot(comparison, plot_path)
        err_console.print(f"wrote {plot_path}", highlight=False)
    if output_format == "table":
        console.print(comparison_table(comparison))
    elif output_format == "json":
        result = {**as_dict(comparison), "sources": {label: str(path) for label, path in zip(labels, found)}}
        sys.stdout.write(json.dumps(result, indent=2, ensure_ascii=False, allow_nan=False) + "\n")  # never NaN
    else:
        sys.stdout.write(to_csv(comparison) if output_format == "csv" else to_markdown(comparison))

