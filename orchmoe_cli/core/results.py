"""Result artifacts in the lm-evaluation-harness style: results JSON, per-sample JSONL, tables."""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import platform
import subprocess
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orchmoe_cli
from orchmoe_cli.data.sni_task import group_name
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.fsutil import json_text

_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "rouge-score")


def git_hash() -> str | None:
    """The commit of the orchmoe source tree, when it runs from a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(orchmoe_cli.__file__).parent,
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment_info() -> dict[str, Any]:
    """Versions, commit and date recorded next to every result."""
    versions = {"orchmoe": orchmoe_cli.__version__, "python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "versions": versions,
        "git_hash": git_hash(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def instance_key(row: Mapping[str, Any]) -> tuple[str, str]:
    """``(task, id)``: what identifies a per-instance row. Instance ids are unique only within a task (two tasks
    may both number theirs 0, 1, ...), so every join of per-instance rows or scores is keyed by the pair."""
    return row["task"], row["id"]


def task_rows(rows: Sequence[dict], metrics: dict[str, float]) -> list[dict[str, Any]]:
    """One summary row per task, in first-seen order, from the official grouped metrics."""
    seen: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[row["task"]] += 1
        seen.setdefault(row["task"], {"task": row["task"], "category": row["category"]})
    return [
        {**info, "n": counts[task], "exact_match": metrics[f"exact_match_for_{task}"],
         "rougeL": metrics[f"rougeL_for_{task}"]}
        for task, info in seen.items()
    ]


def category_rows(rows: Sequence[dict], metrics: dict[str, float]) -> list[dict[str, Any]]:
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[row["category"]] += 1
    return [
        {"category": cat, "n": n, "exact_match": metrics[f"exact_match_for_{group_name(cat)}"],
         "rougeL": metrics[f"rougeL_for_{group_name(cat)}"]}
        for cat, n in sorted(counts.items())
    ]


def markdown_row(cells: Iterable[Any]) -> str:
    """One Markdown table row; a ``|`` inside a cell (a task name may hold one) is escaped, not a column break."""
    text = (f"{c:.2f}" if isinstance(c, float) else str(c) for c in cells)
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in text) + " |"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric_from: int | None = None) -> str:
    """A Markdown table; columns from ``numeric_from`` on are right-aligned."""
    align = ["---:" if numeric_from is not None and i >= numeric_from else "---" for i in range(len(headers))]
    lines = [markdown_row(headers), "|" + "|".join(align) + "|", *(markdown_row(row) for row in rows)]
    return "\n".join(lines) + "\n"


def results_markdown(title: str, rows: Sequence[dict], metrics: dict[str, float]) -> str:
    tasks = task_rows(rows, metrics)
    cats = category_rows(rows, metrics)
    parts = [f"# {title}\n", f"Overall: ROUGE-L **{metrics['rougeL']:.2f}**, exact match **{metrics['exact_match']:.2f}** "
             f"over {len(rows)} instances (SNI official scorer).\n", "## Per task\n",
             markdown_table(["task", "category", "n", "exact_match", "rougeL"],
                            [[r["task"], r["category"], r["n"], r["exact_match"], r["rougeL"]] for r in tasks]),
             "\n## Per category\n",
             markdown_table(["category", "n", "exact_match", "rougeL"],
                            [[r["category"], r["n"], r["exact_match"], r["rougeL"]] for r in cats])]
    return "".join(parts)


def jsonl(rows: Iterable[dict], target: str | Path) -> str:
    """One JSON line per row, for the file ``target`` (named if a row holds a number JSON cannot)."""
    return "".join(json_text(row, target, ensure_ascii=False) + "\n" for row in rows)


def text_sha256(text: str) -> str:
    """The digest ``results.json`` records of its predictions file's text (``predictions_sha256``)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def predictions_digest(path: Path) -> str:
    """The sha256 of a predictions file's text, as ``results.json`` records it (``predictions_sha256``)."""
    return text_sha256(path.read_text(encoding="utf-8"))


def check_vouched(predictions: Path) -> None:
    """An evaluation's ``results.json`` records the sha256 of the predictions its scores came from: a
    ``predictions.jsonl`` beside it with another digest was changed afterwards (or belongs to another run), so its
    per-instance scores no longer match the scores reported, and reading them as that evaluation's would be wrong.
    A results.json that cannot say (damaged, or without the digest) is refused too, since it could not catch that.
    A predictions file with no results.json beside it stands on its own."""
    results = predictions.parent / "results.json"
    if predictions.name != "predictions.jsonl" or not results.is_file():
        return
    outside = "or pass a copy of the predictions file outside the evaluation directory to read it as it is"
    try:
        record = json.loads(results.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OrchmoeError(f"{results}: not readable JSON ({exc}), so {predictions.name} beside it cannot be checked "
                           f"against it; run orchmoe eval again, {outside}") from None
    recorded = record.get("predictions_sha256") if isinstance(record, dict) else None
    if not isinstance(recorded, str):
        raise OrchmoeError(f"{results}: records no predictions_sha256, so {predictions.name} beside it cannot be "
                           f"checked against it; run orchmoe eval again, {outside}")
    if predictions_digest(predictions) != recorded.lower():
        raise OrchmoeError(f"{predictions}: not the predictions {results} was computed from (its predictions_sha256 "
                           f"differs): the file was changed after the evaluation; run orchmoe eval again, {outside}")


SCORE_SLACK = 1e-3  # recorded scores are points rounded to 4 decimals; a larger gap means other rows


def recorded_score_gap(recorded: Mapping[str, Any], per_instance: Mapping[str, Sequence[float]]) -> str | None:
    """Why scores recorded in points (``{"rougeL": 24.61}``) are not the mean of the per-instance fractions they
    summarise (``{"rougeL": [0.2, ...]}``), or None when they agree. A results line or predictions file edited or
    swapped afterwards would otherwise leave the tables (recorded scores) and the intervals (per-instance rows)
    telling two stories without a word."""
    for metric, values in per_instance.items():
        value = recorded.get(metric)
        if not values:
            return f"{metric} {value} is recorded, but there are no per-instance scores"
        mean = 100 * sum(values) / len(values)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not abs(value - mean) <= SCORE_SLACK:
            return f"{metric} {value} is recorded, but its {len(values)} per-instance scores give {mean:.4f}"
    return None
