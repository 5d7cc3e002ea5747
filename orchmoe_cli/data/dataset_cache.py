"""Encode an SNI source once and cache it on disk, keyed by a content hash.

``prepare`` writes a ``datasets.DatasetDict`` (``train`` and ``test``) plus ``manifest.json`` to
``<cache_dir>/<hash>/``. The hash covers every input that changes the result (encoding settings, tokenizer
id, model kind, the bytes of the split files and of every listed task file), so an edited file or setting
gives a fresh directory and an unchanged one is reused. The directory is built under a temporary name and
renamed into place, so an interrupted run never leaves a half-written dataset that a later run would trust.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from orchmoe_cli import __version__
from orchmoe_cli.data.data_config import DataConfig
from orchmoe_cli.data.encoding import EncodedPrompts, encode_prompts
from orchmoe_cli.data.sni import SPLITS, matches_languages
from orchmoe_cli.data.sni_task import SNITask, label_clash
from orchmoe_cli.data.sources import TaskSource, resolve
from orchmoe_cli.data.table_files import quiet_datasets
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.fsutil import atomic_directory, disk_error, json_text

FORMAT_VERSION = 4  # 2: answers carry the space after "Output:"; 3: encoder-decoder prompts cut left; 4: pool
POOL = "pool"  # held-out tasks' instances after the evaluation ones: few-shot adaptation data
MANIFEST = "manifest.json"
log = logging.getLogger(__name__)

# DataConfig fields that say where the data is; everything else changes the prepared rows.
_LOCATION_FIELDS = frozenset({"source", "split_dir", "train_split", "test_split", "cache_dir"})
# what only a table reads (its source hashes them): SNI data keeps the hash it had before tables existed
_ADDED_LATER = {"template": None, "chat_template": False}
_TABLE_FIELDS = frozenset({"format", "columns", "train_value", "test_value", "heldout_tasks", "hub_config",
                           "hub_split", "revision"})
FEATURES = datasets.Features({
    "task": datasets.Value("string"),
    "task_index": datasets.Value("int32"),
    "category": datasets.Value("string"),
    "id": datasets.Value("string"),
    "prompt": datasets.Value("string"),
    "prompt_ids": datasets.Sequence(datasets.Value("int32")),
    "references": datasets.Sequence(datasets.Value("string")),
    "reference_ids": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
})


@dataclass
class Prepared:
    """A prepared dataset on disk: its directory, the (memory-mapped) splits and the manifest."""

    path: Path
    dataset: datasets.DatasetDict
    manifest: dict[str, Any]
    from_cache: bool


def encoding_settings(cfg: DataConfig) -> dict[str, Any]:
    """The DataConfig fields that affect the prepared rows (all but the location fields)."""
    settings = {name: value for name, value in dataclasses.asdict(cfg).items()
                if name not in _LOCATION_FIELDS | _TABLE_FIELDS}
    for name, default in _ADDED_LATER.items():  # at their defaults, data hashes as before these fields existed
        if settings[name] == default:
            del settings[name]
    return settings


def content_hash(cfg: DataConfig, layout: TaskSource, tokenizer_id: str, is_encoder_decoder: bool) -> str:
    """sha256 over the settings, tokenizer id, model kind and the source's own bytes (its files, or a hub
    dataset's fingerprint)."""
    digest = hashlib.sha256()
    header = {"format": FORMAT_VERSION, "orchmoe": __version__, "settings": encoding_settings(cfg),
              "tokenizer": tokenizer_id, "is_encoder_decoder": is_encoder_decoder}
    digest.update(json.dumps(header, sort_keys=True, allow_nan=False).encode())
    layout.hash_into(digest)
    return digest.hexdigest()


