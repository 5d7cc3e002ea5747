"""Reading and validating Super-NaturalInstructions task files in the upstream layout.

Every problem in a task or split file is reported as one :class:`OrchmoeError` line that names the file
(and the JSON field or line) and says what to do, because users point ``data.source`` at their own
copies of SNI and a traceback from deep inside the encoder would not tell them which file is broken.
Task files are read one at a time so that the full 1.6k-task collection never sits in memory at once.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Literal, NoReturn, Sequence

from orchmoe_cli.data.data_config import DataConfig
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.paths import inside, listing, not_found_hint

Split = Literal["train", "test"]
SPLITS: tuple[Split, Split] = ("train", "test")
LANGUAGE_FIELDS = ("Input_language", "Output_language", "Instruction_language")
_FIX_TASK = "fix the task file or remove the task from the split file"
# Upstream SNI's largest task file is about 4 MB and no single text in it comes near 1M characters; the limits
# (the file one is GitHub's hard limit) stop a stray huge file or field before it costs minutes and gigabytes.
MAX_FILE_BYTES = 100 * 2**20
MAX_TEXT_CHARS = 2**20


@dataclass(frozen=True, slots=True)
class Example:
    """A positive or negative demonstration; ``explanation`` is None when the file has none."""

    input: str
    output: str
    explanation: str | None


@dataclass(frozen=True, slots=True)
class Instance:
    """One task instance; ``output`` lists every acceptable reference."""

    id: str
    input: str
    output: list[str]


@dataclass(frozen=True, slots=True)
class SNITask:
    """A validated task. ``n_available`` counts the instances in the file, before any cap."""

    name: str
    path: Path
    categories: list[str]
    definition: list[str]
    positive_examples: list[Example]
    negative_examples: list[Example]
    instances: list[Instance]
    languages: dict[str, list[str] | None]
    n_available: int

    @property
    def category(self) -> str:
        """The category used for grouped metrics (upstream: ``Categories[0]``)."""
        return self.categories[0]


@dataclass(frozen=True)
class SourceLayout:
    """Where the task files and split files of a data source are, and the validated split lists."""

    description: str
    task_dir: Path
    split_files: dict[Split, Path]
    tasks: dict[Split, tuple[str, ...]]

    def task_path(self, name: str) -> Path:
        return self.task_dir / f"{name}.json"

    def split_origin(self, split: Split) -> str:
        """What errors about a split's tasks name."""
        return str(self.split_files[split])

    def read_split(self, split: Split, cfg: DataConfig) -> Iterator[tuple[SNITask, list[Instance]]]:
        return read_split(self, split, cfg)

    def hash_into(self, digest: Any) -> None:
        """The bytes of both split files and of every listed task file."""
        files = [(f"split:{split}", self.split_files[split]) for split in SPLITS]
        files += [(f"task:{name}", self.task_path(name)) for split in SPLITS for name in self.tasks[split]]
        for label, path in files:
            hash_file(digest, label, path)

    def notes(self) -> list[str]:
        return []  # the task files' problems are errors

    def manifest_source(self) -> dict[str, Any]:
        return {"description": self.description, "format": "sni", "task_dir": str(self.task_dir),
                "split_files": {split: str(path) for split, path in self.split_files.items()}}


def hash_file(digest: Any, label: str, path: Path) -> None:
    """Add a file's label, size and bytes to a content hash, read in 1 MiB chunks."""
    digest.update(f"\0{label}\0{path.stat().st_size}\0".encode())
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)


# --------------------------------------------------------------------------- layout


def bundled_dir() -> Path:
    """The sample shipped inside the package (task files and split files side by side)."""
    return Path(str(resources.files("orchmoe_cli.data").joinpath("sample")))


