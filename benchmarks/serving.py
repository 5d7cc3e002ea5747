"""How good is hard routing? OrchMoE as trained (soft: every prompt mixes the skills by its whole p(t|x)) against
OrchMoE as a stock multi-LoRA server runs it after `orchmoe export --to peft` (hard: each prompt is routed to its
most probable abstract task, whose exported LoRA peft applies with ``adapter_names=``), on held-out tasks.

    make demo                                   # trains runs/quickstart (OrchMoE on SmolLM2-135M)
    python benchmarks/serving.py                # runs/quickstart on the bundled held-out tasks, 20 instances each
    python benchmarks/serving.py --checkpoint RUN --instances 30 --out docs/results/serving/study

Writes <out>/serving.json (per task: instances, mean mass of the chosen abstract task, share of identical
answers, ROUGE-L soft and hard, the paired-bootstrap difference) and <out>/serving.md. Both sides generate with
the checkpoint's recipe settings (greedy, its max_new_tokens, stop at the first newline).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from rich.console import Console  # noqa: E402

from orchmoe_cli.adapters import load_adapted  # noqa: E402
from orchmoe_cli.analysis.bootstrap import instance_scores, paired_bootstrap  # noqa: E402
from orchmoe_cli.commands.common import resolve_target  # noqa: E402
from orchmoe_cli.core.base_models import load_model  # noqa: E402
from orchmoe_cli.core.evaluation import score_rows, select_instances  # noqa: E402
from orchmoe_cli.core.metrics import aggregate  # noqa: E402
from orchmoe_cli.core.model_export import export_model  # noqa: E402
from orchmoe_cli.core.recipe_data import prepare_data  # noqa: E402
from orchmoe_cli.core.results import instance_key  # noqa: E402


class HardRouted(torch.nn.Module):
    """What a gateway in front of a multi-LoRA server does: route each prompt with the checkpoint's classifier,
    then ask for that abstract task's exported adapter (peft applies one adapter per row)."""

    def __init__(self, router: Any, served: PeftModel) -> None:
        super().__init__()
        self.router, self.served = router, served

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        routes = self.router.describe_routing(input_ids, attention_mask)
        return self.served.generate(input_ids=input_ids, attention_mask=attention_mask,
                                    adapter_names=[r["adapter"] for r in routes], **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(REPO / "runs" / "quickstart"))
    parser.add_argument("--instances", type=int, default=20, help="evaluation instances per held-out task")
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "serving" / "quickstart"))
    args = parser.parse_args()
    console = Console(stderr=True)
    checkpoint, recipe = resolve_target(args.checkpoint, None, [f"eval.max_instances={args.instances}"])
    assert checkpoint is not None
    prepared = prepare_data(recipe, console)
    rows = select_instances(prepared.dataset[recipe.eval.split], recipe.eval)
    loaded = load_model(recipe.model)
    pristine = copy.deepcopy(loaded.model)
    soft = load_adapted(loaded.model, checkpoint).eval()
    console.print(f"soft routing: {len(rows)} instances")
    soft_rows = score_rows(soft, loaded.tokenizer, loaded.is_encoder_decoder, rows, recipe.eval, None)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = export_model(soft, loaded.tokenizer, checkpoint, recipe.model.name, "peft", [], Path(tmp) / "x")
        names = [entry["name"] for entry in manifest["adapters"]]
        served = PeftModel.from_pretrained(pristine, str(Path(tmp) / "x" / names[0]), adapter_name=names[0])
        for name in names[1:]:
            served.load_adapter(str(Path(tmp) / "x" / name), adapter_name=name)
        hard = HardRouted(soft, served.eval())
        console.print(f"hard routing through {len(names)} exported adapters")
        hard_rows = score_rows(hard, loaded.tokenizer, loaded.is_encoder_decoder, rows, recipe.eval, None)
    mass = {}  # each prompt's route again, one by one (cheap: the classifier reads only input embeddings)
    for row in rows:
        [route] = soft.describe_routing(torch.tensor([row["prompt_ids"]]))
        mass[instance_key(row)] = route
    report = summarise(soft_rows, hard_rows, mass, names)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps({"checkpoint": str(checkpoint), "instances_per_task":
                                                  args.instances, **report}, indent=2) + "\n")
    (out / "serving.md").write_text(markdown(report, str(checkpoint), args.instances))
    console.print(markdown(report, str(checkpoint), args.instances), markup=False, highlight=False)


def summarise(soft: list[dict], hard: list[dict], routes: dict[Any, dict], adapters: list[str]) -> dict[str, Any]:
    tasks = list(dict.fromkeys(r["task"] for r in soft))
    per_task = []
    for task in [*tasks, None]:
        s = [r for r in soft if task is None or r["task"] == task]
        h = [r for r in hard if task is None or r["task"] == task]
        keys = [instance_key(r) for r in s]
        hard_by_key = {instance_key(r): r for r in h}
        difference = paired_bootstrap(instance_scores(h, scale=100.0), instance_scores(s, scale=100.0))
        used = sorted({routes[k]["adapter"] for k in keys})
        per_task.append({
            "task": task or "all", "instances": len(s),
            "chosen_mass": round(sum(routes[k]["abstract_task_mass"] for k in keys) / len(keys), 4),
            "adapters_used": used,
            "same_answer": round(sum(hard_by_key[k]["prediction"] == r["prediction"] for k, r in zip(keys, s))
                                 / len(keys), 4),
            "rougeL_soft": aggregate(s)["rougeL"], "rougeL_hard": aggregate(h)["rougeL"],
            "hard_minus_soft": {"mean": round(difference.mean, 2), "low": round(difference.low, 2),
                                "high": round(difference.high, 2)},
        })
    return {"adapters": adapters, "tasks": per_task}


def markdown(report: dict[str, Any], checkpoint: str, instances: int) -> str:
    lines = [f"Soft (as trained) vs hard (one exported LoRA per prompt) routing of `{checkpoint}`, "
             f"{instances} instances per held-out task, ROUGE-L (SNI official metric).", "",
             "| task | n | mass of chosen abstract task | adapters used | same answer | soft | hard | hard - soft "
             "[95% CI] |", "|---|---:|---:|---|---:|---:|---:|---|"]
    for t in report["tasks"]:
        d = t["hard_minus_soft"]
        lines.append(f"| {t['task']} | {t['instances']} | {t['chosen_mass']:.3f} | {', '.join(t['adapters_used'])} "
                     f"| {t['same_answer']:.0%} | {t['rougeL_soft']:.2f} | {t['rougeL_hard']:.2f} | "
                     f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
