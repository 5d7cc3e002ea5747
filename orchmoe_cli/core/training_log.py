"""Training metrics: a JSONL file (always; trackers log through accelerate) and a loss-curve PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchmoe_cli.core.figures import pyplot
from orchmoe_cli.core.records import JsonLines, read_jsonl
from orchmoe_cli.fsutil import json_text


class MetricsLogger:
    """Appends one JSON object per log call to ``<run_dir>/metrics.jsonl`` (main process only)."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self._handle = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._path = run_dir / "metrics.jsonl"
        _read(self._path).repair()  # a line a kill cut short is dropped, so the next one stands on its own
        self._handle = self._path.open("a", encoding="utf-8")

    def log(self, row: dict[str, Any]) -> None:
        if self._handle is None:
            return
        self._handle.write(json_text(row, self._path) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every logged row of a run's ``metrics.jsonl`` (none when there is none); a file that is not a run's metrics
    is one line naming it and the line."""
    return _read(path).records


def _read(path: Path) -> JsonLines:
    return read_jsonl(path, lambda row: None if "step" in row else "a metrics row has a step", cut_ok=True,
                      fix="; it is not this run's metrics: move it, or choose another output.dir")


def plot_loss_curve(metrics_path: Path, png_path: Path) -> None:
    """Training (and validation) loss against step, as a PNG next to the metrics."""
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train:
        return
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
