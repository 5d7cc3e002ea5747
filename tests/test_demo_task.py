"""`make demo` adapts to the held-out task that benchmarks/demo_task.py's score-free rule picks."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_makefile_adapts_to_the_task_the_rule_chooses() -> None:
    spec = importlib.util.spec_from_file_location("demo_task", REPO / "benchmarks" / "demo_task.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    chosen, table = module.choose()
    [configured] = re.findall(r"^DEMO_ADAPT_TASK := (\S+)$", (REPO / "Makefile").read_text(), flags=re.M)
    assert configured == chosen
    assert table["task1342_amazon_us_reviews_title"].shifted and not table[chosen].shifted  # its skewed pool
