"""Training checkpoints that survive kills, full disks and bit rot, and resume bit-identically.

Layout of ``<run>/checkpoints/step-000100/``::

    adapter_config.json, adapter_model.safetensors, tasks.json   written by the adapter callback
    recipe.yaml
    training_state/{optimizer,scheduler,rng,trainer}.{json,safetensors}
    manifest.json                                                 written last: sha256 + size of every file

Nothing is pickled (`state_files`). Built in a hidden temp sibling and renamed into place, a ``step-*``
directory is complete unless damaged later, which its manifest reveals.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from orchmoe_cli import __version__
from orchmoe_cli.adapters.files import ADAPTER_FILES, WEIGHTS_FILE, canonical_safetensors
from orchmoe_cli.core.state_files import (
    capture_rng,
    encodable,
    load_part,
    read_part_json,
    read_part_tensors,
    save_part,
)
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.fsutil import atomic_directory, atomic_write_bytes, fsync_dir, json_text
from orchmoe_cli.paths import (CHECKPOINT_MANIFEST, checkpoint_above, inside, listing, not_found_hint, output_of,
                               user_path)

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = CHECKPOINT_MANIFEST
STATE_DIR = "training_state"
_STEP_DIR = re.compile(r"step-(\d+)")
_STALE = (".step-*.tmp", ".step-*.old")
def _digest(path: Path, sync: bool = False) -> str:
    """sha256 of a file; ``sync`` also flushes it so a renamed checkpoint survives a power loss
    (off when verifying, so checkpoints on read-only mounts still verify)."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
        if sync:
            os.fsync(handle.fileno())
    return sha.hexdigest()


def _write_manifest(staging: Path, step: int) -> None:
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    manifest = {
        "orchmoe_version": __version__,
        "step": step,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files": {p.relative_to(staging).as_posix(): {"sha256": _digest(p, sync=True), "size": p.stat().st_size}
                  for p in files},
    }
    atomic_write_bytes(staging / MANIFEST, json_text(manifest, staging / MANIFEST, indent=1).encode())
    for directory in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
        fsync_dir(directory)


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check every file against the manifest and that JSON/safetensors files parse; return the manifest."""
    root = Path(path)
    if not root.is_dir():
        raise OrchmoeError(f"{root}: not a checkpoint directory")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise OrchmoeError(f"{root}: no {MANIFEST}, so the checkpoint is incomplete (its save was interrupted); "
                           "resume from an earlier checkpoint")
    manifest = read_part_json(manifest_path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise OrchmoeError(f"{manifest_path}: not an orchmoe checkpoint manifest (no 'files' object); "
                           "the checkpoint is damaged, resume from an earlier one")
    for name, expected in files.items():
        _check_manifest_entry(manifest_path, name, expected)
    for name, expected in files.items():
        file = root / name
        if not file.is_file():
            raise OrchmoeError(f"{file}: missing from the checkpoint (listed in {MANIFEST})")
        size = file.stat().st_size
        if size < expected["size"] and not (file.suffix == ".json" and _parses(file)):
            raise OrchmoeError(f"{file}: truncated ({size} of {expected['size']} bytes); "
                               "the checkpoint is damaged, resume from an earlier one")
        if size != expected["size"] or _digest(file) != expected["sha256"]:
            raise OrchmoeError(f"{file}: was modified after saving (its sha256 does not match {MANIFEST})")
        if file.suffix == ".json":
            read_part_json(file)
        elif file.suffix == ".safetensors":
            read_part_tensors(file, header_only=True)
    return manifest


def _parses(path: Path) -> bool:
    """A shorter JSON file that still parses was edited after saving, not cut short."""
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return True


def _check_manifest_entry(manifest_path: Path, name: str, expected: Any) -> None:
    """A relative path inside the checkpoint with a ``{"size": int >= 0, "sha256": str}`` entry."""
    parts = PurePosixPath(name).parts
    if not name or name.startswith("/") or "\\" in name or ".." in parts:
        raise OrchmoeError(f"{manifest_path}: files: '{name}' is not a path inside the checkpoint; "
                           "the manifest is damaged, resume from an earlier checkpoint")
    size = expected.get("size") if isinstance(expected, dict) else None
    sha256 = expected.get("sha256") if isinstance(expected, dict) else None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0 or not isinstance(sha256, str):
        raise OrchmoeError(f"{manifest_path}: files.{name}: expected an object with a byte count 'size' and a "
                           "'sha256' string; the manifest is damaged, resume from an earlier checkpoint")


def _step_dirs(checkpoints: Path) -> list[tuple[int, Path]]:
    """``step-*`` directories, newest first; hidden temp dirs never match."""
    found = [(int(m.group(1)), p) for p in checkpoints.glob("step-*")
             if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]
    return sorted(found, reverse=True)


def step_directories(run_dir: str | Path) -> list[Path]:
    """A run directory's ``checkpoints/step-*`` directories, newest first (complete or not)."""
    return [path for _, path in _step_dirs(Path(run_dir) / CHECKPOINTS)]


