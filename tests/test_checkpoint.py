"""Checkpoints: exact resume, tamper detection, kill and disk-full safety, pruning, run lock."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from orchmoe_cli.core import checkpoint, state_files
from orchmoe_cli.core.checkpoint import (
    latest_checkpoint,
    load_training_state,
    save_checkpoint,
    verify_checkpoint,
)
from orchmoe_cli.core.run_lock import RunLock
from orchmoe_cli.core.state_files import capture_rng, load_part, restore_rng
from orchmoe_cli.errors import OrchmoeError

REPO = Path(__file__).resolve().parents[1]
RECIPE = "train:\n  seed: 1\n"


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 2))


def _training(model: torch.nn.Module) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """Two param groups with different hyper-parameters and a warmup schedule still mid-warmup."""
    optimizer = torch.optim.AdamW([
        {"params": model[0].parameters(), "lr": 1e-2, "weight_decay": 0.1},
        {"params": model[2].parameters(), "lr": 3e-3, "weight_decay": 0.0, "betas": (0.8, 0.95)},
    ])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    return optimizer, scheduler


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: object, steps: int) -> None:
    """Draws data, dropout masks and a python/numpy-driven noise scale from the global RNGs."""
    model.train()
    for _ in range(steps):
        scale = random.random() + float(np.random.rand())
        loss = model(torch.randn(3, 4) * scale).pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def _adapter_writer(model: torch.nn.Module):
    def write(staging: Path) -> None:
        (staging / "adapter_config.json").write_text(json.dumps({"r": 4}))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, staging / "adapter_model.safetensors")
        (staging / "tasks.json").write_text(json.dumps(["task001"]))
    return write


def _save(run: Path, step: int, keep_last: int | None = 3) -> Path:
    model = _model()
    optimizer, scheduler = _training(model)
    _train(model, optimizer, scheduler, 1)
    return save_checkpoint(run, step, _adapter_writer(model), RECIPE, optimizer, scheduler, {"index": step},
                           keep_last=keep_last)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def _leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("."))


def test_resume_continues_bit_identically(tmp_path: Path) -> None:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = _model()
    optimizer, scheduler = _training(model)
    _train(model, optimizer, scheduler, 3)
    saved_optimizer_state = optimizer.state_dict()
    path = save_checkpoint(tmp_path, 3, _adapter_writer(model), RECIPE, optimizer, scheduler,
                           {"epoch": 0, "offset": 9}, extra={"best": None, "losses": [0.5, 0.25]})
    _train(model, optimizer, scheduler, 4)

    torch.manual_seed(123)  # a fresh process: different RNG state until restored
    random.seed(123)
    np.random.seed(123)
    fresh = _model()
    fresh.load_state_dict(load_file(path / "adapter_model.safetensors"))
    fresh_optimizer, fresh_scheduler = _training(fresh)
    state = load_training_state(path, fresh_optimizer, fresh_scheduler)
    assert (state.step, state.sampler_state, state.extra) == (3, {"epoch": 0, "offset": 9},
                                                               {"best": None, "losses": [0.5, 0.25]})

    loaded = fresh_optimizer.state_dict()
    assert loaded["param_groups"] == saved_optimizer_state["param_groups"]  # tuples, floats, None, bools exact
    for index, tensors in saved_optimizer_state["state"].items():
        for key, tensor in tensors.items():
            assert loaded["state"][index][key].dtype == tensor.dtype
            assert loaded["state"][index][key].shape == tensor.shape  # 0-dim `step` stays 0-dim
    restore_rng(state.rng)
    _train(fresh, fresh_optimizer, fresh_scheduler, 4)
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    for ours, theirs in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(ours, theirs)


class _Warmup:
    """A callable-object lr lambda: torch saves its ``__dict__``, which here holds an unsaveable function."""

    def __init__(self, steps: int, shape: object = None) -> None:
        self.steps, self.shape = steps, shape

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / self.steps)


def test_scheduler_with_callable_objects_reproduces_learning_rates(tmp_path: Path) -> None:
    model = _model()
    optimizer = torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1)
    lambdas = [_Warmup(7), _Warmup(5, shape=abs)]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    _train(model, optimizer, scheduler, 2)
    lambdas[0].steps = 9  # saved state that the reloaded scheduler must pick up
    path = save_checkpoint(tmp_path, 2, _adapter_writer(model), RECIPE, optimizer, scheduler, {})
    saved = json.loads((path / "training_state" / "scheduler.json").read_text())
    assert saved["lr_lambdas"] == [{"steps": 9, "shape": None}, None]

    fresh_optimizer = torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1)
    fresh_scheduler = torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, [_Warmup(7), _Warmup(5, shape=abs)])
    load_training_state(path, fresh_optimizer, fresh_scheduler)
    for _ in range(3):
        scheduler.step()
        fresh_scheduler.step()
        assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_rng_capture_restore() -> None:
    state = capture_rng()
    first = (torch.rand(5), random.random(), np.random.rand(3), np.random.randn())  # randn also caches a gauss
    restore_rng(state)
    second = (torch.rand(5), random.random(), np.random.rand(3), np.random.randn())
    assert torch.equal(first[0], second[0]) and first[1] == second[1]
    assert np.array_equal(first[2], second[2]) and first[3] == second[3]


def test_manifest_detects_modified_truncated_and_missing_files(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    manifest = verify_checkpoint(path)
    assert manifest["step"] == 1 and "training_state/optimizer.safetensors" in manifest["files"]
    assert set(manifest) >= {"orchmoe_version", "created"}

    tasks = path / "tasks.json"
    _flip_byte(tasks)
    with pytest.raises(OrchmoeError, match=r"tasks\.json: was modified after saving"):
        verify_checkpoint(path)
    _flip_byte(tasks)
    verify_checkpoint(path)

    tensors = path / "training_state" / "optimizer.safetensors"
    blob = tensors.read_bytes()
    tensors.write_bytes(blob[:-7])
    with pytest.raises(OrchmoeError, match=r"optimizer\.safetensors: truncated"):
        verify_checkpoint(path)
    with pytest.raises(OrchmoeError, match=r"optimizer\.safetensors: not a readable safetensors file"):
        load_part(path / "training_state", "optimizer")
    tensors.write_bytes(blob)

    (path / "recipe.yaml").unlink()
    with pytest.raises(OrchmoeError, match=r"recipe\.yaml: missing from the checkpoint"):
        verify_checkpoint(path)
    (path / "manifest.json").unlink()
    with pytest.raises(OrchmoeError, match="no manifest.json"):
        verify_checkpoint(path)


@pytest.mark.parametrize(("name", "entry", "expected"), [
    ("adapter_config.json", {"size": "big", "sha256": "0"}, "files.adapter_config.json: expected an object"),
    ("adapter_config.json", {"size": True, "sha256": "0"}, "files.adapter_config.json: expected an object"),
    ("adapter_config.json", {"size": 1, "sha256": None}, "files.adapter_config.json: expected an object"),
    ("adapter_config.json", [1], "files.adapter_config.json: expected an object"),
    ("../outside.json", {"size": 1, "sha256": "0"}, "'../outside.json' is not a path inside the checkpoint"),
    ("/etc/passwd", {"size": 1, "sha256": "0"}, "'/etc/passwd' is not a path inside the checkpoint"),
])
def test_malformed_manifest_is_one_error(tmp_path: Path, name: str, entry: object, expected: str) -> None:
    path = _save(tmp_path, 1)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = entry
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(OrchmoeError, match="manifest.json: ") as info:
        verify_checkpoint(path)
    assert expected in str(info.value)
    (path / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(OrchmoeError, match="manifest.json: not valid JSON"):
        verify_checkpoint(path)


def test_latest_skips_corrupted_and_temp_dirs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert latest_checkpoint(tmp_path) is None
    good = _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    _flip_byte(bad / "adapter_config.json")
    (tmp_path / "checkpoints" / ".step-000003.abc.tmp").mkdir()
    with caplog.at_level(logging.WARNING, logger="orchmoe_cli.core.checkpoint"):
        assert latest_checkpoint(tmp_path) == good
    assert "adapter_config.json: was modified after saving" in caplog.text

    caplog.clear()
    _flip_byte(good / "recipe.yaml")
    with caplog.at_level(logging.WARNING, logger="orchmoe_cli.core.checkpoint"), \
            pytest.raises(OrchmoeError, match=r"step-000002/adapter_config\.json: was modified after saving.*; "
                                              rf"no complete checkpoint left in {tmp_path}$"):
        latest_checkpoint(tmp_path)
    assert caplog.text == ""  # the error says it all; no "skipping" lines before it


def test_killed_save_leaves_previous_checkpoint_usable(tmp_path: Path) -> None:
    previous = _save(tmp_path, 1)
    marker = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        import torch
        from orchmoe_cli.core.checkpoint import save_checkpoint
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.AdamW(model.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        def write_adapter(staging):
            (staging / "adapter_config.json").write_text("{{}}")
            Path({str(marker)!r}).touch()
            time.sleep(60)
        save_checkpoint({str(tmp_path)!r}, 2, write_adapter, "", optimizer, scheduler, {{}})
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert child.poll() is None, "the saving subprocess died early"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()

    assert [name.startswith(".step-000002.") for name in _leftovers(tmp_path)] == [True]
    assert latest_checkpoint(tmp_path) == previous
    verify_checkpoint(previous)
    _save(tmp_path, 3)
    assert _leftovers(tmp_path) == []
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000003"


def test_keep_last_counts_only_verified_checkpoints(tmp_path: Path) -> None:
    for step in range(1, 6):
        _save(tmp_path, step, keep_last=2)
    names = lambda: sorted(p.name for p in (tmp_path / "checkpoints").iterdir())  # noqa: E731
    assert names() == ["step-000004", "step-000005"]

    _flip_byte(tmp_path / "checkpoints" / "step-000005" / "recipe.yaml")
    _save(tmp_path, 6, keep_last=2)
    assert names() == ["step-000004", "step-000005", "step-000006"]  # damaged 5 does not count, 4 survives
    _save(tmp_path, 7, keep_last=None)
    assert len(names()) == 4
    with pytest.raises(OrchmoeError, match="keep_last at least 1"):
        _save(tmp_path, 8, keep_last=0)


def test_run_lock(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        with pytest.raises(OrchmoeError, match=rf"is in use by another orchmoe run \(pid {os.getpid()}\)"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / ".lock").exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_file = tmp_path / ".lock"
    lock_file.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": "earlier"}))
    (tmp_path / "checkpoints" / ".step-000009.xyz.tmp").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="orchmoe_cli.core.run_lock"), RunLock(tmp_path):
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        assert _leftovers(tmp_path) == []  # starting a run clears what a killed one left
    assert f"pid {dead.pid}, which is no longer running" in caplog.text
    assert not lock_file.exists()


def test_disk_full_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    previous = _save(tmp_path, 1)
    real_write = checkpoint.atomic_write_bytes

    def full_disk(path: Path, data: bytes) -> None:
        if path.name == "optimizer.safetensors":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, data)

    monkeypatch.setattr(state_files, "atomic_write_bytes", full_disk)  # where the training state is written
    with pytest.raises(OrchmoeError, match="no space left"):
        _save(tmp_path, 2, keep_last=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]
    verify_checkpoint(previous)
    assert latest_checkpoint(tmp_path) == previous


def test_checkpoint_directories_get_the_umask(tmp_path: Path) -> None:
    """Not mkdtemp's 0700: other users of a shared machine can read results under the usual umask 022."""
    old = os.umask(0o022)
    try:
        path = _save(tmp_path, 1)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o755
    assert (path / "adapter_config.json").stat().st_mode & 0o777 == 0o644
