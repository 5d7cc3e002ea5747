"""Checkpoint files: the two-file peft layout plus tasks.json, written atomically, read safely.

Only JSON and safetensors are ever read; a pickled ``adapter_model.bin`` is refused, not loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.fsutil import atomic_write, read_safetensors
from orchmoe_cli.fsutil import read_json as fs_read_json

if TYPE_CHECKING:
    from torch import Tensor
    from transformers import PreTrainedModel

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TASKS_FILE = "tasks.json"
FORMAT = "orchmoe-adapter"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, TASKS_FILE)  # everything loading an adapter reads


def write_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


def read_json(path: Path) -> Any:
    return fs_read_json(path, missing=f"file not found; an adapter checkpoint holds {CONFIG_FILE}, {WEIGHTS_FILE} "
                                      f"and {TASKS_FILE}")


def read_tensors(directory: Path) -> dict[str, Tensor]:
    """The adapter weights of a checkpoint (ours or peft's): every command that uses adapters reads them here."""
    pickled = (" (adapter_model.bin is a pickle and is never loaded)"
               if (directory / "adapter_model.bin").exists() else "")
    path = directory / WEIGHTS_FILE
    tensors = read_safetensors(path, missing=f"file not found{pickled}")
    _check_finite(tensors, path)
    return tensors


def _check_finite(tensors: dict[str, Tensor], source: Path) -> None:
    """Refuse weights holding NaN or infinities: a model computing with them answers nonsense that still gets
    scored, so the tensor is named instead of any result."""
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            count = int((~tensor.isfinite()).sum())
            raise OrchmoeError(f"{source}: tensor {name} holds {count} NaN or infinite value(s) of {tensor.numel()}; "
                               "adapters with such numbers give meaningless results: use an earlier checkpoint or "
                               "train again")


def canonical_safetensors(data: bytes, source: Path) -> bytes:
    """A safetensors file with its JSON header re-serialised with sorted keys, the tensor bytes unchanged: equal
    for equal tensors and metadata, whatever order the writer put the header's keys in."""
    damaged = OrchmoeError(f"{source}: not a readable safetensors file (its header is damaged)")
    size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + size])
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except ValueError:  # too short, not JSON, or a NaN / infinity where only finite numbers belong
        raise damaged from None
    if not isinstance(header, dict):
        raise damaged
    return text.encode() + data[8 + size:]


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


WEIGHTS_PROBE = 8  # embedding values recorded from the first and last token rows
PROBE_TOLERANCE = 2e-2  # relative: the same base in bfloat16 or float16 agrees to about 3 digits


def base_summary(base: PreTrainedModel) -> dict[str, Any]:
    """What a checkpoint records about its base model, to catch loading onto the wrong one: its kind and sizes,
    and a few of its input-embedding values (another checkpoint of the same architecture, or another random
    initialisation, differs there; a change of dtype or quantisation does not, beyond rounding)."""
    embeddings = base.get_input_embeddings()
    weight = embeddings.weight.detach()
    probe = [float(v) for v in (*weight[0, :WEIGHTS_PROBE].float(), *weight[-1, :WEIGHTS_PROBE].float())]
    return {
        "name_or_path": getattr(base.config, "_name_or_path", "") or "",
        "model_type": getattr(base.config, "model_type", ""),
        "architecture": type(base).__name__,
        "hidden_size": embeddings.embedding_dim,
        "vocab_size": embeddings.num_embeddings,
        "num_layers": getattr(base.config, "num_hidden_layers", None) or getattr(base.config, "num_layers", None),
        "embedding_probe": probe,
    }


def same_base(recorded: dict[str, Any], actual: dict[str, Any]) -> str | None:
    """The first recorded property of a base model that ``actual`` does not share, or None (properties a
    checkpoint of an older version did not record are not compared)."""
    for key in ("model_type", "hidden_size", "vocab_size", "num_layers"):
        if recorded.get(key) is not None and recorded[key] != actual[key]:
            return f"base_model.{key} is {recorded[key]!r} but the given base model has {actual[key]!r}"
    probe = recorded.get("embedding_probe")
    if probe and any(abs(a - b) > PROBE_TOLERANCE * max(abs(a), abs(b), 1e-3)
                     for a, b in zip(probe, actual["embedding_probe"])):
        return ("base_model.embedding_probe differs: the given base model has other weights than the one the "
                "adapters were trained on")
    return None
