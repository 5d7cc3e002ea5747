"""Checkpoint files: the two-file peft layout plus tasks.json, written atomically, read safely.

Only JSON and safetensors are ever read; a pickled ``adapter_model.bin`` is refused, not loaded.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import PreTrainedModel

from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.fsutil import disk_error

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TASKS_FILE = "tasks.json"
FORMAT = "orchmoe-adapter"


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except SafetensorError as exc:  # safetensors reports a full disk as its own error, "os error 28"
        if "os error 28" in str(exc):
            raise disk_error(path, OSError(errno.ENOSPC, str(exc))) from None
        raise
    except OSError as exc:
        raise disk_error(path, exc) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, value: Any) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8"))


def write_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    _atomic(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise OrchmoeError(f"{path}: file not found; an adapter checkpoint holds {CONFIG_FILE}, {WEIGHTS_FILE} "
                           f"and {TASKS_FILE}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OrchmoeError(f"{path}: not valid JSON ({exc})") from None


def read_tensors(directory: Path) -> dict[str, Tensor]:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        pickled = (" (adapter_model.bin is a pickle and is never loaded)"
                   if (directory / "adapter_model.bin").exists() else "")
        raise OrchmoeError(f"{path}: file not found{pickled}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise OrchmoeError(f"{path}: not a readable safetensors file ({exc})") from None


def read_task_names(directory: Path) -> list[str]:
    path = directory / TASKS_FILE
    names = read_json(path)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise OrchmoeError(f"{path}: expected a JSON list of task names")
    return names


def check_tensors(expected: dict[str, tuple[int, ...]], tensors: dict[str, Tensor], source: str, method: str,
                  hint: str = "") -> None:
    """Every expected tensor present, none extra, each with its exact shape; one error line otherwise."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"missing tensor {missing[0]}" if missing else f"unexpected tensor {unexpected[0]}"
        raise OrchmoeError(f"{source}: {what} for method {method} ({len(missing)} missing, "
                           f"{len(unexpected)} unexpected){hint}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise OrchmoeError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, expected "
                               f"{tuple(shape)} for method {method}{hint}")


def base_summary(base: PreTrainedModel) -> dict[str, Any]:
    """What a checkpoint records about its base model, to catch loading onto the wrong one."""
    embeddings = base.get_input_embeddings()
    return {
        "name_or_path": getattr(base.config, "_name_or_path", "") or "",
        "model_type": getattr(base.config, "model_type", ""),
        "architecture": type(base).__name__,
        "hidden_size": embeddings.embedding_dim,
        "vocab_size": embeddings.num_embeddings,
    }
