"""`orchmoe prepare` / `orchmoe eval` end to end on tiny models, and resuming an interrupted evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_runner import run_cli

from orchmoe_cli.core import evaluation as evaluate_module
from orchmoe_cli.core.metrics import aggregate


def write_recipe(path: Path, sni: Path, out: Path, model: str, *extra: str) -> Path:
    lines = [
        "data:", f"  source: {sni}", f"  cache_dir: {out / 'prepared'}", "  max_source_length: 128",
        "model:", f"  name: {model}", "  tiny: {hidden_size: 32, num_heads: 4, intermediate_size: 64}",
        "eval:", "  max_instances: 3", "  batch_size: 2", "  max_new_tokens: 6",
        "output:", f"  dir: {out}", *extra,
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prepare_reports_and_reuses_cache(sni_dir: Path, tmp_path: Path, capsys) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", sni_dir, tmp_path / "out", "tiny-t5")
    assert run_cli(["prepare", str(recipe)]) == 0
    first = capsys.readouterr().out
    assert "3 train tasks" in first.replace("\n", " ") or "train" in first
    assert run_cli(["prepare", str(recipe)]) == 0
    assert "from cache" in capsys.readouterr().out


@pytest.mark.parametrize("model", ["tiny-t5", "tiny-llama"])
def test_eval_end_to_end(model: str, sni_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", sni_dir, out, model)
    assert run_cli(["eval", str(recipe)]) == 0
    printed = capsys.readouterr().out
    assert "task101_delta_rewrite" in printed and "ROUGE-L" in printed
    result_dir = out / "eval-base"
    results = json.loads((result_dir / "results.json").read_text())
    rows = [json.loads(line) for line in (result_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 == results["n_instances"]  # 2 test tasks x 3 instances
    assert {r["task"] for r in rows} == {"task101_delta_rewrite", "task102_epsilon_qa"}
    assert results["results"] == aggregate(rows)
    for key in ("rougeL", "exact_match", "rougeL_for_task101_delta_rewrite", "rougeL_for_question_rewriting"):
        assert key in results["results"]
    assert results["versions"]["transformers"] and results["date"] and results["config"]["model"]["name"] == model
    assert {"task", "id", "prompt_sha256", "prediction", "references", "rougeL", "exact_match"} <= rows[0].keys()
    assert "| task101_delta_rewrite |" in (result_dir / "results.md").read_text()
    assert (result_dir / "recipe.yaml").is_file()
    assert not (result_dir / evaluate_module.PARTIAL_NAME).exists()


def test_interrupted_eval_resumes_from_written_predictions(sni_dir: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", sni_dir, out, "tiny-t5")
    original = evaluate_module.generate_predictions
    seen: list[str] = []

    def interrupted(model, tokenizer, is_encoder_decoder, rows, cfg, task_id, on_batch, shard=(0, 1)):
        def stop_after_two_batches(batch_rows, predictions):
            on_batch(batch_rows, predictions)
            seen.extend(r["id"] for r in batch_rows)
            if len(seen) >= 4:
                raise KeyboardInterrupt

        original(model, tokenizer, is_encoder_decoder, rows, cfg, task_id, stop_after_two_batches, shard)

    monkeypatch.setattr(evaluate_module, "generate_predictions", interrupted)
    assert run_cli(["eval", str(recipe)]) == 130
    assert not (out / "eval-base" / "results.json").exists()  # nothing final is half-written
    partial = (out / "eval-base" / evaluate_module.PARTIAL_NAME).read_text().splitlines()
    assert len(partial) == 1 + len(seen) and 4 <= len(seen) < 6

    generated: list[str] = []

    def counting(model, tokenizer, is_encoder_decoder, rows, cfg, task_id, on_batch, shard=(0, 1)):
        generated.extend(r["id"] for r in rows)
        original(model, tokenizer, is_encoder_decoder, rows, cfg, task_id, on_batch, shard)

    monkeypatch.setattr(evaluate_module, "generate_predictions", counting)
    assert run_cli(["eval", str(recipe)]) == 0
    assert len(generated) == 6 - len(seen) and not set(generated) & set(seen)
    rows = (out / "eval-base" / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 6

    generated.clear()
    assert run_cli(["eval", str(recipe)]) == 0  # identical evaluation: served from the finished results
    assert generated == []


def test_eval_with_base_after_training(sni_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", sni_dir, out, "tiny-llama", "method:", "  name: orchmoe",
                          "  rank: 2", "  n_skills: 2", "train:", "  steps: 2", "  batch_size: 2")
    assert run_cli(["train", str(recipe)]) == 0
    assert run_cli(["eval", str(recipe), "eval.checkpoint=latest", "--with-base"]) == 0
    printed = capsys.readouterr().out
    assert "base ROUGE-L" in printed and "step-000002 ROUGE-L" in printed
    adapted = list(out.glob("eval-step-000002-*"))
    assert (out / "eval-base" / "results.json").is_file() and len(adapted) == 1
    results = json.loads((adapted[0] / "results.json").read_text())
    assert results["checkpoint"] == str((out / "checkpoints" / "step-000002").resolve())
    assert len(results["checkpoint_sha256"]) == 64


def test_eval_directories_of_like_named_checkpoints_differ(tmp_path: Path) -> None:
    """step-000100 of two runs must not overwrite each other's results."""
    from orchmoe_cli.core.evaluation import eval_output_dir
    from orchmoe_cli.recipe import load_recipe

    dirs = {eval_output_dir(load_recipe(None, [f"eval.checkpoint={tmp_path / run / 'step-000100'}",
                                               f"output.dir={tmp_path}"])) for run in ("a", "b")}
    assert len(dirs) == 2 and all(d.name.startswith("eval-step-000100-") for d in dirs)


