"""Routing statistics on hand-built matrices with known answers, and `orchmoe inspect-routing` end to end."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_cli
from test_train import write_recipe

from orchmoe_cli.analysis import routing_stats as rs

S = 4  # skills in the hand-built allocations


def one_hot_allocation(rows: int, skills: int = S) -> np.ndarray:
    """Row i uses only skill i mod S, with certainty: (rows, heads=1, skills)."""
    probs = np.zeros((rows, 1, skills))
    probs[np.arange(rows), 0, np.arange(rows) % skills] = 1.0
    return probs


def test_one_hot_allocation_is_discrete_sparse_and_even() -> None:
    stats = rs.allocation_stats(one_hot_allocation(8))
    assert stats.discreteness == pytest.approx(0.0, abs=1e-9)
    assert stats.sparsity == pytest.approx(1 / S)
    assert stats.skill_usage == pytest.approx(1.0)
    assert stats.unused_skills == []


def test_uniform_allocation_is_maximally_smooth() -> None:
    stats = rs.allocation_stats(np.full((5, 2, S), 0.7))
    assert stats.discreteness == pytest.approx(1.0)
    assert stats.sparsity == 1.0 and stats.skill_usage == pytest.approx(1.0)


def test_duplicated_columns_leave_the_other_skills_unused() -> None:
    probs = np.zeros((6, 1, S))
    probs[:, 0, 0] = probs[:, 0, 1] = 0.9  # every task uses skills 0 and 1 equally, nothing else
    stats = rs.allocation_stats(probs)
    assert stats.discreteness == pytest.approx(np.log(2) / np.log(S))
    assert stats.unused_skills == [2, 3]
    assert stats.skill_usage == pytest.approx(np.log(2) / np.log(S))
    assert rs.allocation_warnings(stats, "all layers")


def test_collapsed_classifier_is_reported() -> None:
    probs = np.tile([0.94, 0.02, 0.02, 0.02], (40, 1))  # every prompt prefers abstract task 0
    stats = rs.classifier_stats(probs, ["A", "B"] * 20)
    assert stats.used_abstract_tasks == 1 and stats.argmax_counts == [40, 0, 0, 0]
    assert stats.nmi == pytest.approx(0.0) and stats.purity == pytest.approx(0.5)
    assert any("collapsed" in w for w in stats.warnings) and any("no prompt" in w for w in stats.warnings)


def test_uniform_classifier_is_reported_and_separating_one_is_pure() -> None:
    uniform = rs.classifier_stats(np.full((10, 4), 0.25), ["A"] * 10)
    assert uniform.router_entropy == pytest.approx(1.0) and any("uniform" in w for w in uniform.warnings)
    separating = rs.classifier_stats(np.eye(3)[[0, 0, 1, 1, 2, 2]], ["A", "A", "B", "B", "C", "C"])
    assert separating.router_entropy == pytest.approx(0.0, abs=1e-9)
    assert separating.marginal_entropy == pytest.approx(1)
    assert separating.purity == 1.0 and separating.nmi == pytest.approx(1.0) and not separating.warnings


def test_similarity_and_clustering_group_identical_routings() -> None:
    vectors = np.array([[1.0, 0, 0], [0, 1.0, 0], [0.99, 0.01, 0], [0.01, 0.99, 0]])
    similarity = rs.cosine_similarity(rs.centred(vectors))
    assert similarity[0, 2] > 0.9 and similarity[0, 1] < 0
    order, tree = rs.cluster_order(rs.centred(vectors))
    assert tree is not None and {frozenset(order[:2]), frozenset(order[2:])} == {frozenset({0, 2}), frozenset({1, 3})}
    assert rs.nearest(similarity, 0, [1, 2, 3], k=1) == [(2, pytest.approx(similarity[0, 2]))]


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """A tiny run of every routed method on tiny-llama: method -> (recipe, run directory)."""
    from conftest import _SNI_TEST_TASKS, _SNI_TRAIN_TASKS, _sni_task

    root = tmp_path_factory.mktemp("routing")
    sni = root / "sni"
    (sni / "tasks").mkdir(parents=True)
    categories = {"task002_beta_title": "Title Generation", "task101_delta_rewrite": "Question Rewriting"}
    for name in _SNI_TRAIN_TASKS + _SNI_TEST_TASKS:
        task = _sni_task(name, category=categories.get(name, "Question Answering"))
        (sni / "tasks" / f"{name}.json").write_text(json.dumps(task), encoding="utf-8")
    (sni / "train_tasks.txt").write_text("\n".join(_SNI_TRAIN_TASKS) + "\n", encoding="utf-8")
    (sni / "test_tasks.txt").write_text("\n".join(_SNI_TEST_TASKS) + "\n", encoding="utf-8")
    runs = {}
    for method in ("poly", "mhr", "orchmoe", "hyperloader"):
        run = root / f"run-{method}"
        recipe = write_recipe(root / f"{method}.yaml", sni, run, "tiny-llama", method, steps=3)
        assert run_cli(["train", str(recipe)]) == 0
        runs[method] = (recipe, run)
    return runs


EXPECTED_FILES = {
    "poly": {"heatmap.png", "layers.png", "dendrogram.png", "similarity.png"},
    "mhr": {"heatmap.png", "layers.png", "dendrogram.png", "similarity.png"},
    "orchmoe": {"heatmap.png", "layers.png", "dendrogram.png", "similarity.png", "task_abstract_tasks.png",
                "category_abstract_tasks.png", "allocation.png"},
    "hyperloader": {"dendrogram.png", "similarity.png"},
}


@pytest.mark.parametrize("method", sorted(EXPECTED_FILES))
def test_every_routed_method_produces_every_file(method: str, trained: dict, tmp_path: Path, capsys) -> None:
    recipe, run = trained[method]
    out = tmp_path / "routing"
    assert run_cli(["inspect-routing", str(run), "--data", str(recipe), "--out", str(out)]) == 0
    written = {p.name for p in out.iterdir()}
    assert EXPECTED_FILES[method] | {"routing.json", "routing.csv"} == written
    assert all((out / name).stat().st_size > 0 for name in written)
    printed = capsys.readouterr().out
    assert "task001_alpha_qa" in printed and str(out) in printed
    report = json.loads((out / "routing.json").read_text())
    rows = [r["name"] for r in report["rows"]]
    if method == "orchmoe":  # every real task, training and held out, through the classifier
        assert {"task001_alpha_qa", "task101_delta_rewrite"} <= set(rows)
        assert report["classifier"]["argmax_counts"] and 0 <= report["classifier"]["nmi"] <= 1
        assert "router entropy" in printed
    else:
        assert rows == ["task001_alpha_qa", "task002_beta_title", "task003_gamma_qa"]


def test_json_agrees_with_the_table_and_the_model(trained: dict, tmp_path: Path, capsys) -> None:
    from orchmoe_cli.adapters import load_adapted
    from orchmoe_cli.core.base_models import load_model
    from orchmoe_cli.recipe import load_recipe

    recipe, run = trained["mhr"]
    assert run_cli(["inspect-routing", str(run), "--format", "json", "--out", str(tmp_path / "a")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert run_cli(["inspect-routing", str(run), "--out", str(tmp_path / "b")]) == 0
    table = capsys.readouterr().out
    for row in report["rows"]:
        best = row["top_skills"][0]
        assert f"s{best['skill']} {best['weight']:.2f}" in table
        if row["nearest_training_tasks"]:
            assert row["nearest_training_tasks"][0]["task"] in table
    # the same numbers as the model's own eval-mode routing (the file was read without a model)
    checkpoint = sorted((run / "checkpoints").glob("step-*"))[-1]
    model = load_adapted(load_model(load_recipe(recipe).model).model, checkpoint)
    probabilities = model.routing_probabilities()
    assert list(probabilities) == report["layers"]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "a" / "routing.csv").read_text())))
    first = rows[0]
    row = model.task_names.index(first["task"])
    value = probabilities[first["layer"]][row, int(first["head"]), int(first["skill"])]
    assert float(first["probability"]) == pytest.approx(float(value), rel=1e-5)
    assert len(rows) == len(report["layers"]) * len(model.task_names) * model.method.n_heads * model.method.n_skills


def test_task_and_layer_filters(trained: dict, tmp_path: Path, capsys) -> None:
    _, run = trained["poly"]
    assert run_cli(["inspect-routing", str(run), "--task", "task001_alpha_qa", "--task", "task003_gamma_qa",
                    "--layer", "0", "--format", "json", "--out", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in report["rows"]] == ["task001_alpha_qa", "task003_gamma_qa"]
    assert report["layers"] and all(".layers.0." in name for name in report["layers"])
    assert run_cli(["inspect-routing", str(run), "--task", "task999_nope", "--out", str(tmp_path)]) == 2
    assert "--task task999_nope" in capsys.readouterr().err


@pytest.mark.parametrize("with_data", [False, True], ids=["no-data", "data"])
@pytest.mark.parametrize("option", ["--task", "--layer"])
def test_selection_errors_name_the_checkpoint(option: str, with_data: bool, trained: dict, tmp_path: Path,
                                              capsys) -> None:
    """A --task / --layer that matches nothing is one line naming the checkpoint and the option (never the
    recipe of --data, which it is not in, and never 'None' when there is no --data)."""
    recipe, run = trained["poly"]
    data = ["--data", str(recipe)] if with_data else []
    assert run_cli(["inspect-routing", str(run), *data, option, "nope", "--out", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # with --data: the data's progress lines first
    assert (len(lines) == 1 or with_data) and not any("None:" in line for line in lines), lines
    assert lines[-1].startswith(f"error: {run / 'checkpoints'}/step-") and f"{option} nope" in lines[-1], lines


def test_routing_probabilities_refuse_methods_without_allocation() -> None:
    from orchmoe_cli.adapters import attach_adapters
    from orchmoe_cli.core.base_models import load_model
    from orchmoe_cli.errors import OrchmoeError
    from orchmoe_cli.recipe import load_recipe

    recipe = load_recipe(None, ["model.name=tiny-llama", "method.name=lora"])
    model = attach_adapters(load_model(recipe.model).model, recipe.method, [])
    with pytest.raises(OrchmoeError, match="no learned task-skill allocation"):
        model.routing_probabilities()
    with pytest.raises(OrchmoeError, match="no task classifier"):
        model.task_distribution(torch.ones(1, 3, dtype=torch.long))


def test_paired_bootstrap_interval() -> None:
    from orchmoe_cli.analysis.bootstrap import paired_bootstrap

    a = {("t", f"i{k}"): 50.0 + (k % 5) for k in range(100)}  # keyed by (task, id)
    same = paired_bootstrap(a, a)
    assert same.mean == 0 and same.low == 0 and same.high == 0 and same.n == 100
    better = paired_bootstrap({k: v + 3.0 for k, v in a.items()}, a)
    assert better.low == pytest.approx(3.0) and better.high == pytest.approx(3.0)
    noisy = paired_bootstrap({k: v + (10.0 if int(k[1][1:]) % 2 else -10.0) for k, v in a.items()}, a)
    assert noisy.low < 0 < noisy.high  # a gap that is noise includes 0
    with pytest.raises(ValueError):
        paired_bootstrap({("t", "x"): 1.0}, {("t", "y"): 1.0})


def test_category_coherence() -> None:
    similarity = np.array([[1, 0.9, -0.5, -0.5], [0.9, 1, -0.5, -0.5], [-0.5, -0.5, 1, 0.8], [-0.5, -0.5, 0.8, 1]])
    coherent = rs.category_coherence(similarity, ["A", "A", "B", "B"], permutations=200)
    assert coherent is not None and coherent.within == pytest.approx(0.85) and coherent.between == pytest.approx(-0.5)
    assert coherent.pairs_within == 2 and coherent.p_value < 0.5
    assert rs.category_coherence(similarity, ["A", "B", "C", "D"]) is None  # no pair shares a category


def test_classifier_purity_needs_two_categories() -> None:
    """A table without a category column gives every task one category: purity and NMI would be 1 for any
    classifier, so they are not reported."""
    import numpy as np

    from orchmoe_cli.analysis.routing_stats import classifier_stats

    stats = classifier_stats(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), ["uncategorized"] * 3)
    assert stats.purity is None and stats.nmi is None and stats.purity_by_abstract_task == [None, None]
    assert stats.used_abstract_tasks == 2


def test_data_sharing_no_training_task_is_refused(trained: dict, tmp_path: Path, capsys) -> None:
    """`--data` describes the checkpoint's own tasks: a recipe whose training tasks are all different is refused,
    one that shares fewer than half is reported with a warning."""
    from conftest import _sni_task

    recipe, run = trained["poly"]
    other = tmp_path / "other-sni"
    (other / "tasks").mkdir(parents=True)
    names = {"train": ["task001_alpha_qa", "task201_x", "task202_y", "task203_z"], "test": ["task101_delta_rewrite"]}
    for name in names["train"] + names["test"]:
        (other / "tasks" / f"{name}.json").write_text(json.dumps(_sni_task(name)), encoding="utf-8")
    for split, listed in names.items():
        (other / f"{split}_tasks.txt").write_text("\n".join(listed) + "\n", encoding="utf-8")
    few = write_recipe(tmp_path / "few.yaml", other, tmp_path / "unused", "tiny-llama", "poly")
    assert run_cli(["inspect-routing", str(run), "--data", str(few), "--out", str(tmp_path / "r1")]) == 0
    assert "shares only 1 of the checkpoint's 3 training tasks" in capsys.readouterr().out
    (other / "train_tasks.txt").write_text("task201_x\ntask202_y\n", encoding="utf-8")
    none = write_recipe(tmp_path / "none.yaml", other, tmp_path / "unused", "tiny-llama", "poly")
    assert run_cli(["inspect-routing", str(run), "--data", str(none), "--out", str(tmp_path / "r2")]) == 2
    assert "shares none of the checkpoint's 3 training tasks" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()


def test_an_interrupted_report_leaves_the_earlier_one_whole(trained: dict, tmp_path: Path, monkeypatch) -> None:
    from orchmoe_cli.commands import inspect_routing

    _, run = trained["mhr"]
    out = tmp_path / "routing"
    assert run_cli(["inspect-routing", str(run), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(report: object, where: Path) -> list[Path]:
        (where / "heatmap.png").write_bytes(b"half a figure")
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect_routing, "plot_all", interrupted)
    assert run_cli(["inspect-routing", str(run), "--out", str(out)]) == 130  # Ctrl-C while the figures are drawn
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["routing"]  # no staging folder left beside it
