"""`benchmarks/gpu_check.sh --dry-run`: the GPU check's steps on the CPU in float32 at the smallest sizes, so the
script a GPU run needs stays runnable. (The GPU run itself: benchmarks/README.md.)"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchmoe_cli.adapters.registry import SPECS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def table_rows(stdout: str) -> dict[str, tuple[str, str]]:
    """check -> (result, numbers), from the Markdown table the script prints."""
    rows = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 3 and cells[0] != "check":
            rows[cells[0]] = (cells[1], cells[2])
    return rows


@pytest.mark.slow  # 30 s on 2 idle cores, about 2 minutes when they are busy: `make test-all`
def test_the_dry_run_exercises_every_registered_method_on_the_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--workdir", str(tmp_path / "work")], capture_output=True,
                          text=True, env=env, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = table_rows(done.stdout)
    for method, spec in SPECS.items():
        assert rows[f"train {method}"][0] == "PASS", rows[f"train {method}"]
        assert rows[f"eval {method}"][0] == "PASS", rows[f"eval {method}"]
        adapt = [result for check, (result, _) in rows.items() if check.startswith(f"adapt {method} (")]
        assert adapt == ["PASS"], adapt
        assert rows[f"deterministic {method}"][0] == "PASS", rows[f"deterministic {method}"]
        if spec.family.mergeable:
            assert rows[f"merge {method} fp32 vs fp64"][0] == "PASS", rows[f"merge {method} fp32 vs fp64"]
    # what needs CUDA says so instead of passing
    for check in ("merge bf16 vs fp32 (every mergeable method)", "sync census (every method)"):
        assert rows[check][0] == "SKIP" and rows[check][1].startswith("skipped: no GPU"), rows[check]
    assert rows["speed.py --quick generation"][0] == "SKIP"
    assert not any(result == "FAIL" for result, _ in rows.values())


def test_the_dry_run_of_one_method_runs_in_the_fast_suite(tmp_path: Path) -> None:
    """The script's commands run on every CI run, for one method (every part for every method: the slow test)."""
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--methods", "orchmoe", "--skip",
                           "deterministic,speed", "--workdir", str(tmp_path / "w")],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = table_rows(done.stdout)
    assert all(rows[f"{part} orchmoe"][0] == "PASS" for part in ("train", "eval")), rows
    assert not any(result == "FAIL" for result, _ in rows.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_without_a_gpu_the_full_check_refuses_and_points_to_the_dry_run(capsys: pytest.CaptureFixture[str],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # its dataclasses look their module up
    monkeypatch.setattr(sys, "path", list(sys.path))  # it puts the repository first
    spec.loader.exec_module(module)
    assert module.main(["--methods", "lora"]) == 2
    assert "--dry-run" in capsys.readouterr().err
