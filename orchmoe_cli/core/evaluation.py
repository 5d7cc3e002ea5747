"""`orchmoe eval`: greedy (or beam) generation on held-out tasks, scored with the official SNI metric.

Instances are generated in batches grouped by task (rows of one task share a routing, and
prompts of similar length pad less). Predictions are appended to a partial file as they are
made, so an interrupted evaluation resumes where it stopped; the final artifacts
(``results.json``, ``predictions.jsonl``, ``results.md``, ``recipe.yaml``) are each replaced atomically,
``results.json`` last, and other files in the directory are left alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import PartialState
from accelerate.utils import gather_object
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from orchmoe_cli.core import results as report
from orchmoe_cli.core.checkpoint import checkpoint_digest
from orchmoe_cli.core.generation import NewlineTable, generate_predictions
from orchmoe_cli.core.metrics import aggregate, score_instance
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.fsutil import disk_error, json_text, replace_files
from orchmoe_cli.recipe import EvalConfig, Recipe, dump_recipe, recipe_to_dict

PARTIAL_NAME = ".predictions.partial.jsonl"
_PROVENANCE = ("versions", "git_hash", "date")  # of report.environment_info()


def partial_name(rank: int, world: int) -> str:
    """Each process of a data-parallel evaluation appends to its own partial file."""
    return PARTIAL_NAME if world == 1 else f".predictions.partial.rank{rank}.jsonl"


@dataclass
class EvalOutcome:
    label: str
    metrics: dict[str, float]
    rows: list[dict[str, Any]]
    output_dir: Path


def eval_label(cfg: EvalConfig) -> str:
    """The short name tables show: ``base`` or the checkpoint directory's name."""
    return "base" if cfg.checkpoint is None else Path(cfg.checkpoint).name


def eval_output_dir(recipe: Recipe) -> Path:
    """``eval-base``, or ``eval-<checkpoint name>-<8 hex digits of its absolute path>``: unique per checkpoint,
    so two checkpoints with the same name (``step-000100`` of two runs) never share results."""
    label = eval_label(recipe.eval)
    if recipe.eval.checkpoint is not None:
        where = str(Path(recipe.eval.checkpoint).expanduser().resolve())
        label = f"{label}-{hashlib.sha256(where.encode()).hexdigest()[:8]}"
    return recipe.eval_parent_dir / f"eval-{label}"


def select_instances(split: Any, cfg: EvalConfig) -> list[dict[str, Any]]:
    """The first ``max_instances`` rows of every selected task, in task order."""
    tasks_in_split = list(dict.fromkeys(split["task"]))
    wanted = cfg.tasks if cfg.tasks is not None else tasks_in_split
    if not wanted:
        raise OrchmoeError("the list is empty; name tasks of the split or leave it out", field="eval.tasks")
    repeated = sorted({t for t in wanted if wanted.count(t) > 1})
    if repeated:
        raise OrchmoeError(f"{', '.join(repeated)} listed more than once", field="eval.tasks")
    missing = [t for t in wanted if t not in tasks_in_split]
    if missing:
        raise OrchmoeError(
            f"{', '.join(missing)} not in the prepared '{cfg.split}' split "
            f"(it has {len(tasks_in_split)} tasks, e.g. {', '.join(tasks_in_split[:3])})", field="eval.tasks"
        )
    counts = dict.fromkeys(wanted, 0)
    chosen: dict[str, list[dict[str, Any]]] = {t: [] for t in wanted}
    seen: set[tuple[str, str]] = set()
    columns = ["task", "category", "id", "prompt", "prompt_ids", "references"]
    for row in split.select_columns(columns):
        task = row["task"]
        if task in counts and counts[task] < cfg.max_instances:
            if report.instance_key(row) in seen:  # results are joined by (task, id): a repeat would count twice
                raise OrchmoeError(f"task {task}: instance id '{row['id']}' is in the prepared '{cfg.split}' split "
                                   "twice; prepare the data again (instance ids must be unique within a task)")
            seen.add(report.instance_key(row))
            counts[task] += 1
            chosen[task].append(row)
    return [row for task in wanted for row in chosen[task]]


