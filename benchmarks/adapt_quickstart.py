"""Few-shot adaptation on the bundled sample: the demo's OrchMoE and an MHR trained for the purpose.

Two `orchmoe adapt` sweeps, one per trained checkpoint, task by task, into one results directory:

    make demo                                  # trains runs/quickstart (OrchMoE), deterministic on CPU
    python benchmarks/adapt_quickstart.py      # trains runs/quickstart-mhr if missing, then both sweeps

- `recipes/quickstart.yaml`: modes zero_shot, lora_scratch, orchmoe -> <out>/orchmoe/
- `recipes/quickstart-mhr.yaml` (same budget and LoRA scale): zero_shot, mhr, mhr_z, mhr_mu -> <out>/mhr/

`lora_scratch` is run once: it starts from the bare base model, and the two checkpoints' trainable counts
are within 0.5% of each other. Resumable at the level of each cell (that is `orchmoe adapt`'s own rule):
rerun the same command and finished cells are skipped. The two sweeps may run side by side, e.g. one
thread each on 2 cores (`OMP_NUM_THREADS=1 ... --sweeps orchmoe` and `... --sweeps mhr`). After every task
the combined table, JSON and sample-efficiency plot over all cells so far are rewritten in <out>/ (default
docs/results/adapt-quickstart).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from orchmoe_cli.analysis.adaptation_report import (  # noqa: E402
    RESULTS,  # noqa: E402
    merge_results,
    write_summary,
)

SWEEPS = {"orchmoe": REPO / "recipes" / "quickstart.yaml", "mhr": REPO / "recipes" / "quickstart-mhr.yaml"}
TASKS = (REPO / "orchmoe_cli" / "data" / "sample" / "test_tasks.txt").read_text().split()


def orchmoe(*args: str) -> None:
    command = [str(Path(sys.executable).parent / "orchmoe"), *args]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=REPO, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "adapt-quickstart")
    parser.add_argument("--tasks", default=",".join(TASKS), help="held-out tasks, in the order they are run")
    parser.add_argument("--sweeps", default=",".join(SWEEPS), help="which checkpoints' sweeps to run (two "
                        "processes with one thread each may run one sweep apiece)")
    args = parser.parse_args()
    out = args.out.resolve()
    if not (REPO / "runs" / "quickstart" / "checkpoints").is_dir():
        sys.exit("runs/quickstart has no checkpoint: run `make demo` first")
    if "mhr" in args.sweeps and not (REPO / "runs" / "quickstart-mhr" / "checkpoints").is_dir():
        orchmoe("train", str(SWEEPS["mhr"]))
    for task in args.tasks.split(","):
        for name in args.sweeps.split(","):
            orchmoe("adapt", str(SWEEPS[name]), "--tasks", task, f"adapt.output_dir={out / name}")
        summary = write_summary(out, merge_results([out / name / RESULTS for name in SWEEPS]))
        print(f"{summary['cells']} cells so far -> {out}/adapt_summary.md", flush=True)


if __name__ == "__main__":
    main()