class _Tokenize:
    """Prompt and reference ids for one model kind.

    Encoder-decoder (as Tk-Instruct): the tokenizer's default special tokens (T5 appends EOS), cut on the
    right. Decoder-only: only the special tokens the tokenizer puts before text by default (a BOS, if any),
    prompt cut on the left so ``Output:`` survives; references without special tokens, EOS appended. The
    prompt's trailing space moves to the start of the answer (``Output:`` + `` Kabul``): the text is the
    same, but a subword model never has to continue from a lone trailing-space token, which it rarely saw
    in pre-training (SmolLM2 answers a newline after ``Output: `` and the answer after ``Output:``).
    """

    def __init__(self, tokenizer: Any, tokenizer_id: str, is_encoder_decoder: bool, cfg: DataConfig) -> None:
        self.tokenizer, self.tokenizer_id, self.cfg = tokenizer, tokenizer_id, cfg
        self.is_encoder_decoder = is_encoder_decoder
        self.prefix: list[int] = []
        if is_encoder_decoder and cfg.chat_template:
            raise OrchmoeError("a chat template wraps a decoder-only model's prompt; this model is encoder-decoder",
                               field="data.chat_template")
        if not is_encoder_decoder:
            if tokenizer.eos_token_id is None:
                raise OrchmoeError(f"tokenizer {tokenizer_id}: has no EOS token; a decoder-only model needs one "
                                   "to learn where an answer ends, choose a tokenizer that defines eos_token")
            self.prefix = _default_prefix(tokenizer)
            self.suffix: list[int] = []
            if cfg.chat_template:
                self.prefix, self.suffix = _chat_turn(tokenizer, tokenizer_id)
            if len(self.prefix) + len(self.suffix) >= cfg.max_source_length:
                raise OrchmoeError(f"{cfg.max_source_length} leaves no room for the prompt "
                                   f"after the tokenizer's {len(self.prefix)} leading special tokens; raise it",
                                   field="data.max_source_length")

    def prompts(self, encoded: EncodedPrompts) -> tuple[list[list[int]], int]:
        """Ids of each prompt and how many were cut here (decoder-only: from the left)."""
        limit = self.cfg.max_source_length
        if self.is_encoder_decoder:  # reuse the ids the length checks computed; they are within the limit
            known = list(encoded.source_ids)
            todo = [i for i, ids in enumerate(known) if ids is None]
            if todo:
                fresh = self.tokenizer([encoded.prompts[i] for i in todo], truncation=True, max_length=limit)
                for i, ids in zip(todo, fresh["input_ids"]):
                    known[i] = ids
            return [list(ids) for ids in known if ids is not None], 0
        budget = limit - len(self.prefix) - len(self.suffix)
        ids = self.tokenizer([p.rstrip(" ") for p in encoded.prompts], add_special_tokens=False)["input_ids"]
        return [self.prefix + list(x[-budget:]) + self.suffix for x in ids], sum(len(x) > budget for x in ids)

    def references(self, references: list[str]) -> list[list[int]]:
        limit = self.cfg.max_target_length
        if self.is_encoder_decoder:
            return self.tokenizer(text_target=references, truncation=True, max_length=limit)["input_ids"]
        space = "" if self.cfg.chat_template else " "  # an assistant turn starts the answer itself
        ids = self.tokenizer([space + r for r in references], add_special_tokens=False)["input_ids"]
        return [list(x[: limit - 1]) + [self.tokenizer.eos_token_id] for x in ids]


def _chat_turn(tokenizer: Any, tokenizer_id: str) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's chat template puts before and after a user message, up to the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise OrchmoeError(f"tokenizer {tokenizer_id} has no chat template; leave data.chat_template off",
                           field="data.chat_template")
    marker = "\u2063"  # a character no template adds, to cut the rendered turn around the message
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=True)
    head, _, tail = rendered.partition(marker)
    return (tokenizer(head, add_special_tokens=False)["input_ids"],
            tokenizer(tail, add_special_tokens=False)["input_ids"])


def _default_prefix(tokenizer: Any) -> list[int]:
    """The special ids the tokenizer puts before text by default (e.g. Llama's BOS; none for GPT-2)."""
    plain = tokenizer("Output", add_special_tokens=False)["input_ids"]
    full = tokenizer("Output")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start: start + len(plain)] == plain:
            return list(full[:start])
    return []