def test_eval_checkpoint_missing_is_one_line(sni_dir: Path, tmp_path: Path, capsys) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", sni_dir, tmp_path / "out", "tiny-t5")
    assert run_cli(["eval", str(recipe), "eval.checkpoint=latest"]) == 2
    err = capsys.readouterr().err.strip()
    assert "eval.checkpoint" in err and len(err.splitlines()) == 1


def test_eval_unknown_task_is_refused(sni_dir: Path, tmp_path: Path, capsys) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", sni_dir, tmp_path / "out", "tiny-t5")
    assert run_cli(["eval", str(recipe), "eval.tasks=[task999_nope]"]) == 2
    err = capsys.readouterr().err
    assert "eval.tasks (set on the command line): task999_nope not in the prepared 'test' split" in err


def test_checkpoint_none_means_the_base_model(sni_dir: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", sni_dir, tmp_path / "out", "tiny-t5")
    assert run_cli(["eval", str(recipe), "eval.checkpoint=none", "eval.max_instances=1"]) == 0
    assert (tmp_path / "out" / "eval-base" / "results.json").is_file()


def test_edited_adapter_config_is_evaluated_again_and_the_checkpoint_method_recorded(sni_dir: Path,
                                                                                     tmp_path: Path, capsys) -> None:
    """The fingerprint covers the adapter config (not only the weights); results name the checkpoint's method."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", sni_dir, out, "tiny-llama", "method:", "  name: poly", "  rank: 2",
                          "  n_skills: 2", "train:", "  steps: 2", "  batch_size: 2")
    assert run_cli(["train", str(recipe)]) == 0
    adapter = tmp_path / "adapter"
    shutil.copytree(out / "checkpoints" / "step-000002", adapter)
    (adapter / "manifest.json").unlink()  # a plain adapter directory, free to edit
    args = ["eval", str(recipe), f"eval.checkpoint={adapter}", "eval.max_instances=1", "method.name=lora"]
    assert run_cli(args) == 0
    printed = capsys.readouterr().out
    assert "holds a poly adapter" in printed
    results_path = next(out.glob("eval-adapter-*/results.json"))
    results = json.loads(results_path.read_text())
    assert results["config"]["method"]["name"] == "poly"
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["method"]["alpha"] = 4000.0
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert run_cli(args) == 0
    assert "reusing the identical evaluation" not in capsys.readouterr().out
    assert json.loads(results_path.read_text())["fingerprint"] != results["fingerprint"]


def test_rerunning_eval_keeps_other_files(sni_dir: Path, tmp_path: Path) -> None:
    """Only the four artifacts are replaced: a user's notes and plots in eval-base/ survive a re-run."""
    recipe = write_recipe(tmp_path / "r.yaml", sni_dir, tmp_path / "out", "tiny-t5")
    assert run_cli(["eval", str(recipe), "eval.max_instances=1"]) == 0
    results = tmp_path / "out" / "eval-base"
    (results / "notes.txt").write_text("my notes\n")
    assert run_cli(["eval", str(recipe), "eval.max_instances=2"]) == 0
    assert (results / "notes.txt").read_text() == "my notes\n"
    assert json.loads((results / "results.json").read_text())["n_instances"] == 4
    assert not [p for p in results.iterdir() if p.name.startswith(".")]


def test_latest_checkpoint_pruned_while_loading_falls_back_to_the_next(sni_dir: Path, tmp_path: Path,
                                                                      monkeypatch) -> None:
    """A training run prunes the checkpoint eval.checkpoint=latest just found: load the next newest."""
    from orchmoe_cli.adapters import loading

    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", sni_dir, out, "tiny-t5", "method:", "  name: lora", "  rank: 2",
                          "train:", "  steps: 2", "  batch_size: 2", "  save_every: 1")
    assert run_cli(["train", str(recipe)]) == 0
    real = loading.load_adapted

    def pruned_first(base, checkpoint):  # noqa: ANN001 - the signature of load_adapted
        if Path(checkpoint).name == "step-000002":
            shutil.rmtree(checkpoint)
        return real(base, checkpoint)

    monkeypatch.setattr(loading, "load_adapted", pruned_first)
    assert run_cli(["eval", str(recipe), "eval.checkpoint=latest", "eval.max_instances=1"]) == 0
    results = json.loads(next(out.glob("eval-step-000001-*/results.json")).read_text())
    assert results["checkpoint"].endswith("step-000001")
