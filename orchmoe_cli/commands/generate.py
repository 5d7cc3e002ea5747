"""`orchmoe generate`: a trained checkpoint (or the base model) answers prompts given on the command line, in a
JSONL / CSV / text file or on standard input, formatted the way its training data was."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from orchmoe_cli.errors import OrchmoeError, did_you_mean
from orchmoe_cli.fsutil import atomic_write_bytes, json_text
from orchmoe_cli.paths import not_found_hint, user_path
from orchmoe_cli.recipe import Recipe

INPUT_FIELDS = ("input", "prompt", "text")  # the first one a JSONL / CSV row has is its prompt


@dataclass
class Prompt:
    """One prompt to answer: its text, and optionally its own instruction and task."""

    id: str
    input: str
    instruction: str | None = None
    task: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _row_prompt(row: Any, origin: str, number: int, default_id: str) -> Prompt:
    """The prompt of row ``number`` (counted from 1, as messages name it) of ``origin``."""
    if not isinstance(row, dict):
        raise OrchmoeError(f"{origin}: row {number} is not an object with an 'input' field")
    known = {*INPUT_FIELDS, "instruction", "task", "id"}
    near = next((k for k in row if k not in known and str(k).strip().lower() in known), None)
    if near is not None:  # 'Instruction' would pass through as an extra field, and the prompt would go without it
        raise OrchmoeError(f"{origin}: row {number}: field '{near}': did you mean '{str(near).strip().lower()}'? "
                           "(field names are lower-case)")
    key = next((k for k in INPUT_FIELDS if k in row), None)
    if key is None or not isinstance(row[key], str) or not row[key].strip():
        raise OrchmoeError(f"{origin}: row {number} has no non-empty text field "
                           f"({' / '.join(INPUT_FIELDS)}); found {', '.join(map(str, row)) or 'no fields'}")
    for optional in ("instruction", "task"):
        if row.get(optional) is not None and not isinstance(row[optional], str):
            kind = type(row[optional]).__name__
            raise OrchmoeError(f"{origin}: row {number}: '{optional}' must be text, got {kind}")
    extra = {k: v for k, v in row.items() if k not in (key, "instruction", "task")}
    return Prompt(str(row.get("id", default_id)), row[key], row.get("instruction") or None, row.get("task") or None,
                  extra)


def read_prompts(texts: list[str], input_file: str | None) -> list[Prompt]:
    """Prompts from the command line, then from ``input_file`` (``-``: standard input): by its suffix JSONL (or a
    JSON list), CSV / TSV rows with an ``input`` column (optional ``instruction``, ``task``, ``id``), or ``.txt``
    text with one prompt per non-empty line whatever it starts with; standard input and other files are JSON when
    they start as JSON does, else text. A byte-order mark (Excel's "CSV UTF-8") is not part of the text."""
    blank = next((i for i, text in enumerate(texts) if not text.strip()), None)
    if blank is not None:
        raise OrchmoeError(f"prompt {blank + 1} on the command line is empty; give the text to answer")
    prompts = [Prompt(str(i), text) for i, text in enumerate(texts)]
    if input_file is None:
        if not prompts:
            raise OrchmoeError("no prompt: give one on the command line or --input FILE (- for standard input)")
        return prompts
    origin = "standard input" if input_file == "-" else input_file
    if input_file == "-":
        content = sys.stdin.read().removeprefix("\ufeff")
    else:
        path = user_path(input_file, "--input", option=True)
        if not path.is_file():
            what = "is not a file" if path.exists() else "not found"
            raise OrchmoeError(f"--input: {path} {what}{not_found_hint(path, Path.is_file)}")
        try:
            content = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise OrchmoeError(f"{path}: not UTF-8 text") from None
    if not content.strip():
        raise OrchmoeError(f"{origin}: empty; give one prompt per line, or JSONL / CSV rows with an 'input' field")
    suffix = "" if input_file == "-" else Path(input_file).suffix.lower()
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(content), delimiter="\t" if suffix == ".tsv" else ",")
        rows: list[Any] = list(reader)
    elif suffix in (".jsonl", ".json") or (suffix != ".txt" and content.lstrip().startswith(("{", "["))):
        rows = _json_rows(content, origin)
    else:
        rows = [{"input": line} for line in content.splitlines() if line.strip()]
    start = len(prompts)
    prompts += [_row_prompt(row, origin, i + 1, str(start + i)) for i, row in enumerate(rows)]
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise OrchmoeError(f"{origin}: id '{duplicate}' appears twice; every prompt needs its own id")
    return prompts


