"""Super-NaturalInstructions in the upstream layout: where a source's task and split files are, which tasks each
split lists, and which instances are evaluated, sampled or pooled for adaptation.

Every problem in a split file or layout is reported as one :class:`OrchmoeError` line that names the file (and
line) and says what to do; one task file is read and checked by :mod:`orchmoe_cli.data.sni_task`. Task files are
read one at a time so that the full 1.6k-task collection never sits in memory at once.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

from orchmoe_cli.data.data_config import DataConfig
from orchmoe_cli.data.sni_task import Instance, SNITask, read_task, read_text
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.paths import inside, listing, not_found_hint

Split = Literal["train", "test"]
SPLITS: tuple[Split, Split] = ("train", "test")


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

    def no_file(name: str) -> str | None:
        file = task_dir / f"{name}.json"
        return None if file.is_file() else f"has no file {file}; fix the name or add the task file"
    tasks = read_split_lists(files, no_file)
    return SourceLayout(description=description, task_dir=task_dir, split_files=files, tasks=tasks)


def read_split_lists(files: dict[Split, Path], unknown: Callable[[str], str | None]) -> dict[Split, tuple[str, ...]]:
    """The task names the split files list (SNI's or a table's task lists), in file order: none listed twice, none
    in both, every one known (``unknown(name)`` says what is wrong with a name, None when nothing is)."""
    names = {split: _read_split_file(files[split], unknown) for split in SPLITS}
    train_lines = {name: line for line, name in names["train"]}
    for line, name in names["test"]:
        if name in train_lines:
            raise OrchmoeError(f"{files['test']}: line {line}: task '{name}' is also in {files['train']} "
                               f"(line {train_lines[name]}); a task belongs to one split only, remove it from one")
    return {split: tuple(name for _, name in names[split]) for split in SPLITS}


def given_split_dir(cfg: DataConfig) -> Path:
    """``data.split_dir``, which must be a directory (a split file given instead points at its folder)."""
    split_dir = Path(str(cfg.split_dir))
    if split_dir.is_file():
        raise OrchmoeError(f"'{split_dir}' is a file; data.split_dir names the directory holding {cfg.train_split} and "
                           f"{cfg.test_split}: did you mean data.split_dir={split_dir.parent}?", field="data.split_dir")
    if not split_dir.is_dir():
        raise OrchmoeError(f"directory '{split_dir}' not found{not_found_hint(split_dir, Path.is_dir)}; point it at "
                           f"the directory holding {cfg.train_split} and {cfg.test_split}", field="data.split_dir")
    return split_dir


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
    return {name for file in files if file.is_file() for name in read_text(file, "split file", "").split()}


def _split_dir(cfg: DataConfig, root: Path) -> Path:
    if cfg.split_dir is not None:
        return given_split_dir(cfg)
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


def _read_split_file(path: Path, unknown: Callable[[str], str | None]) -> list[tuple[int, str]]:
    """(line number, task name) pairs; blank lines are skipped."""
    text = read_text(path, "split file", "set data.split_dir / data.train_split / data.test_split")
    seen: dict[str, int] = {}
    names: list[tuple[int, str]] = []
    for line, raw in enumerate(text.splitlines(), start=1):
        name = raw.strip()
        if not name:
            continue
        if name in seen:
            raise OrchmoeError(f"{path}: line {line}: task '{name}' is listed twice (first on line {seen[name]}); "
                               "remove the duplicate")
        problem = unknown(name)
        if problem is not None:
            raise OrchmoeError(f"{path}: line {line}: task '{name}' {problem}")
        seen[name] = line
        names.append((line, name))
    if not names:
        raise OrchmoeError(f"{path}: the split file lists no tasks; add task names, one per line")
    return names


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
