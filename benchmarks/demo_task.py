"""Which held-out task `make demo` adapts to, chosen by a rule that looks at no score.

Few-shot adaptation trains on a task's adaptation pool (its instances after the evaluation ones) and is scored on
its evaluation instances, so a demo should adapt to a task whose pool answers look like its evaluation answers.
For every bundled held-out task this compares the two sets' answers by (a) how much of each set its most frequent
answer takes (a skewed pool teaches that answer: task1342's pool is 24% "Five Stars" against 2% of its evaluation
answers) and (b) the mean answer length in words, and picks the task with the smallest mismatch
max(|top share pool - top share eval|, |log(mean length pool / mean length eval)|), ties broken by name.

    python benchmarks/demo_task.py      # the table and the chosen task (the Makefile's DEMO_ADAPT_TASK)
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[1] / "orchmoe_cli" / "data" / "sample"
EVALUATION = 100  # Instances[:100] are the official evaluation set; the pool follows


def _answers(instances: list[dict]) -> list[str]:
    return [instance["output"][0].strip().lower() for instance in instances]


def mismatch(task: str) -> dict[str, float]:
    """Top-answer shares, mean answer lengths and the mismatch of a bundled held-out task's pool and evaluation."""
    instances = json.loads((SAMPLE / f"{task}.json").read_text(encoding="utf-8"))["Instances"]
    evaluation, pool = _answers(instances[:EVALUATION]), _answers(instances[EVALUATION:])
    top = {name: Counter(answers).most_common(1)[0][1] / len(answers)
           for name, answers in (("eval", evaluation), ("pool", pool))}
    length = {name: sum(len(a.split()) for a in answers) / len(answers)
              for name, answers in (("eval", evaluation), ("pool", pool))}
    score = max(abs(top["pool"] - top["eval"]), abs(math.log(length["pool"] / length["eval"])))
    return {"top_eval": top["eval"], "top_pool": top["pool"], "length_eval": length["eval"],
            "length_pool": length["pool"], "mismatch": score}


def choose() -> tuple[str, dict[str, dict[str, float]]]:
    tasks = (SAMPLE / "test_tasks.txt").read_text(encoding="utf-8").split()
    table = {task: mismatch(task) for task in tasks}
    return min(sorted(table), key=lambda t: table[t]["mismatch"]), table


if __name__ == "__main__":
    chosen, rows = choose()
    print("| task | top answer share (eval / pool) | mean words (eval / pool) | mismatch |\n|---|---|---|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['top_eval']:.2f} / {row['top_pool']:.2f} | {row['length_eval']:.2f} / "
              f"{row['length_pool']:.2f} | {row['mismatch']:.3f} |")
    print(f"\nchosen: {chosen}")
