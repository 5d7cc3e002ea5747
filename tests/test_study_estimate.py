"""The study's plan estimates: the pace of finished pieces, this scale first, then the `cpu` scale."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _estimate_module():
    spec = importlib.util.spec_from_file_location("study_estimate", REPO / "benchmarks" / "study" / "estimate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record), encoding="utf-8")


def test_each_piece_is_priced_from_the_nearest_measurement(tmp_path: Path) -> None:
    here, cpu = tmp_path / "cpu-10x", tmp_path / "cpu"
    _write(here / "train" / "orchmoe.json", {"step": 1000, "wall_s": 6000.0})
    _write(cpu / "train" / "orchmoe.json", {"step": 100, "wall_s": 700.0})
    _write(cpu / "train" / "lora.json", {"step": 100, "wall_s": 300.0})
    _write(here / "zero-shot" / "orchmoe.json", {"wall_s": 170.0})
    _write(here / "zero-shot" / "base.json", {"wall_s": 450.0})
    _write(cpu / "in-distribution" / "lora.json", {"wall_s": 70.0})
    (cpu / "adapt" / "lora").mkdir(parents=True)
    (cpu / "adapt" / "lora" / "adapt_results.jsonl").write_text(
        "".join(json.dumps({"mode": m, "wall_s": w}) + "\n" for m, w in
                (("zero_shot", 10.0), ("lora_scratch", 50.0), ("lora_scratch", 70.0), ("lora", 90.0))))
    module = _estimate_module()
    estimator = module.Estimator([here, cpu, tmp_path / "absent"])
    assert estimator.training("orchmoe", 1000) == pytest.approx(6000.0)  # this scale's own pace wins
    assert estimator.training("lora", 1000) == pytest.approx(3000.0)  # else the cpu scale's, per step
    assert estimator.training("poly", 10) == pytest.approx(60.0)  # an untrained method: the median pace here
    assert estimator.whole("zero-shot", base=False) == 170.0 and estimator.whole("zero-shot", base=True) == 450.0
    assert estimator.whole("in-distribution", base=False) == 70.0 and estimator.whole("routing", False) is None
    assert estimator.sweep({"zero_shot": 5, "lora_scratch": 2}) == pytest.approx(5 * 10 + 2 * 60)
    assert estimator.sweep({"mhr": 3}) == pytest.approx(3 * (50 + 70 + 90) / 3)  # unmeasured mode: trained cells' mean
    assert [module.duration(s) for s in (None, 30, 600, 7200)] == ["?", "30 s", "10 min", "2.0 h"]