def resolve_source(cfg: DataConfig) -> SourceLayout:
    """Find the task and split files of ``cfg.source`` and validate both split files."""
    if cfg.source == "bundled":
        root, description = bundled_dir(), "bundled SNI sample"
    else:
        root = Path(cfg.source)  # resolved when the recipe was read (paths.user_path)
        if not root.is_dir():
            raise OrchmoeError(f"directory '{root}' not found{not_found_hint(root, Path.is_dir)}; set data.source to "
                               "'bundled' or to a directory of SNI task files", field="data.source")
        refuse_part_of_sni(root, cfg)
        description = str(root.resolve())
    task_dir = _task_dir(root)
    split_dir = _split_dir(cfg, root)
    files: dict[Split, Path] = {"train": split_dir / cfg.train_split, "test": split_dir / cfg.test_split}
    names = {split: _read_split_file(files[split], task_dir) for split in SPLITS}
    train_lines = {name: line for line, name in names["train"]}
    for line, name in names["test"]:
        if name in train_lines:
            raise OrchmoeError(f"{files['test']}: line {line}: task '{name}' is also in {files['train']} "
                               f"(line {train_lines[name]}); a task belongs to one split only, remove it from one")
    tasks = {split: tuple(name for _, name in names[split]) for split in SPLITS}
    return SourceLayout(description=description, task_dir=task_dir, split_files=files, tasks=tasks)


def _task_dir(root: Path) -> Path:
    return root / "tasks" if (root / "tasks").is_dir() else root


def _split_candidates(root: Path) -> tuple[Path, Path]:
    """Where the split files of an SNI directory may be: beside its tasks, or in upstream's splits/default."""
    return root, root / "splits" / "default"


def _is_sni_directory(path: Path, cfg: DataConfig) -> bool:
    return any((candidate / cfg.train_split).is_file() for candidate in _split_candidates(path))


def refuse_part_of_sni(path: Path, cfg: DataConfig) -> None:
    """A ``data.source`` that is part of an SNI directory (its task folder, or a task file its splits list) is
    refused, naming the directory one level up: on its own it would read as tables, or as one task with no
    splits. With ``data.split_dir`` given, a folder of task files is a complete source."""
    if cfg.split_dir is not None or (path.is_dir() and _is_sni_directory(path, cfg)):
        return
    folder = path if path.is_dir() else path.parent
    for root in (folder, folder.parent):
        if root == path or _task_dir(root) != folder or not _is_sni_directory(root, cfg):
            continue
        if path.is_dir() or (path.suffix == ".json" and path.stem in _listed_tasks(root, cfg)):
            part = "the task folder" if path.is_dir() else "a task file"
            raise OrchmoeError(f"'{path}' is {part} of the SNI directory '{root}'; did you mean data.source={root}? "
                               "(its split files choose the tasks)", field="data.source")


def _listed_tasks(root: Path, cfg: DataConfig) -> set[str]:
    """The task names the split files of the SNI directory ``root`` list."""
    files = [folder / name for folder in _split_candidates(root) for name in (cfg.train_split, cfg.test_split)]
    return {name for file in files if file.is_file() for name in _read_text(file, "split file", "").split()}


def _split_dir(cfg: DataConfig, root: Path) -> Path:
    if cfg.split_dir is not None:
        split_dir = Path(cfg.split_dir)
        if not split_dir.is_dir():
            raise OrchmoeError(f"directory '{split_dir}' not found{not_found_hint(split_dir, Path.is_dir)}; point it "
                               "at the directory holding "
                               f"{cfg.train_split} and {cfg.test_split}", field="data.split_dir")
        return split_dir
    candidates = _split_candidates(root)
    for candidate in candidates:
        if (candidate / cfg.train_split).is_file():
            return candidate
    fix = _sni_directories_near(root, cfg) or "add the split files there or set data.split_dir"
    raise OrchmoeError(f"no split file {cfg.train_split} in {candidates[0]} or {candidates[1]}; {fix}",
                       field="data.source")


def _sni_directories_near(root: Path, cfg: DataConfig) -> str:
    """The SNI directories one level up or down from ``root``, as a did-you-mean ('' when there is none)."""
    found = [root.parent] if _is_sni_directory(root.parent, cfg) else []
    found += inside(root, lambda child: child.is_dir() and _is_sni_directory(child, cfg))
    if len(found) == 1:
        return f"{found[0]} holds them: did you mean data.source={found[0]}?"
    return f"{listing(found)} hold them: did you mean one of them?" if found else ""