def prepare(cfg: DataConfig, tokenizer: Any, tokenizer_id: str, is_encoder_decoder: bool,
            console: Console | None = None) -> Prepared:
    """Encode ``cfg``'s source with ``tokenizer`` into the cache, or reuse an identical earlier result."""
    console = console or Console(stderr=True)
    layout = resolve(cfg)
    digest = content_hash(cfg, layout, tokenizer_id, is_encoder_decoder)
    root = Path(cfg.cache_dir).expanduser()
    final = root / digest
    cached = _try_load(final)
    if cached is not None:
        console.print(f"using cached prepared data {final}", markup=False)
        return cached
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OrchmoeError(f"cannot create '{root}' ({exc.strerror}); choose a writable "
                           "directory", field="data.cache_dir") from None
    tokenize = _Tokenize(tokenizer, tokenizer_id, is_encoder_decoder, cfg)
    dataset, manifest = _build(cfg, layout, tokenize, digest, console)
    # saved aside with the umask's permissions, then renamed into place whole; it replaces a broken leftover, and
    # the same data a concurrent run finished first
    with atomic_directory(final) as staging, quiet_datasets():
        try:
            dataset.save_to_disk(str(staging))
            (staging / MANIFEST).write_text(json_text(manifest, final / MANIFEST, indent=2, ensure_ascii=False)
                                            + "\n", encoding="utf-8")
        except OSError as exc:  # a full disk names the cache directory the user chose
            raise disk_error(root, exc) from None
    for note in layout.notes():
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    totals = manifest["totals"]
    console.print(f"prepared {totals['train_tasks']} train tasks ({totals['train_instances']} instances) and "
                  f"{totals['test_tasks']} test tasks ({totals['test_instances']} instances) in {final}", markup=False)
    no_pool = [t["name"] for t in manifest["tasks"] if t["split"] == "test" and not t.get("n_pool")]
    if no_pool and cfg.max_pool_instances:
        console.print(f"{len(no_pool)} held-out task(s) have no instances beyond the evaluation ones, so no "
                      f"adaptation pool: {', '.join(no_pool[:5])}{' ...' if len(no_pool) > 5 else ''}",
                      highlight=False, markup=False)
    limit = cfg.max_test_instances
    short = [t["name"] for t in manifest["tasks"] if t["split"] == "test" and t["n_instances"] < limit]
    if short:
        console.print(f"{len(short)} held-out task(s) have fewer than data.max_test_instances ({limit}) instances "
                      f"and are evaluated on all they have: {', '.join(short[:5])}"
                      f"{' ...' if len(short) > 5 else ''}", highlight=False, markup=False)
    cut = totals.get("truncated_prompts", 0)
    if cut:
        log.warning("%d prompt(s) longer than data.max_source_length (%d tokens) lost their start (the definition, "
                    "or the input where there is none) after dropping demonstrations; raise data.max_source_length "
                    "to keep them whole",
                    cut, cfg.max_source_length)
    return dataclasses.replace(load_prepared(final), from_cache=False)


def load_prepared(path: str | Path) -> Prepared:
    """Read a prepared directory written by ``prepare``."""
    path = Path(path)
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        dataset = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as exc:
        raise OrchmoeError(f"{path}: not a readable prepared dataset ({type(exc).__name__}); prepare the data "
                           "again or delete the directory") from None
    if not isinstance(dataset, datasets.DatasetDict) or not set(SPLITS) <= set(dataset) <= {*SPLITS, POOL}:
        raise OrchmoeError(f"{path}: prepared dataset lacks the train/test splits; prepare the data again")
    if POOL not in dataset:  # no held-out task had instances beyond its evaluation ones (not saved: 0 rows)
        dataset[POOL] = dataset["test"].select([])
    return Prepared(path=path, dataset=dataset, manifest=manifest, from_cache=True)


def _try_load(path: Path) -> Prepared | None:
    if not (path / MANIFEST).is_file():
        return None
    try:
        return load_prepared(path)
    except OrchmoeError:
        return None


def _build(cfg: DataConfig, layout: TaskSource, tokenize: _Tokenize, digest: str,
           console: Console) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    """Encode every kept task, one file at a time, into per-split datasets and the manifest."""
    parts: dict[str, list[pa.Table]] = {split: [] for split in (*SPLITS, POOL)}
    tasks: list[dict[str, Any]] = []
    filtered: list[str] = []
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task("encoding tasks", total=sum(len(layout.tasks[s]) for s in SPLITS))
        for split in SPLITS:
            for task, pool in layout.read_split(split, cfg):
                progress.update(bar, description=f"{split}: {task.name}")
                if matches_languages(task, cfg.languages):
                    rows, n_truncated = _encode_task(task, len(tasks), cfg, tokenize)
                    parts[split].append(pa.Table.from_pydict(rows, schema=FEATURES.arrow_schema))
                    if pool:
                        pool_rows, n_pool_cut = _encode_task(dataclasses.replace(task, instances=pool), len(tasks),
                                                             cfg, tokenize)
                        parts[POOL].append(pa.Table.from_pydict(pool_rows, schema=FEATURES.arrow_schema))
                        n_truncated += n_pool_cut
                    tasks.append({"name": task.name, "index": len(tasks), "split": split, "category": task.category,
                                  "categories": task.categories, "n_instances": len(task.instances),
                                  "n_pool": len(pool), "n_available": task.n_available, "n_truncated": n_truncated})
                else:
                    filtered.append(task.name)
                progress.advance(bar)
    if filtered:
        console.print(f"language filter {cfg.languages}: skipped {len(filtered)} task(s)", markup=False)
    clash = label_clash((t["name"], t["category"]) for t in tasks)
    if clash:  # the scores' keys would mix two groups
        raise OrchmoeError(f"{layout.split_origin('test')}: {clash}; rename one", field="data.source")
    for split in SPLITS:
        if not parts[split]:
            raise OrchmoeError(f"{layout.split_origin(split)}: no task left after the language filter "
                               f"(data.languages={cfg.languages}); add languages or list other tasks")
    dataset = datasets.DatasetDict({s: _split_dataset(parts[s], digest, s) for s in (*SPLITS, POOL) if parts[s]})
    return dataset, _manifest(cfg, layout, tokenize, digest, tasks, filtered)


