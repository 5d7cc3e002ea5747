"""Which held-out task `make demo` adapts to, chosen by a rule that looks at no score.

Few-shot adaptation trains on a task's adaptation pool (its instances after the evaluation ones) and is scored on
its evaluation instances, so a demo should adapt to a task whose pool answers look like its evaluation answers.
For every bundled held-out task this compares the pool's answers with those of the official evaluation set
(`Instances[:100]`) by `orchmoe_cli.analysis.pool_shift` (the share of each set its most frequent answer takes,
and the mean answer length in words: the measures `orchmoe adapt` warns with, though adapt compares the pool with
the instances it scores, the demo's first 20) and picks the task with the smallest mismatch, ties broken by name.

    python benchmarks/demo_task.py      # the table and the chosen task (the Makefile's DEMO_ADAPT_TASK)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from orchmoe_cli.analysis.pool_shift import AnswerShift, answer_shift

SAMPLE = REPO / "orchmoe_cli" / "data" / "sample"
EVALUATION = 100  # Instances[:100] are the official evaluation set; the pool follows


def shift(task: str) -> AnswerShift:
    """How unlike its evaluation answers a bundled held-out task's pool answers are."""
    instances = json.loads((SAMPLE / f"{task}.json").read_text(encoding="utf-8"))["Instances"]
    first = [instance["output"][0] for instance in instances]
    return answer_shift(first[:EVALUATION], first[EVALUATION:])


def choose() -> tuple[str, dict[str, AnswerShift]]:
    tasks = (SAMPLE / "test_tasks.txt").read_text(encoding="utf-8").split()
    table = {task: shift(task) for task in tasks}
    return min(sorted(table), key=lambda t: table[t].mismatch), table


if __name__ == "__main__":
    chosen, rows = choose()
    print("| task | top answer share (eval / pool) | mean words (eval / pool) | mismatch |\n|---|---|---|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row.top_evaluation:.2f} / {row.top_pool:.2f} | {row.words_evaluation:.2f} / "
              f"{row.words_pool:.2f} | {row.mismatch:.3f} |")
    print(f"\nchosen: {chosen}")
