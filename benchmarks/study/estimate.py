"""How long the study's unfinished pieces will take, printed as a plan before the first one starts.

Each estimate comes from what finished pieces took (their result files record ``wall_s``): the same kind of
piece at this scale first, else at the `cpu` scale. Training is priced per step of the same method, an
adaptation sweep per cell of each mode, an evaluation or routing report as a whole piece (the base model's
evaluations apart: it writes until its token limit, so it is slower). Those runs' machine and load come with
them, so the total is a plan, not a promise; a piece nothing comparable has finished shows "?".
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

RESULTS_FILE = "adapt_results.jsonl"


def read_object(path: Path) -> dict[str, Any]:
    """A JSON object file's fields, or none when it is missing or unreadable (an estimate never stops the study;
    a merged record is then rebuilt)."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def result_lines(path: Path) -> list[dict[str, Any]]:
    """The readable lines of an adaptation sweep's results (a line a kill cut short is skipped: the sweep redoes
    its cell)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("mode"), str):
            found.append(row)
    return found


def _seconds(record: dict[str, Any]) -> float | None:
    value = record.get("wall_s")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class Pace:
    """Seconds per unit of work measured under one scale's result directory."""

    def __init__(self, results: Path) -> None:
        self.train: dict[str, float] = {}  # method -> seconds per training step
        for path in results.glob("train/*.json"):
            run = read_object(path)
            seconds, steps = _seconds(run), run.get("step")
            if seconds is not None and isinstance(steps, int) and steps > 0:
                self.train[path.stem] = seconds / steps
        self.whole: dict[tuple[str, bool], list[float]] = defaultdict(list)  # (stage, base?) -> seconds
        for stage in ("zero-shot", "in-distribution", "routing"):
            for path in results.glob(f"{stage}/*.json"):
                if (seconds := _seconds(read_object(path))) is not None:
                    self.whole[(stage, path.stem == "base")].append(seconds)
        self.cell: dict[str, list[float]] = defaultdict(list)  # adaptation mode -> seconds per cell
        for path in results.glob(f"adapt/*/{RESULTS_FILE}"):
            for row in result_lines(path):
                if (seconds := _seconds(row)) is not None:
                    self.cell[row["mode"]].append(seconds)

    def step_seconds(self, method: str) -> float | None:
        return self.train.get(method)

    def piece_seconds(self, stage: str, base: bool) -> float | None:
        found = self.whole.get((stage, base))
        return statistics.median(found) if found else None

    def cell_seconds(self, mode: str) -> float | None:
        found = self.cell.get(mode)
        return statistics.fmean(found) if found else None


class Estimator:
    """Seconds for a piece from the first scale (this one, then `cpu`) that measured something comparable."""

    def __init__(self, results_dirs: list[Path]) -> None:
        self.paces = [Pace(d) for d in dict.fromkeys(results_dirs) if d.is_dir()]

    def _first(self, ask: Any) -> float | None:
        return next((value for pace in self.paces if (value := ask(pace)) is not None), None)

    def training(self, method: str, steps: int) -> float | None:
        rate = self._first(lambda p: p.step_seconds(method))
        if rate is None:  # a method no scale has trained yet: the median pace of the others here
            rate = self._first(lambda p: statistics.median(p.train.values()) if p.train else None)
        return None if rate is None else rate * steps

    def whole(self, stage: str, base: bool) -> float | None:
        return self._first(lambda p: p.piece_seconds(stage, base))

    def sweep(self, cells: dict[str, int]) -> float | None:
        """``cells``: mode -> number of cells."""
        total = 0.0
        for mode, n in cells.items():
            if n == 0:
                continue
            each = self._first(lambda p, mode=mode: p.cell_seconds(mode))
            if each is None and mode != "zero_shot":  # an unmeasured mode: the mean of the trained modes here
                each = self._first(lambda p: statistics.fmean(v for m, values in p.cell.items() if m != "zero_shot"
                                                              for v in values)
                                   if any(m != "zero_shot" for m in p.cell) else None)
            if each is None:
                return None
            total += each * n
        return total


@dataclass
class Piece:
    """One unit of the study (a training run, an evaluation, a routing report, a sweep) and what it still costs."""

    stage: str
    name: str
    result: Path  # exists once the piece is done
    command: list[str]  # the `orchmoe` arguments the piece runs (the report lists them)
    run: Callable[[], None]
    reads: str | None = None  # the trained checkpoint (method) the piece evaluates or adapts
    work: dict[str, int] = field(default_factory=dict)  # training: {"steps": n}; a sweep: mode -> cells

    def estimate(self, estimator: Estimator) -> float | None:
        if self.stage in ("train", "retrain"):
            return estimator.training(self.name, self.work["steps"])
        if self.stage == "adapt":  # the cells not yet in the sweep's results
            done = Counter(row["mode"] for row in result_lines(self.result.parent / RESULTS_FILE))
            return estimator.sweep({mode: max(0, n - done[mode]) for mode, n in self.work.items()})
        return estimator.whole(self.stage, self.name == "base")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def plan_table(pieces: list[tuple[str, str, float | None]]) -> Table:
    """(stage, piece, estimated seconds) rows and their total."""
    table = Table(title="study plan", caption="estimates: the pace of finished pieces (estimate.py)",
                  title_justify="left", caption_justify="left")
    for column in ("stage", "piece", "estimate"):
        table.add_column(column, justify="right" if column == "estimate" else "left")
    for stage, name, seconds in pieces:
        table.add_row(stage, name, duration(seconds))
    known = [seconds for _, _, seconds in pieces if seconds is not None]
    unknown = len(pieces) - len(known)
    table.add_row("", "[bold]total[/bold]", f"[bold]{duration(sum(known))}[/bold]"
                  + (f" + {unknown} unestimated" if unknown else ""))
    return table
