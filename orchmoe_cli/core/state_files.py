"""The training state of a checkpoint (optimizer, scheduler, RNGs, the trainer's position) as files that are never
unpickled: tensors go to safetensors, the rest to JSON with tags that keep tuples, non-string keys and tensor
references exact; and the global RNGs a training step draws from, captured and restored."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_tensors

from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.fsutil import atomic_write_bytes, json_text, read_json, read_safetensors

try:
    import numpy
except ImportError:  # numpy is optional; its RNG is simply not captured
    numpy = None

log = logging.getLogger(__name__)

_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


class _Unserialisable(TypeError):
    """A value that is neither a tensor nor JSON-representable; carries its path for the message."""


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Turn ``value`` into JSON data, moving tensors into ``tensors`` under unique names."""
    if isinstance(value, torch.Tensor):
        name = f"{len(tensors)}:{path}"
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()  # copy: safetensors rejects shared storage
        return {_TENSOR: name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(item, f"{path}.{i}", tensors) for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(item, f"{path}.{i}", tensors) for i, item in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("__") for key in value):
            return {key: _encode(item, f"{path}.{key}", tensors) for key, item in value.items()}
        return {_ITEMS: [[_encode(key, path, {}), _encode(item, f"{path}.{key}", tensors)]
                         for key, item in value.items()]}
    raise _Unserialisable(f"{path} has type {type(value).__name__}, which is neither a tensor nor JSON data")


def _decode(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`_encode`."""
    if isinstance(data, list):
        return [_decode(item, tensors) for item in data]
    if not isinstance(data, dict):
        return data
    if len(data) == 1:
        tag, inner = next(iter(data.items()))
        if tag == _TENSOR:
            return tensors[inner]
        if tag == _TUPLE:
            return tuple(_decode(item, tensors) for item in inner)
        if tag == _ITEMS:
            return {_decode(key, tensors): _decode(item, tensors) for key, item in inner}
    return {key: _decode(item, tensors) for key, item in data.items()}


def save_part(directory: Path, name: str, value: Any) -> None:
    """``<name>.json`` and ``<name>.safetensors`` in ``directory``, each written atomically."""
    tensors: dict[str, torch.Tensor] = {}
    try:
        data = _encode(value, name, tensors)
    except _Unserialisable as exc:
        raise OrchmoeError(f"cannot save the {name} state: {exc}") from None
    atomic_write_bytes(directory / f"{name}.json", json_text(data, directory / f"{name}.json", indent=1).encode())
    atomic_write_bytes(directory / f"{name}.safetensors", save_tensors(tensors))


def encodable(value: Any) -> bool:
    """Whether :func:`save_part` can write ``value``."""
    try:
        _encode(value, "", {})
    except _Unserialisable:
        return False
    return True


_DAMAGED = "; the checkpoint is damaged"


def read_part_json(path: Path) -> Any:
    return read_json(path, missing="missing from the checkpoint", damaged=_DAMAGED)


def read_part_tensors(path: Path, header_only: bool = False) -> dict[str, torch.Tensor]:
    return read_safetensors(path, header_only, missing="missing from the checkpoint", damaged=_DAMAGED)


def load_part(directory: Path, name: str) -> Any:
    """What :func:`save_part` wrote, checked against its tensor file."""
    data = read_part_json(directory / f"{name}.json")
    tensor_file = directory / f"{name}.safetensors"
    tensors = read_part_tensors(tensor_file)
    try:
        return _decode(data, tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise OrchmoeError(f"{directory / name}.json: does not match {tensor_file.name} ({exc!r})") from None


def capture_rng() -> dict[str, Any]:
    """Snapshot every global RNG a training step may draw from (python, numpy, torch CPU, torch CUDA)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if numpy is not None:
        kind, key, pos, has_gauss, gauss = numpy.random.get_state()
        state["numpy"] = (kind, key.tolist(), pos, has_gauss, gauss)
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put the RNGs back exactly as :func:`capture_rng` saw them, so random draws continue identically."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state and numpy is not None:
        kind, key, pos, has_gauss, gauss = state["numpy"]
        numpy.random.set_state((kind, numpy.asarray(key, dtype=numpy.uint32), pos, has_gauss, gauss))
    cuda_states = state.get("torch_cuda", [])
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda_states and len(cuda_states) != devices:
        log.warning("checkpoint has CUDA RNG states for %d device(s) but %d are visible; "
                    "random numbers on GPU will differ from an uninterrupted run", len(cuda_states), devices)
    for index, cuda_state in enumerate(cuda_states[:devices]):
        torch.cuda.set_rng_state(cuda_state, index)