def _json_rows(content: str, origin: str) -> list[Any]:
    stripped = content.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(content)
        except json.JSONDecodeError as exc:
            raise OrchmoeError(f"{origin}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        return rows
    rows = []
    for number, line in enumerate(content.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise OrchmoeError(f"{origin}: line {number} is not JSON ({exc.msg})") from None
    return rows


def check_raw(prompts: list[Prompt], instruction: str | None, source: str | None) -> None:
    """``--raw`` sends each text as it is: an instruction (``--instruction``, or a row's own from ``source``) would
    be dropped without a word, so it is refused."""
    given = "--instruction" if instruction else next(
        (f"{source}: row '{p.id}' has an instruction field" for p in prompts if p.instruction), None)
    if given is not None:
        raise OrchmoeError(f"--raw: {given}, but --raw sends each text as it is, without the prompt format that "
                           "places an instruction; put it into the text, or leave out --raw")


def generate(checkpoint: str, prompts: list[Prompt], recipe: Recipe, target: Path | None, task: str | None,
             instruction: str | None, raw: bool, route_only: bool, console: Console) -> list[dict[str, Any]]:
    """One output row per prompt, in input order: the prompt as the model saw it, the prediction (unless
    ``route_only``) and how it was routed."""
    from orchmoe_cli.adapters import load_adapted
    from orchmoe_cli.core.base_models import load_model, on_device
    from orchmoe_cli.core.generation import describe_routing
    from orchmoe_cli.data.collate import pad_token_id
    from orchmoe_cli.data.dataset_cache import encode_prompt_ids
    from orchmoe_cli.data.sni_task import Instance, SNITask

    loaded = load_model(recipe.model)
    model: Any = loaded.model
    if target is not None:
        model = load_adapted(model, target)
    task_index = getattr(model, "task_index", None)
    for name in {t for t in [task, *(p.task for p in prompts)] if t}:
        if task_index is None:
            what = model.method.name if target is not None else "the base model"
            raise OrchmoeError(f"--task: {checkpoint} ({what}) does not route by task; give prompts without one")
        if name not in task_index:
            raise OrchmoeError(f"--task / task: '{name}' is not one of the checkpoint's {len(task_index)} tasks"
                               f"{did_you_mean(name, task_index)}")
    if route_only and not hasattr(model, "describe_routing"):
        raise OrchmoeError("--route-only: the base model has no routing")
    import torch

    model = on_device(model, "cuda" if torch.cuda.is_available() else "cpu").eval()
    cfg = dataclasses.replace(recipe.data, template="{input}", chat_template=False) if raw else recipe.data
    groups: dict[tuple[str | None, str | None], list[Prompt]] = {}
    for prompt in prompts:
        groups.setdefault((prompt.task or task, prompt.instruction or instruction), []).append(prompt)
    rows, shown, cut = [], {}, 0
    for (row_task, row_instruction), members in groups.items():
        sni_task = SNITask(row_task or "prompt", Path("."), [""], [row_instruction] if row_instruction else [], [], [],
                           [Instance(p.id, p.input, []) for p in members], {}, len(members))
        _, ids, n_cut = encode_prompt_ids(sni_task, cfg, loaded.tokenizer, recipe.model.name,
                                          loaded.is_encoder_decoder)
        cut += n_cut
        for prompt, prompt_ids in zip(members, ids):
            rows.append({"task": row_task or "", "id": prompt.id, "prompt_ids": prompt_ids})
            # what the model reads: its special tokens in, a trailing space out, a long prompt's start cut
            shown[prompt.id] = loaded.tokenizer.decode(prompt_ids)
    if cut:
        console.print(f"[yellow]warning:[/yellow] {cut} prompt(s) longer than data.max_source_length "
                      f"({cfg.max_source_length} tokens) lost their start, as prepare cuts them", highlight=False)
    pad = pad_token_id(loaded.tokenizer)
    routing = describe_routing(model, rows, recipe.eval.batch_size, pad, loaded.is_encoder_decoder, task_index)
    predictions: dict[str, str] = {}
    if not route_only:
        predictions = _generate_with_progress(model, loaded, rows, recipe, task_index, console)
    out, replaced = [], set()
    for prompt in prompts:
        row: dict[str, Any] = {"id": prompt.id, "input": prompt.input, "prompt": shown[prompt.id]}
        if not route_only:
            row["prediction"] = predictions[prompt.id]
        row.update(routing.get(prompt.id, {}))
        if "id" in prompt.extra:
            row["id"] = prompt.extra["id"]  # as the input wrote it (5 stays a number, for joins on it)
        replaced |= {key for key in prompt.extra if key in row and key != "id"}
        out.append({**row, **{key: value for key, value in prompt.extra.items() if key not in row}})
    if replaced:  # what this run computed wins over an input field of the same name (an earlier run's output)
        console.print(f"[yellow]warning:[/yellow] input field(s) {', '.join(sorted(replaced))} are written by "
                      "generate: the output has this run's values", highlight=False, soft_wrap=True)
    return out


def _generate_with_progress(model: Any, loaded: Any, rows: list[dict], recipe: Recipe, task_index: Any,
                            console: Console) -> dict[str, str]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from orchmoe_cli.core.generation import generate_predictions

    predictions: dict[str, str] = {}
    with Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=len(rows) < 2) as progress:
        bar = progress.add_task("generate", total=len(rows))

        def on_batch(batch_rows: list[dict], texts: list[str]) -> None:
            predictions.update((row["id"], text) for row, text in zip(batch_rows, texts))
            progress.advance(bar, len(batch_rows))

        generate_predictions(model, loaded.tokenizer, loaded.is_encoder_decoder, rows, recipe.eval, task_index,
                             on_batch)
    return predictions


def write_rows(rows: list[dict[str, Any]], output: str | None) -> None:
    """JSONL to ``output`` (written whole or not at all) or to standard output."""
    target = "standard output" if output is None or output == "-" else output
    text = "".join(json_text(row, target, ensure_ascii=False) + "\n" for row in rows)
    if output is None or output == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    atomic_write_bytes(Path(output), text.encode("utf-8"))