def _fingerprint(recipe: Recipe, data_hash: str, adapter_sha256: str | None) -> str:
    """Identifies an evaluation run, so a partial predictions file is only resumed by the same run."""
    relevant = {"model": recipe_to_dict(recipe)["model"], "eval": recipe_to_dict(recipe)["eval"], "data": data_hash}
    if adapter_sha256:
        relevant["adapter_sha256"] = adapter_sha256
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, allow_nan=False).encode()).hexdigest()


def _load_partial(out_dir: Path, fingerprint: str) -> dict[tuple[str, str], dict]:
    """Rows already predicted by an interrupted run of the same evaluation (any number of processes), keyed by
    (task, id): ids repeat across tasks."""
    done: dict[tuple[str, str], dict] = {}
    for path in sorted(out_dir.glob(".predictions.partial*.jsonl")):
        with path.open(encoding="utf-8") as handle:
            try:
                if json.loads(handle.readline()).get("fingerprint") != fingerprint:
                    continue
            except (json.JSONDecodeError, AttributeError):
                continue
            for line in handle:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by the interruption: redo it
                done[report.instance_key(row)] = row
    return done


@dataclass
class _Finished:
    """A completed evaluation on disk: its predictions, verified against the sha256 its results.json holds."""

    rows: list[dict]
    predictions: str
    provenance: dict[str, Any]  # versions, commit and date of the run that generated the predictions


def _load_finished(out_dir: Path, fingerprint: str) -> _Finished | None:
    """The completed evaluation with the same fingerprint, if one is on disk."""
    try:
        results = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
        predictions = (out_dir / "predictions.jsonl").read_text(encoding="utf-8")
        digest = report.text_sha256(predictions)
        if results.get("fingerprint") != fingerprint or results.get("predictions_sha256") != digest:
            return None  # another evaluation, or files from two different runs
        rows = [json.loads(line) for line in predictions.splitlines() if line.strip()]
    except (OSError, ValueError, AttributeError):
        return None
    return _Finished(rows, predictions, {key: results[key] for key in _PROVENANCE if key in results})


def _scored_row(row: dict, prediction: str) -> dict[str, Any]:
    return {
        "task": row["task"], "category": row["category"], "id": row["id"],
        "prompt_sha256": hashlib.sha256(row["prompt"].encode("utf-8")).hexdigest()[:16],
        "prediction": prediction, "references": list(row["references"]),
        **score_instance(prediction, row["references"]),
    }


def score_rows(model: Any, tokenizer: Any, is_encoder_decoder: bool, rows: Sequence[dict], cfg: EvalConfig,
               task_index: Mapping[str, int] | None, newlines: NewlineTable | None = None) -> list[dict[str, Any]]:
    """Generate for ``rows`` and score each with the SNI metric, in memory (nothing is written), in the order of
    ``rows``: a few-shot cell's validation and evaluation."""
    scored: dict[tuple[str, str], dict[str, Any]] = {}

    def on_batch(batch_rows: list[dict], predictions: list[str]) -> None:
        for row, prediction in zip(batch_rows, predictions, strict=True):
            scored[report.instance_key(row)] = _scored_row(row, prediction)

    generate_predictions(model, tokenizer, is_encoder_decoder, rows, cfg, task_index, on_batch, newlines=newlines)
    return [scored[report.instance_key(row)] for row in rows]