def clean_stale(run_dir: str | Path) -> None:
    """Remove temp dirs left by a killed save or prune; only safe while holding the run's :class:`RunLock`."""
    checkpoints = Path(run_dir) / CHECKPOINTS
    for pattern in _STALE:
        for leftover in checkpoints.glob(pattern):
            log.info("removing %s left by an interrupted run", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _prune(checkpoints: Path, keep_last: int, keep_steps: Collection[int] = ()) -> None:
    """Delete checkpoints older than the ``keep_last`` newest ones that verify, except those of ``keep_steps``.

    Counting only verified checkpoints means a silently damaged newer one never costs the last good one.
    Each victim is renamed to a hidden temp name first, so a kill mid-delete leaves no half ``step-*`` dir.
    """
    kept = 0
    for step, path in _step_dirs(checkpoints):
        if kept >= keep_last and step not in keep_steps:
            doomed = path.with_name(f".{path.name}.prune.tmp")
            try:
                os.replace(path, doomed)
                shutil.rmtree(doomed)
            except OSError as exc:  # the new checkpoint is safe; a failed cleanup must not stop training
                log.warning("could not delete old checkpoint %s: %s", path, exc)
            continue
        with contextlib.suppress(OrchmoeError):
            verify_checkpoint(path)
            kept += 1


def save_checkpoint(run_dir: str | Path, step: int, write_adapter: Callable[[Path], None], recipe_yaml: str,
                    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    sampler_state: dict[str, Any], extra: dict[str, Any] | None = None,
                    keep_last: int | None = 3, keep_steps: Collection[int] = ()) -> Path:
    """Write ``<run_dir>/checkpoints/step-NNNNNN`` atomically, then prune; the caller holds the RunLock.

    RNG states are captured at call time, so resuming continues exactly from the moment of saving.
    """
    if step < 0 or (keep_last is not None and keep_last < 1):
        raise OrchmoeError(f"checkpoint step must be >= 0 and keep_last at least 1 (got step {step}, "
                           f"keep_last {keep_last}); use keep_last None to keep every checkpoint")
    checkpoints = Path(run_dir) / CHECKPOINTS
    clean_stale(run_dir)
    rng = capture_rng()
    scheduler_state = scheduler.state_dict()
    if "lr_lambdas" in scheduler_state:  # callable objects' __dict__ may hold anything; the recipe rebuilds them
        scheduler_state["lr_lambdas"] = [fn if encodable(fn) else None for fn in scheduler_state["lr_lambdas"]]
    target = checkpoints / f"step-{step:06d}"
    with atomic_directory(target) as staging:
        write_adapter(staging)
        atomic_write_bytes(staging / "recipe.yaml", recipe_yaml.encode())
        state_dir = staging / STATE_DIR
        save_part(state_dir, "optimizer", optimizer.state_dict())
        save_part(state_dir, "scheduler", scheduler_state)
        save_part(state_dir, "rng", rng)
        save_part(state_dir, "trainer", {"step": step, "sampler_state": sampler_state, "extra": extra or {}})
        _write_manifest(staging, step)
    fsync_dir(checkpoints)
    if keep_last is not None:
        _prune(checkpoints, keep_last, keep_steps)
    return target


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that verifies (newer damaged ones are skipped with a warning); None if there are none.

    When checkpoints exist but none verifies, raises the newest one's problem instead, so callers can report it
    in one line rather than claim there is no checkpoint.
    """
    return _newest_complete(Path(run_dir) / CHECKPOINTS, run_dir)


def _newest_complete(checkpoints: Path, where: str | Path) -> Path | None:
    """The newest ``step-*`` directory of ``checkpoints`` that verifies (see :func:`latest_checkpoint`)."""
    problems: list[OrchmoeError] = []
    for _, path in _step_dirs(checkpoints):
        try:
            verify_checkpoint(path)
        except OrchmoeError as exc:
            problems.append(exc)
            continue
        for problem in problems:
            log.warning("skipping damaged checkpoint: %s", problem)
        return path
    if problems:
        raise OrchmoeError(f"{problems[0]}; no complete checkpoint left in {where}")
    return None


@dataclass(frozen=True)
class TrainingState:
    """What a resumed run needs besides the adapter weights and the already-restored optimizer/scheduler."""

    path: Path
    step: int
    sampler_state: dict[str, Any]
    rng: dict[str, Any]
    extra: dict[str, Any]


def load_training_state(path: str | Path, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler) -> TrainingState:
    """Verify the checkpoint, restore optimizer and scheduler in place; the caller calls :func:`restore_rng`
    once the model and data are built, so their construction does not consume the restored random stream."""
    root = Path(path)
    verify_checkpoint(root)
    state_dir = root / STATE_DIR
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        try:
            target.load_state_dict(load_part(state_dir, name))
        except (KeyError, TypeError, ValueError) as exc:
            raise OrchmoeError(f"{state_dir / name}.json: does not fit this run's {name} ({exc}); "
                               "resume with the recipe the checkpoint was trained with") from None
    trainer, rng = load_part(state_dir, "trainer"), load_part(state_dir, "rng")
    return TrainingState(root, trainer["step"], trainer["sampler_state"], rng, trainer["extra"])


def find_checkpoint(path: str | Path, field: str | None = None, how_to_train: str = "orchmoe train RECIPE") -> Path:
    """The adapter checkpoint ``path`` names (verified when it has a manifest): itself, the one it lies inside, or
    the newest complete one below it (a run directory, its ``checkpoints/``, a folder holding one run). Not
    finding one is an error of the recipe ``field`` that named ``path`` or, without a field (a command-line
    argument), one that starts with ``path`` as given; it names what lies one level up or down, and says "train
    one first" only when nothing does."""
    given = path
    path = user_path(path, field or str(given) or "CHECKPOINT", option=field is None)

    def error(text: str) -> OrchmoeError:  # the path named once: a text that starts with it needs no prefix
        if field is not None or text.startswith((str(path), str(given))):
            return OrchmoeError(text, field=field)
        return OrchmoeError(f"{given}: {text}")

    train_first = f"; train one first ({how_to_train}) or point it at an adapter checkpoint or a run directory"
    if not path.exists():
        raise error(f"{path} does not exist{not_found_hint(path, _holds_checkpoints) or train_first}")
    try:
        found = _checkpoint_at(path) or _checkpoint_around(path)
    except OrchmoeError as exc:  # checkpoints exist but none is complete, or several runs lie below
        raise error(str(exc)) from None
    if found is None:
        what = "is a file, not an adapter checkpoint" if path.is_file() else "holds no adapter checkpoint"
        raise error(f"{path} {what}{_checkpoints_beside(path) or train_first}")
    return found


def _checkpoints_beside(path: Path) -> str:
    """The adapters a few-shot sweep kept below ``path``, else the folder above it, or else the folders beside it,
    that hold checkpoints, as a did-you-mean (a sweep's run above is not what its cells adapted)."""
    kept = [k for k in sorted([*path.glob("cells/*/adapter"), *path.glob("*/adapter")]) if _holds_checkpoints(k)]
    if kept:
        return f"; it holds {len(kept)} few-shot cell adapter(s) ({listing([str(k) for k in kept])}): name one"
    if "adapt" in (output_of(path), output_of(path.parent)):
        return ("; it is a few-shot sweep's output: its cells keep their adapters only with `orchmoe adapt "
                "--keep-adapters`, and the run it adapted is the one named by adapt.checkpoint")
    if _holds_checkpoints(path.parent):
        return f"; {path.parent} holds checkpoints: did you mean it?"
    beside = [entry for entry in inside(path.parent, _holds_checkpoints) if entry != path]
    if len(beside) == 1:
        return f"; {beside[0]} holds checkpoints: did you mean it?"
    return f"; {listing(beside)} hold checkpoints: did you mean one of them?" if beside else ""


def _checkpoint_at(path: Path) -> Path | None:
    """``path`` as an adapter directory, or as a run directory or its ``checkpoints/`` folder (the newest complete
    checkpoint; the newest one's problem when none is complete). A saved checkpoint that lost its adapter config
    is reported as the damaged checkpoint it is."""
    saved = (path / MANIFEST).is_file() and (path / STATE_DIR).is_dir()
    if saved or (path / "adapter_config.json").is_file():
        if (path / MANIFEST).is_file():
            verify_checkpoint(path)
        return path
    for checkpoints in (path / CHECKPOINTS, path):
        if _step_dirs(checkpoints):
            return _newest_complete(checkpoints, path)
    return None


def _checkpoint_around(path: Path) -> Path | None:
    """One level up: the checkpoint that a file or folder lies inside. One level down: the one run or checkpoint a
    folder holds (several: an error listing them)."""
    above = checkpoint_above(path)
    if above is None and path.is_file() and (path.parent / "adapter_config.json").is_file():
        above = path.parent  # an adapter directory saved without a manifest
    if above is not None:
        return _checkpoint_at(above)
    below = inside(path, _holds_checkpoints)
    if len(below) > 1:
        raise OrchmoeError(f"{path} is no run directory, and {len(below)} below it hold checkpoints "
                           f"({listing([entry.name for entry in below])}): name one")
    return _checkpoint_at(below[0]) if below else None


def _holds_checkpoints(path: Path) -> bool:
    """An adapter directory, or a run directory or ``checkpoints/`` folder with ``step-*`` checkpoints."""
    return path.is_dir() and ((path / "adapter_config.json").is_file() or bool(_step_dirs(path / CHECKPOINTS))
                              or bool(_step_dirs(path)))


def checkpoint_digest(checkpoint: str | Path) -> str:
    """sha256 over what an adapter checkpoint loads (config, weights, task names). The weights count by content:
    safetensors writes its metadata in an order that changes from process to process, so the same tensors
    saved twice need not be the same bytes."""
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        path = Path(checkpoint) / name
        if path.is_file():
            digest.update(f"\0{name}\0".encode())
            data = path.read_bytes()
            digest.update(canonical_safetensors(data, path) if name == WEIGHTS_FILE else data)
    return digest.hexdigest()