def _read_split_file(path: Path, task_dir: Path) -> list[tuple[int, str]]:
    """(line number, task name) pairs; blank lines are skipped."""
    text = _read_text(path, "split file", "set data.split_dir / data.train_split / data.test_split")
    seen: dict[str, int] = {}
    names: list[tuple[int, str]] = []
    for line, raw in enumerate(text.splitlines(), start=1):
        name = raw.strip()
        if not name:
            continue
        if name in seen:
            raise OrchmoeError(f"{path}: line {line}: task '{name}' is listed twice (first on line {seen[name]}); "
                               "remove the duplicate")
        if not (task_dir / f"{name}.json").is_file():
            raise OrchmoeError(f"{path}: line {line}: task '{name}' has no file {task_dir / (name + '.json')}; "
                               "fix the name or add the task file")
        seen[name] = line
        names.append((line, name))
    if not names:
        raise OrchmoeError(f"{path}: the split file lists no tasks; add task names, one per line")
    return names


def _read_text(path: Path, what: str, fix: str) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise OrchmoeError(f"{path}: {what} is {size:,} bytes, more than the {MAX_FILE_BYTES:,} allowed; "
                               f"{fix}")
        data = path.read_bytes()
    except FileNotFoundError:
        raise OrchmoeError(f"{path}: {what} not found{not_found_hint(path, Path.is_file)}; {fix}") from None
    except OSError as exc:
        raise OrchmoeError(f"{path}: cannot read {what} ({exc.strerror}); {fix}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise OrchmoeError(f"{path}: line {line}: not UTF-8 text (byte {exc.start}); re-save the {what} "
                           "as UTF-8") from None


# --------------------------------------------------------------------------- tasks


def read_task(path: Path) -> SNITask:
    """Parse and validate one upstream task file; the task name is the file name without ``.json``."""
    text = _read_text(path, "task file", _FIX_TASK)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OrchmoeError(f"{path}: line {exc.lineno} column {exc.colno}: invalid JSON ({exc.msg}); "
                           f"{_FIX_TASK}") from None
    except RecursionError:
        raise OrchmoeError(f"{path}: invalid JSON (nested too deeply to read); {_FIX_TASK}") from None
    except ValueError:  # an integer literal longer than Python converts
        raise OrchmoeError(f"{path}: invalid JSON (a number with too many digits); {_FIX_TASK}") from None
    if not isinstance(raw, dict):
        _bad(path, "top level", f"expected a JSON object, got {_kind(raw)}")
    for key in ("Definition", "Categories", "Positive Examples", "Instances"):
        if key not in raw:
            _bad(path, key, "missing required field")
    items = _non_empty_list(path, "Instances", raw["Instances"])
    instances = [_instance(path, f"Instances[{i}]", item) for i, item in enumerate(items)]
    first: dict[str, int] = {}
    for i, instance in enumerate(instances):
        if instance.id in first:
            _bad(path, f"Instances[{i}].id", f"'{instance.id}' is also the id of Instances[{first[instance.id]}]; "
                 "instance ids must be unique")
        first[instance.id] = i
    return SNITask(
        name=path.stem,
        path=path,
        categories=_strings(path, "Categories", raw["Categories"], non_empty=True),
        definition=_strings(path, "Definition", raw["Definition"], non_empty=True),
        positive_examples=_examples(path, "Positive Examples", raw["Positive Examples"]),
        negative_examples=_examples(path, "Negative Examples", raw.get("Negative Examples", [])),
        instances=instances,
        languages={key: _strings(path, key, raw[key]) if key in raw else None for key in LANGUAGE_FIELDS},
        n_available=len(instances),
    )


def read_split(layout: SourceLayout, split: Split, cfg: DataConfig) -> Iterator[tuple[SNITask, list[Instance]]]:
    """Yield the split's tasks in split-file order, validated and capped, one file at a time, each with its
    adaptation pool (held-out tasks only: the instances after the evaluation ones, never among them).

    The language filter is not applied here, so callers can report what it removes.
    """
    for name in layout.tasks[split]:
        task = read_task(layout.task_path(name))
        yield cap_instances(task, split, cfg), pool_instances(task, split, cfg)


def pool_positions(n: int, split: Split, cfg: DataConfig) -> range:
    """Which of a task's ``n`` instances form its adaptation pool: a held-out task's
    ``[max_test_instances : max_test_instances + max_pool_instances]``, the examples few-shot adaptation may
    learn from (upstream's official evaluation instances come first); none for a training task."""
    if split != "test":
        return range(0)
    return range(n)[cfg.max_test_instances : cfg.max_test_instances + cfg.max_pool_instances]