def run_evaluation(
    recipe: Recipe, model: Any, tokenizer: Any, is_encoder_decoder: bool, split: Any, data_hash: str,
    console: Console, task_index: Mapping[str, int] | None = None,
) -> EvalOutcome:
    """Generate, score and write the artifacts for one model (base or adapted; ``task_index`` as in
    :func:`generate_predictions`). A finished identical evaluation is reused: its verified predictions are kept
    and every file derived from them is written again, so an edited or deleted one is restored and the numbers
    returned are the numbers on disk."""
    cfg = recipe.eval
    rows = select_instances(split, cfg)
    out_dir = eval_output_dir(recipe)
    adapter_sha256 = checkpoint_digest(cfg.checkpoint) if cfg.checkpoint else None
    fingerprint = _fingerprint(recipe, data_hash, adapter_sha256)
    state = PartialState()
    finished = _load_finished(out_dir, fingerprint)
    if finished is not None:
        console.print(f"reusing the identical evaluation in {out_dir}")
        final_rows = finished.rows
    else:
        final_rows = _generate(recipe, model, tokenizer, is_encoder_decoder, rows, out_dir, fingerprint, console,
                               task_index, state)
    metrics = aggregate(final_rows)
    title = f"{recipe.model.name} · {eval_label(cfg)} · {cfg.split} split"
    results = {
        "results": metrics,
        "tasks": report.task_rows(final_rows, metrics),
        "categories": report.category_rows(final_rows, metrics),
        "n_instances": len(final_rows),
        "model": recipe.model.name,
        "checkpoint": str(Path(cfg.checkpoint).resolve()) if cfg.checkpoint else None,
        "checkpoint_sha256": adapter_sha256,
        "split": cfg.split,
        "data_hash": data_hash,
        "fingerprint": fingerprint,
        "scorer": "SNI official: rouge_score RougeScorer(['rougeL'], use_stemmer=True), SQuAD EM without article removal",
        "config": recipe_to_dict(recipe),
        **report.environment_info(),
        **(finished.provenance if finished is not None else {}),
    }
    if state.is_main_process:  # written aside, then renamed into place one by one, results.json last
        path = out_dir / "predictions.jsonl"
        predictions = finished.predictions if finished is not None else report.jsonl(final_rows, path)
        results["predictions_sha256"] = report.text_sha256(predictions)  # a mixed set never passes as finished
        replace_files(out_dir, {
            "predictions.jsonl": predictions,
            "results.md": report.results_markdown(title, final_rows, metrics),
            "recipe.yaml": dump_recipe(recipe),
            "results.json": json_text(results, out_dir / "results.json", indent=2, ensure_ascii=False) + "\n",
        })
    state.wait_for_everyone()
    if finished is None:  # a reused evaluation leaves another one's interrupted predictions alone
        (out_dir / partial_name(state.process_index, state.num_processes)).unlink(missing_ok=True)
    return EvalOutcome(eval_label(cfg), metrics, final_rows, out_dir)


def _generate(recipe: Recipe, model: Any, tokenizer: Any, is_encoder_decoder: bool, rows: list[dict],
              out_dir: Path, fingerprint: str, console: Console, task_index: Mapping[str, int] | None,
              state: PartialState) -> list[dict[str, Any]]:
    """Every row's scored prediction, in the order of ``rows``: those an interrupted run of the same evaluation
    left in the partial files are kept, the rest generated (each process its shard) and appended as they come."""
    cfg = recipe.eval
    out_dir.mkdir(parents=True, exist_ok=True)
    done = _load_partial(out_dir, fingerprint)
    state.wait_for_everyone()  # every process has read the partial files before any rewrites its own
    partial_path = out_dir / partial_name(state.process_index, state.num_processes)
    todo = [r for r in rows if report.instance_key(r) not in done]
    if done:
        console.print(f"resuming: {len(done)} predictions already in {out_dir}, {len(todo)} to go")
    # rewrite the partial file from what survived, then append as we go (a full disk: one clear line)
    try:
        with partial_path.open("w", encoding="utf-8") as handle:
            handle.write(json.dumps({"fingerprint": fingerprint}, allow_nan=False) + "\n")
            handle.write(report.jsonl((done[k] for k in map(report.instance_key, rows) if k in done), partial_path))
            handle.flush()
            progress = Progress(
                TextColumn("[bold]eval[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True,
            )
            with progress:
                bar = progress.add_task(eval_label(cfg), total=len(todo))

                def on_batch(batch_rows: list[dict], predictions: list[str]) -> None:
                    scored = [_scored_row(r, p) for r, p in zip(batch_rows, predictions)]
                    for row in scored:
                        done[report.instance_key(row)] = row
                    handle.write(report.jsonl(scored, partial_path))
                    handle.flush()
                    progress.update(bar, advance=len(batch_rows), description=f"{eval_label(cfg)} {batch_rows[0]['task']}")

                generate_predictions(model, tokenizer, is_encoder_decoder, todo, cfg, task_index, on_batch,
                                     shard=(state.process_index, state.num_processes))

    except OSError as exc:
        raise disk_error(partial_path, exc) from None

    if state.num_processes > 1:
        for part in gather_object([done]):
            done.update(part)
    return [done[report.instance_key(r)] for r in rows]