def _split_dataset(parts: list[pa.Table], digest: str, split: str) -> datasets.Dataset:
    """One dataset of a split's per-task Arrow tables. Its fingerprint comes from the content hash, which already
    names these rows: left to ``datasets``, every part would be dill-hashed for one (seconds per 1,000 tasks)."""
    fingerprint = hashlib.sha256(f"{digest}\0{split}".encode()).hexdigest()[:16]
    return datasets.Dataset(pa.concat_tables(parts), info=datasets.DatasetInfo(features=FEATURES),
                            fingerprint=fingerprint)


def _encode_task(task: SNITask, index: int, cfg: DataConfig, tokenize: _Tokenize) -> tuple[dict[str, list], int]:
    encoded = encode_prompts(task, task.instances, cfg, tokenize.tokenizer,
                             truncate_source=tokenize.is_encoder_decoder)
    prompt_ids, n_cut = tokenize.prompts(encoded)
    flat = [ref for instance in task.instances for ref in instance.output]
    flat_ids = iter(tokenize.references(flat))
    n = len(task.instances)
    rows = {
        "task": [task.name] * n,
        "task_index": [index] * n,
        "category": [task.category] * n,
        "id": [instance.id for instance in task.instances],
        "prompt": encoded.prompts,
        "prompt_ids": prompt_ids,
        "references": [instance.output for instance in task.instances],
        "reference_ids": [[next(flat_ids) for _ in instance.output] for instance in task.instances],
    }
    return rows, sum(encoded.truncated) + n_cut


def _manifest(cfg: DataConfig, layout: TaskSource, tokenize: _Tokenize, digest: str,
              tasks: list[dict[str, Any]], filtered: list[str]) -> dict[str, Any]:
    def total(split: str, key: str | None = None) -> int:
        return sum(t[key] if key else 1 for t in tasks if t["split"] == split)

    return {
        "orchmoe_version": __version__,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "content_hash": digest,
        "tokenizer_id": tokenize.tokenizer_id,
        "is_encoder_decoder": tokenize.is_encoder_decoder,
        "encoding": {
            **encoding_settings(cfg),
            "prompt_format": "Tk-Instruct DataCollatorForNI",
            "truncation_side": "left: demonstrations dropped first, then the start of the definition cut",
            "answer_spacing": "as upstream" if tokenize.is_encoder_decoder else
            "prompt ids end at 'Output:'; each reference is tokenized with a leading space",
            "train_sample": "per task: random.Random(seed).shuffle(Instances), then the first max_train_instances",
            "test_sample": "per task: the first max_test_instances Instances",
            "pool_sample": "held-out tasks: Instances[max_test_instances : max_test_instances + max_pool_instances]",
        },
        "source": layout.manifest_source(),
        "language_filter": {"languages": list(cfg.languages), "filtered_tasks": filtered},
        "tasks": tasks,
        "totals": {
            "train_tasks": total("train"),
            "test_tasks": total("test"),
            "train_instances": total("train", "n_instances"),
            "test_instances": total("test", "n_instances"),
            "pool_instances": total("test", "n_pool"),
            "truncated_prompts": sum(t["n_truncated"] for t in tasks),
            "filtered_tasks": len(filtered),
        },
    }


def encode_prompt_ids(task: SNITask, cfg: DataConfig, tokenizer: Any, tokenizer_id: str,
                      is_encoder_decoder: bool) -> tuple[list[str], list[list[int]], int]:
    """Prompt strings and ids of ``task``'s instances exactly as ``prepare`` encodes them (``orchmoe generate`` on
    free text), and how many were cut to ``data.max_source_length``."""
    tokenize = _Tokenize(tokenizer, tokenizer_id, is_encoder_decoder, cfg)
    encoded = encode_prompts(task, task.instances, cfg, tokenizer, truncate_source=is_encoder_decoder)
    prompt_ids, n_cut = tokenize.prompts(encoded)
    return encoded.prompts, prompt_ids, sum(encoded.truncated) + n_cut