def pool_instances(task: SNITask, split: Split, cfg: DataConfig) -> list[Instance]:
    """A held-out task's adaptation pool (``pool_positions``)."""
    return [task.instances[i] for i in pool_positions(len(task.instances), split, cfg)]


def sample_positions(n: int, split: Split, cfg: DataConfig) -> list[int]:
    """Which of a task's ``n`` instances are kept, in order. Training: a seeded random sample (Tk-Instruct:
    shuffle, then the first N); test: the first N. A shuffle's permutation depends only on the length, so a
    reader can pick the rows before building any instance.

    Each task gets its own ``random.Random(seed)``, so a task's sample does not depend on the other tasks.
    """
    positions = list(range(n))
    if split == "train":
        random.Random(cfg.seed).shuffle(positions)
        return positions[: cfg.max_train_instances]
    return positions[: cfg.max_test_instances]


def cap_instances(task: SNITask, split: Split, cfg: DataConfig) -> SNITask:
    """The task with only its kept instances (``sample_positions``)."""
    kept = [task.instances[i] for i in sample_positions(len(task.instances), split, cfg)]
    return dataclasses.replace(task, instances=kept)


def matches_languages(task: SNITask, languages: Sequence[str]) -> bool:
    """True if every declared input/output/instruction language is allowed (a missing field passes)."""
    allowed = set(languages)
    return all(values is None or set(values) <= allowed for values in task.languages.values())


# --------------------------------------------------------------------------- validation helpers


def _bad(path: Path, where: str, problem: str) -> NoReturn:
    raise OrchmoeError(f"{path}: {where}: {problem}; {_FIX_TASK}")


def _kind(value: Any) -> str:
    """A JSON-flavoured description of a value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an empty list" if not value else "a list"
    return "an object"


def _non_empty_list(path: Path, where: str, value: Any) -> list[Any]:
    if not isinstance(value, list) or not value:
        _bad(path, where, f"expected a non-empty list, got {_kind(value)}")
    return value


def _string(path: Path, where: str, value: Any) -> str:
    """A string of at most :data:`MAX_TEXT_CHARS` characters that UTF-8 can encode (no lone surrogates)."""
    if not isinstance(value, str):
        _bad(path, where, f"expected a string, got {_kind(value)}")
    if len(value) > MAX_TEXT_CHARS:
        _bad(path, where, f"{len(value):,} characters, more than the {MAX_TEXT_CHARS:,} allowed in one text")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            _bad(path, where, f"character {exc.start} is a lone surrogate ({value[exc.start]!a}), "
                 "which is not valid Unicode text")
    return value


def _strings(path: Path, where: str, value: Any, non_empty: bool = False) -> list[str]:
    if not isinstance(value, list) or (non_empty and not value):
        _bad(path, where, f"expected a {'non-empty ' if non_empty else ''}list of strings, got {_kind(value)}")
    return [_string(path, f"{where}[{i}]", item) for i, item in enumerate(value)]


def _object(path: Path, where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        _bad(path, where, f"expected an object, got {_kind(value)}")
    return value


def _examples(path: Path, where: str, value: Any) -> list[Example]:
    if not isinstance(value, list):
        _bad(path, where, f"expected a list of examples, got {_kind(value)}")
    examples = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        item = _object(path, at, item)
        for key in ("input", "output"):
            if key not in item:
                _bad(path, f"{at}.{key}", "missing required field")
        explanation = item.get("explanation")
        examples.append(Example(
            input=_string(path, f"{at}.input", item["input"]),
            output=_string(path, f"{at}.output", item["output"]),
            explanation=None if explanation is None else _string(path, f"{at}.explanation", explanation),
        ))
    return examples


def _instance(path: Path, where: str, value: Any) -> Instance:
    item = _object(path, where, value)
    for key in ("id", "input", "output"):
        if key not in item:
            _bad(path, f"{where}.{key}", "missing required field")
    output = item["output"]
    if not isinstance(output, list) or not output:
        _bad(path, f"{where}.output", f"expected a non-empty list of reference strings, got {_kind(output)}")
    return Instance(
        id=_string(path, f"{where}.id", item["id"]),
        input=_string(path, f"{where}.input", item["input"]),
        output=[_string(path, f"{where}.output[{i}]", ref) for i, ref in enumerate(output)],
    )
