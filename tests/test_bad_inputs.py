"""Bad input to every command: exit code 2, ONE line on stderr naming the file and/or field, no traceback,
and the run's output directory left exactly as it was.

The suite is one table (``CASES``) and one parametrized test. To cover a new command or a new kind of
bad input, add a row: an id, the command line (placeholders below), the words the error line must
contain, optionally the "what to do" words, and optionally a ``setup`` that breaks a file first.

Placeholders in ``argv``, ``expect`` and ``hint``: ``{recipe}`` (a valid recipe for tiny-t5 whose
``output.dir`` is ``{out}``), ``{sni}`` (a private copy of a valid SNI directory), ``{task}`` (its test task
file ``task101_delta_rewrite.json``), ``{out}``, ``{ck}`` (a private copy of an adapter checkpoint trained
once per module, when the row's setup asks for one), ``{tmp}`` (the case's scratch directory).

The disk-full tests at the end simulate ENOSPC while ``train`` saves a checkpoint and while ``eval``
writes its results: exit 2 with a "no space left" line, and the previous checkpoint / results intact.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from orchmoe_cli.cli import main

TRAIN_TASKS = ("task001_alpha_qa", "task002_beta_title", "task003_gamma_qa")
TEST_TASKS = ("task101_delta_rewrite", "task102_epsilon_qa")
BROKEN = "task101_delta_rewrite"  # the task file the SNI rows break
WEIGHTS = "adapter_model.safetensors"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
CONFIG = "adapter_config.json"


# --------------------------------------------------------------------------- fixtures and helpers


def sni_task(name: str, n_instances: int = 4) -> dict[str, Any]:
    """A valid task file in the upstream schema."""
    return {
        "Categories": ["Question Answering"],
        "Definition": [f"In this task ({name}) you answer a short question"],
        "Input_language": ["English"], "Output_language": ["English"], "Instruction_language": ["English"],
        "Positive Examples": [{"input": "pos in", "output": "pos out", "explanation": "why"}],
        "Negative Examples": [],
        "Instances": [{"id": f"{name}-{i}", "input": f"Question {i}?", "output": [f"answer {i}"]}
                      for i in range(n_instances)],
    }


def write_sni(root: Path) -> Path:
    (root / "tasks").mkdir(parents=True)
    for name in TRAIN_TASKS + TEST_TASKS:
        (root / "tasks" / f"{name}.json").write_text(json.dumps(sni_task(name), indent=1), encoding="utf-8")
    (root / "train_tasks.txt").write_text("\n".join(TRAIN_TASKS) + "\n", encoding="utf-8")
    (root / "test_tasks.txt").write_text("\n".join(TEST_TASKS) + "\n", encoding="utf-8")
    return root


def recipe_text(sni: Path, cache: Path, out: Path, method: str = "lora") -> str:
    return f"""\
data:
  source: {sni}
  cache_dir: {cache}
  num_pos_examples: 0
  max_source_length: 96
  max_target_length: 16
model:
  name: tiny-t5
  tiny: {{hidden_size: 32, num_layers: 2, num_heads: 4, intermediate_size: 64}}
method:
  name: {method}
  rank: 4
  alpha: 4
train:
  steps: 2
  batch_size: 4
  lr: 0.03
  log_every: 1
eval:
  max_instances: 2
  batch_size: 2
  max_new_tokens: 4
output:
  dir: {out}
"""


@contextlib.contextmanager
def cli_logging():
    """Log records reach stderr as in a real `orchmoe` process (pytest's capture handler would swallow them)."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = []
    try:
        yield
    finally:
        root.handlers = saved


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr), colour codes removed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), cli_logging():
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        else:  # pragma: no cover - main always exits
            code = -1
    return code, ANSI.sub("", out.getvalue()), ANSI.sub("", err.getvalue())


def snapshot(root: Path) -> dict[str, str] | None:
    """Every file (sha256) and directory under ``root``; None if it does not exist."""
    if not root.exists():
        return None
    return {p.relative_to(root).as_posix(): "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


@dataclass(frozen=True)
class Shared:
    """Built once per module: a prepared-data cache and a run trained for one step (tiny-t5, lora)."""

    root: Path
    cache: Path
    run: Path

    @property
    def checkpoint(self) -> Path:
        return self.run / "checkpoints" / "step-000001"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Shared:
    root = tmp_path_factory.mktemp("bad_inputs_shared")
    sni = write_sni(root / "sni")
    cache, run = root / "prepared", root / "run"
    recipe = root / "recipe.yaml"
    recipe.write_text(recipe_text(sni, cache, run), encoding="utf-8")
    code, _, err = run_main(["train", str(recipe), "train.steps=1"])
    assert code == 0, err
    assert (run / "checkpoints" / "step-000001" / "manifest.json").is_file()
    return Shared(root, cache, run)


@dataclass
class Env:
    """What a row's setup may change; everything lives under the case's own tmp directory."""

    tmp: Path
    sni: Path
    out: Path
    recipe: Path
    shared: Shared
    ck: Path | None = None

    @property
    def task(self) -> Path:
        return self.sni / "tasks" / f"{BROKEN}.json"

    def checkpoint(self, manifest: bool = True) -> Path:
        """A private copy of the trained adapter checkpoint (without its manifest: a plain adapter directory)."""
        self.ck = self.tmp / "ck"
        shutil.copytree(self.shared.checkpoint, self.ck)
        if not manifest:
            (self.ck / "manifest.json").unlink()
        return self.ck

    def fill(self, text: str) -> str:
        return text.format(recipe=self.recipe, sni=self.sni, task=self.task, out=self.out, ck=self.ck, tmp=self.tmp)


# --------------------------------------------------------------------------- setups used by the rows


def recipe_file(text: str | bytes) -> Callable[[Env], None]:
    """Replace the recipe file's content."""
    def setup(env: Env) -> None:
        data = text if isinstance(text, bytes) else env.fill(text).encode()
        env.recipe.write_bytes(data)
    return setup


def out_files(files: dict[str, str]) -> Callable[[Env], None]:
    """The user's own files in the output directory (``{out}``)."""
    def setup(env: Env) -> None:
        env.out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (env.out / name).write_text(text)
    return setup


def task_bytes(data: bytes) -> Callable[[Env], None]:
    return lambda env: env.task.write_bytes(data)


def task_edit(edit: Callable[[dict], Any]) -> Callable[[Env], None]:
    """Apply ``edit`` to the parsed test task file (a returned value replaces the whole document)."""
    def setup(env: Env) -> None:
        task = json.loads(env.task.read_text(encoding="utf-8"))
        replaced = edit(task)
        env.task.write_text(json.dumps(task if replaced is None else replaced), encoding="utf-8")
    return setup


def task_set(path: tuple, value: Any) -> Callable[[Env], None]:
    def edit(task: dict) -> None:
        node = task
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return task_edit(edit)


def task_del(path: tuple) -> Callable[[Env], None]:
    def edit(task: dict) -> None:
        node = task
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return task_edit(edit)


def split_file(name: str, text: str) -> Callable[[Env], None]:
    return lambda env: (env.sni / name).write_text(text, encoding="utf-8")


def huge_instance(env: Env) -> None:
    """A 50 MB single instance input, written without building the whole document twice."""
    task = sni_task(BROKEN)
    task["Instances"][0]["input"] = "@@HUGE@@"
    head, tail = json.dumps(task).split("@@HUGE@@")
    with env.task.open("w", encoding="utf-8") as handle:
        handle.write(head)
        chunk = "lorem ipsum " * 4096
        for _ in range(50 * 2**20 // len(chunk) + 1):
            handle.write(chunk)
        handle.write(tail)


def checkpoint(change: Callable[[Path], None] | None = None, manifest: bool = True) -> Callable[[Env], None]:
    """A private copy of the trained checkpoint, then ``change(ck)``."""
    def setup(env: Env) -> None:
        ck = env.checkpoint(manifest)
        if change is not None:
            change(ck)
    return setup


def truncate(name: str) -> Callable[[Path], None]:
    def change(ck: Path) -> None:
        data = (ck / name).read_bytes()
        (ck / name).write_bytes(data[: len(data) // 2])
    return change


def flip_last_byte(name: str) -> Callable[[Path], None]:
    def change(ck: Path) -> None:
        data = bytearray((ck / name).read_bytes())
        data[-1] ^= 0x01
        (ck / name).write_bytes(bytes(data))
    return change


def remove(name: str) -> Callable[[Path], None]:
    return lambda ck: (ck / name).unlink()


def edit_json(name: str, edit: Callable[[Any], None]) -> Callable[[Path], None]:
    def change(ck: Path) -> None:
        data = json.loads((ck / name).read_text(encoding="utf-8"))
        edit(data)
        (ck / name).write_text(json.dumps(data), encoding="utf-8")
    return change


def grow_first_tensor(ck: Path) -> None:
    tensors = load_file(str(ck / WEIGHTS))
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:])
    save_file(tensors, str(ck / WEIGHTS), metadata={"format": "pt"})


def add_tensor(ck: Path) -> None:
    tensors = load_file(str(ck / WEIGHTS))
    tensors["base.extra.lora_A"] = torch.zeros(2)
    save_file(tensors, str(ck / WEIGHTS), metadata={"format": "pt"})


def peft_lora_without_rank(env: Env) -> None:
    """A peft-layout LoRA checkpoint whose adapter_config.json lacks `r` and `lora_alpha`."""
    env.ck = env.tmp / "peft"
    env.ck.mkdir()
    module = "base_model.model.encoder.block.0.layer.0.SelfAttention.q"
    save_file({f"{module}.lora_A.weight": torch.zeros(4, 32), f"{module}.lora_B.weight": torch.zeros(32, 4)},
              str(env.ck / WEIGHTS), metadata={"format": "pt"})
    (env.ck / CONFIG).write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q"]}), encoding="utf-8")


def previous_run(change: Callable[[Path], None] | None = None) -> Callable[[Env], None]:
    """``{out}`` becomes a copy of the trained run (for --resume rows); ``change`` gets its checkpoint."""
    def setup(env: Env) -> None:
        shutil.rmtree(env.out)
        shutil.copytree(env.shared.run, env.out)
        if change is not None:
            change(env.out / "checkpoints" / "step-000001")
    return setup


def live_lock(env: Env) -> None:
    """The run directory is locked by a live process on this host (pytest's parent)."""
    (env.out / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename}))


def chain(*setups: Callable[[Env], None]) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        for step in setups:
            step(env)
    return setup


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    expect: tuple[str, ...]  # the one error line contains each (the file and/or the field)
    hint: str | None = None  # ... and this "what to do" text, where sensible
    setup: Callable[[Env], None] | None = None
    fresh_out: bool = False  # output.dir does not exist before the command (and must not after it)
    slow: bool = False


ADAPT = ("adapt.checkpoint={ck}", "data.max_test_instances=2", "--modes", "lora", "--shots", "1", "--tasks", BROKEN)


def P(command: str, *overrides: str) -> tuple[str, ...]:  # noqa: N802 - short row builder
    return (command, "{recipe}", *overrides)


TASK_FIX = "fix the task file"

CASES: list[Case] = [
    # ---- recipes: keys, types, ranges
    Case("recipe-unknown-top-key", P("prepare", "foo.bar=1"), ("{recipe}", "foo"), "valid keys"),
    Case("recipe-unknown-key-typo", P("train", "train.stpes=3"), ("{recipe}", "train.stpes"), "did you mean 'steps'"),
    Case("recipe-wrong-type-int", P("train", "train.steps=abc"), ("{recipe}", "train.steps", "integer")),
    Case("recipe-wrong-type-bool", P("prepare", "data.add_definition=maybe"), ("{recipe}", "data.add_definition")),
    Case("recipe-wrong-type-list", P("eval", "eval.tasks=notalist"), ("{recipe}", "eval.tasks", "list")),
    Case("recipe-section-not-mapping", P("train", "train=5"), ("{recipe}", "train", "mapping")),
    Case("recipe-negative-steps", P("train", "train.steps=-1"), ("{recipe}", "train.steps", ">= 1")),
    Case("recipe-zero-batch-size", P("train", "train.batch_size=0"), ("{recipe}", "train.batch_size")),
    Case("recipe-zero-max-instances", P("eval", "eval.max_instances=0"), ("{recipe}", "eval.max_instances")),
    Case("recipe-zero-lr", P("train", "train.lr=0"), ("{recipe}", "train.lr", "> 0")),
    Case("recipe-nan-lr", P("train", "train.lr=.nan"), ("{recipe}", "train.lr")),
    Case("recipe-nan-dropout", P("train", "method.dropout=.nan"), ("{recipe}", "method.dropout")),
    Case("recipe-negative-seed", P("train", "train.seed=-1"), ("{recipe}", "train.seed")),
    Case("recipe-seed-over-32-bits", P("train", "train.seed=4294967296"), ("{recipe}", "train.seed")),
    Case("recipe-source-length-too-small", P("prepare", "data.max_source_length=4"),
         ("{recipe}", "data.max_source_length", ">= 8")),
    Case("recipe-dropout-one", P("train", "method.dropout=1.5"), ("{recipe}", "method.dropout", "< 1")),
    Case("recipe-empty-target-modules", P("train", "method.target_modules=[]"),
         ("{recipe}", "method.target_modules")),
    Case("recipe-budget-unreadable", P("train", "method.budget=lots"), ("{recipe}", "method.budget"), "like 2.5M"),
    Case("recipe-budget-infinite", P("train", "method.budget=1e999"), ("{recipe}", "method.budget")),
    Case("recipe-budget-too-small", P("train", "method.budget=10"), ("method.budget", "too small")),
    Case("recipe-unknown-method", P("train", "method.name=lorax"), ("{recipe}", "method.name"), "did you mean 'lora'"),
    Case("recipe-method-none-train", P("train", "method.name=none"), ("{recipe}", "method.name"), "pick lora"),
    Case("recipe-unknown-dtype", P("eval", "model.dtype=float64"), ("{recipe}", "model.dtype")),
    Case("recipe-unknown-model", P("eval", "model.name={tmp}/no-such-model"), ("model.name", "no-such-model")),
    Case("recipe-unknown-target-module", P("train", "method.target_modules=[nope]"),
         ("method.target_modules", "nope"), "available:"),
    Case("recipe-poly-several-heads", P("train", "method.name=poly", "method.n_heads=2"),
         ("{recipe}", "method.n_heads"), "use mhr"),
    Case("recipe-mhr-heads-not-dividing", P("train", "method.name=mhr", "method.n_heads=3"),
         ("method.n_heads", "must divide")),
    Case("recipe-tiny-heads-not-dividing", P("eval", "model.tiny.num_heads=3"),
         ("{recipe}", "model.tiny.num_heads", "must divide")),
    Case("recipe-missing-file", ("prepare", "{tmp}/missing.yaml"), ("{tmp}/missing.yaml", "not found")),
    Case("recipe-is-a-directory", ("eval", "{tmp}"), ("{tmp}", "is a directory; it holds recipe.yaml")),
    Case("recipe-yaml-list", P("train"), ("{recipe}", "mapping"), setup=recipe_file("- data\n- model\n")),
    Case("recipe-yaml-scalar", P("prepare"), ("{recipe}", "mapping"), setup=recipe_file("just words\n")),
    Case("recipe-yaml-python-tag", P("eval"), ("{recipe}", "invalid YAML"),
         setup=recipe_file('data: !!python/object/apply:os.system ["echo pwned"]\n')),
    Case("recipe-yaml-python-name-tag", P("train"), ("{recipe}", "invalid YAML"),
         setup=recipe_file("model: !!python/name:os.system\n")),
    Case("recipe-yaml-syntax", P("prepare"), ("{recipe}", "line 2", "invalid YAML"),
         setup=recipe_file("data:\n  source: x: y\n")),
    Case("recipe-yaml-deeply-nested", P("prepare"), ("{recipe}",), setup=recipe_file("data: " + "[" * 5000)),
    Case("recipe-not-utf8", P("prepare"), ("{recipe}", "UTF-8"), setup=recipe_file(b"data:\n  source: \xff\xfe\n")),
    Case("override-without-equals", P("eval", "eval.max_instances"), ("eval.max_instances",), "section.field=value"),
    Case("override-into-a-value", P("train", "train.steps.x=1"), ("train.steps.x=1", "not a section")),
    Case("override-deeply-nested-value", P("prepare", "data.languages=" + "[" * 5000), ("data.languages",)),
    # ---- SNI data (task files and split files)
    Case("sni-invalid-json", P("prepare"), ("{task}", "line 1", "invalid JSON"), TASK_FIX,
         setup=task_bytes(b'{"Definition": [')),
    Case("sni-top-level-list", P("prepare"), ("{task}", "top level"), TASK_FIX, setup=task_bytes(b"[1, 2]")),
    Case("sni-not-utf8", P("prepare"), ("{task}", "UTF-8"), "re-save",
         setup=task_bytes(b'{"Definition": ["caf\xe9"]}')),
    Case("sni-deeply-nested-json", P("prepare"), ("{task}",), setup=task_bytes(b"[" * 100_000 + b"]" * 100_000)),
    Case("sni-huge-integer-literal", P("prepare"), ("{task}",), setup=task_bytes(b"1" * 5000)),
    Case("sni-lone-surrogate", P("prepare"), ("{task}", "Instances[0].input"),
         setup=task_set(("Instances", 0, "input"), "\ud800 broken")),
    Case("sni-missing-instances", P("prepare"), ("{task}", "Instances", "missing"), TASK_FIX,
         setup=task_del(("Instances",))),
    Case("sni-empty-instances", P("prepare"), ("{task}", "Instances", "non-empty"), TASK_FIX,
         setup=task_set(("Instances",), [])),
    Case("sni-output-not-a-list", P("prepare"), ("{task}", "Instances[0].output"), TASK_FIX,
         setup=task_set(("Instances", 0, "output"), "answer")),
    Case("sni-output-not-strings", P("train"), ("{task}", "Instances[0].output[0]"), TASK_FIX,
         setup=task_set(("Instances", 0, "output"), [1, 2])),
    Case("sni-instance-id-missing", P("eval"), ("{task}", "Instances[0].id"), TASK_FIX,
         setup=task_del(("Instances", 0, "id"))),
    Case("sni-duplicate-instance-ids", P("eval"), ("{task}", "Instances[1].id"),
         setup=task_set(("Instances", 1, "id"), f"{BROKEN}-0")),
    Case("sni-empty-categories", P("prepare"), ("{task}", "Categories"), TASK_FIX,
         setup=task_set(("Categories",), [])),
    Case("sni-definition-not-a-list", P("prepare"), ("{task}", "Definition"), TASK_FIX,
         setup=task_set(("Definition",), "text")),
    Case("sni-example-missing-output", P("prepare"), ("{task}", "Positive Examples[0].output"), TASK_FIX,
         setup=task_del(("Positive Examples", 0, "output"))),
    Case("sni-language-not-a-list", P("prepare"), ("{task}", "Input_language"), TASK_FIX,
         setup=task_set(("Input_language",), "English")),
    Case("sni-50mb-instance", P("prepare"), ("{task}", "Instances[0]"), setup=huge_instance, slow=True),
    Case("sni-split-names-missing-task", P("prepare"), ("{sni}/test_tasks.txt", "line 1", "task999_missing"),
         "fix the name", setup=split_file("test_tasks.txt", "task999_missing\n")),
    Case("sni-split-duplicate-task", P("prepare"), ("{sni}/test_tasks.txt", "line 2", "listed twice"),
         "remove the duplicate", setup=split_file("test_tasks.txt", f"{BROKEN}\n{BROKEN}\n")),
    Case("sni-task-in-both-splits", P("train"), ("{sni}/test_tasks.txt", "task001_alpha_qa"), "remove it from one",
         setup=split_file("test_tasks.txt", "task001_alpha_qa\n")),
    Case("sni-split-empty", P("eval"), ("{sni}/test_tasks.txt", "no tasks"), "add task names",
         setup=split_file("test_tasks.txt", "\n\n")),
    Case("sni-split-file-missing", P("prepare"), ("{sni}/test_tasks.txt", "not found"), "data.test_split",
         setup=lambda env: (env.sni / "test_tasks.txt").unlink()),
    Case("sni-source-missing", P("prepare", "data.source={tmp}/nowhere"), ("data.source", "{tmp}/nowhere"),
         "set data.source"),
    Case("sni-language-filter-leaves-nothing", P("prepare", "data.languages=[French]"),
         ("train_tasks.txt", "data.languages"), "add languages"),
    # ---- checkpoints given to eval (eval.checkpoint=DIR)
    Case("ckpt-directory-missing", P("eval", "eval.checkpoint={tmp}/nothing"), ("eval.checkpoint", "{tmp}/nothing"),
         "train one first"),
    Case("ckpt-weights-missing", P("eval", "eval.checkpoint={ck}"), ("{ck}/" + WEIGHTS, "missing"),
         setup=checkpoint(remove(WEIGHTS))),
    Case("ckpt-weights-missing-no-manifest", P("eval", "eval.checkpoint={ck}"), ("{ck}/" + WEIGHTS, "not found"),
         setup=checkpoint(remove(WEIGHTS), manifest=False)),
    Case("ckpt-tasks-file-missing", P("eval", "eval.checkpoint={ck}"), ("{ck}/tasks.json", "not found"),
         setup=checkpoint(remove("tasks.json"), manifest=False)),
    Case("ckpt-only-pickle", P("eval", "eval.checkpoint={ck}"), ("{ck}/" + WEIGHTS, "pickle"),
         setup=checkpoint(lambda ck: (ck / WEIGHTS).rename(ck / "adapter_model.bin"), manifest=False)),
    Case("ckpt-truncated-weights", P("eval", "eval.checkpoint={ck}"), ("{ck}/" + WEIGHTS, "truncated"),
         "earlier one", setup=checkpoint(truncate(WEIGHTS))),
    Case("ckpt-truncated-weights-no-manifest", P("eval", "eval.checkpoint={ck}"),
         ("{ck}/" + WEIGHTS, "safetensors"), setup=checkpoint(truncate(WEIGHTS), manifest=False)),
    Case("ckpt-weights-changed-after-saving", P("eval", "eval.checkpoint={ck}"), ("{ck}/" + WEIGHTS, "sha256"),
         setup=checkpoint(flip_last_byte(WEIGHTS))),
    Case("ckpt-recipe-changed-after-saving", P("eval", "eval.checkpoint={ck}"), ("{ck}/recipe.yaml", "sha256"),
         setup=checkpoint(lambda ck: (ck / "recipe.yaml").write_text((ck / "recipe.yaml").read_text() + "#\n"))),
    Case("ckpt-training-state-missing", P("eval", "eval.checkpoint={ck}"), ("{ck}/training_state/rng.json",),
         setup=checkpoint(remove("training_state/rng.json"))),
    Case("ckpt-manifest-not-a-manifest", P("eval", "eval.checkpoint={ck}"), ("{ck}/manifest.json",),
         setup=checkpoint(lambda ck: (ck / "manifest.json").write_text("[1, 2]"))),
    Case("ckpt-manifest-size-not-a-number", P("eval", "eval.checkpoint={ck}"), ("{ck}/manifest.json",),
         setup=checkpoint(edit_json("manifest.json", lambda m: m["files"][CONFIG].update(size="big")))),
    Case("ckpt-tensor-wrong-shape", P("eval", "eval.checkpoint={ck}"), ("{ck}/" + WEIGHTS, "shape"),
         setup=checkpoint(grow_first_tensor, manifest=False)),
    Case("ckpt-unexpected-tensor", P("eval", "eval.checkpoint={ck}"), ("{ck}/" + WEIGHTS, "base.extra.lora_A"),
         setup=checkpoint(add_tensor, manifest=False)),
    Case("ckpt-method-name-does-not-match", P("eval", "eval.checkpoint={ck}"), ("{ck}/" + WEIGHTS, "poly"),
         setup=checkpoint(edit_json(CONFIG, lambda c: c["method"].update(name="poly")), manifest=False)),
    Case("ckpt-method-rank-does-not-match", P("eval", "eval.checkpoint={ck}"), ("{ck}/" + WEIGHTS, "shape"),
         setup=checkpoint(edit_json(CONFIG, lambda c: c["method"].update(rank=8)), manifest=False)),
    Case("ckpt-method-unknown-field", P("eval", "eval.checkpoint={ck}"), ("{ck}/" + CONFIG, "method.frob"),
         setup=checkpoint(edit_json(CONFIG, lambda c: c["method"].update(frob=1)), manifest=False)),
    Case("ckpt-config-invalid-json", P("eval", "eval.checkpoint={ck}"), ("{ck}/" + CONFIG, "JSON"),
         setup=checkpoint(lambda ck: (ck / CONFIG).write_text("{nope"), manifest=False)),
    Case("ckpt-config-format-version-text", P("eval", "eval.checkpoint={ck}"), ("{ck}/" + CONFIG, "format_version"),
         setup=checkpoint(edit_json(CONFIG, lambda c: c.update(format_version="2")), manifest=False)),
    Case("ckpt-config-base-model-text", P("eval", "eval.checkpoint={ck}"), ("{ck}/" + CONFIG, "base_model"),
         setup=checkpoint(edit_json(CONFIG, lambda c: c.update(base_model="t5")), manifest=False)),
    Case("ckpt-peft-config-without-rank", P("eval", "eval.checkpoint={ck}"), ("{ck}/" + CONFIG,),
         setup=peft_lora_without_rank),
    Case("ckpt-other-base-model", P("eval", "eval.checkpoint={ck}", "model.name=tiny-llama"),
         ("{ck}/" + CONFIG, "model_type"), "model they were trained with", setup=checkpoint()),
    Case("ckpt-other-hidden-size", P("eval", "eval.checkpoint={ck}", "model.tiny.hidden_size=64"),
         ("{ck}/" + CONFIG, "hidden_size"), "model they were trained with", setup=checkpoint()),
    Case("ckpt-other-depth", P("eval", "eval.checkpoint={ck}", "model.tiny.num_layers=3"),
         ("{ck}/" + CONFIG, "base_model.num_layers is 2"), setup=checkpoint()),
    Case("ckpt-latest-without-checkpoints", P("eval", "eval.checkpoint=latest"), ("eval.checkpoint", "{out}"),
         "train one first"),
    Case("ckpt-latest-only-damaged", P("eval", "eval.checkpoint=latest"), ("eval.checkpoint", "{out}"),
         setup=previous_run(flip_last_byte(WEIGHTS))),
    # ---- command line: options, subcommands, splits, --resume, the run lock
    Case("cli-unknown-option-train", P("train", "--nope"), ("--nope",), "--help"),
    Case("cli-unknown-option-eval", P("eval", "--resume"), ("--resume",), "--help"),
    Case("cli-unknown-option-prepare", P("prepare", "--with-base"), ("--with-base",), "--help"),
    Case("cli-unknown-root-option", ("--nope", "prepare", "{recipe}"), ("--nope",), "--help"),
    Case("cli-unknown-subcommand", ("frobnicate", "{recipe}"), ("frobnicate",), "--help"),
    Case("cli-missing-recipe-argument", ("train",), ("recipe",), "--help"),
    Case("cli-eval-task-not-prepared", P("eval", "eval.tasks=[task999_nope]"),
         ("{recipe}", "eval.tasks", "task999_nope")),
    Case("cli-eval-task-from-other-split", P("eval", "eval.split=train", f"eval.tasks=[{BROKEN}]"),
         ("{recipe}", "eval.tasks", BROKEN)),
    Case("cli-eval-tasks-empty", P("eval", "eval.tasks=[]"), ("{recipe}", "eval.tasks")),
    Case("cli-eval-tasks-duplicate", P("eval", f"eval.tasks=[{BROKEN},{BROKEN}]"), ("{recipe}", "eval.tasks", BROKEN)),
    Case("cli-resume-nothing-to-resume", P("train", "--resume"), ("{out}", "--resume"), "without --resume"),
    Case("cli-resume-nothing-fresh-dir", P("train", "--resume"), ("{out}", "--resume"), "without --resume",
         fresh_out=True),
    Case("cli-resume-only-damaged-checkpoint", P("train", "--resume"), ("{out}", "--resume"),
         setup=previous_run(flip_last_byte(WEIGHTS))),
    Case("cli-resume-other-method", P("train", "--resume", "method.name=poly", "method.n_skills=2"),
         ("{out}/checkpoints/step-000001", "method.name"), setup=previous_run()),
    Case("resume-with-changed-data", P("train", "--resume", "train.steps=3", "data.max_source_length=64"),
         ("{out}/checkpoints/step-000001", "data.max_source_length"), "resume with data.max_source_length=",
         setup=previous_run()),
    Case("cli-resume-other-hidden-size", P("train", "--resume", "model.tiny.hidden_size=64"),
         ("{out}/checkpoints/step-000001",), setup=previous_run()),
    Case("cli-run-dir-locked", P("train"), ("{out}", "in use"), "choose another output.dir", setup=live_lock),
    # ---- nothing lost, nothing silently wrong
    Case("train-rerun-over-a-run-without-resume", P("train", "train.steps=1"),
         ("{out}", "step-000001", "--resume"), "choose another output.dir", setup=previous_run()),
    Case("train-over-a-users-recipe-and-log", P("train"), ("{out}", "did not write", "recipe.yaml"),
         setup=out_files({"recipe.yaml": "# mine\n", "metrics.jsonl": '{"step": 0, "loss": 1.0}\n', "notes.txt": "x"})),
    Case("train-over-a-users-summary", P("train"), ("{out}", "did not write", "train_summary.json"),
         setup=out_files({"train_summary.json": '{"mine": true}'})),
    Case("train-over-a-users-log", P("train"), ("{out}/metrics.jsonl", "line 1"), "not this run's metrics",
         setup=out_files({"metrics.jsonl": "my own log\n"})),
    Case("resume-with-changed-lr", P("train", "--resume", "train.lr=0.5"), ("train.lr", "{out}/checkpoints/step-000001"),
         "train.lr=0.03", setup=previous_run()),
    Case("resume-with-changed-schedule", P("train", "--resume", "train.schedule=constant"), ("train.schedule",),
         setup=previous_run()),
    Case("resume-after-training-tasks-reordered", P("train", "--resume"),
         ("{out}/checkpoints/step-000001", "other tasks", TRAIN_TASKS[2]), "same training tasks",
         setup=chain(previous_run(), split_file("train_tasks.txt", "\n".join(reversed(TRAIN_TASKS)) + "\n"))),
    Case("recipe-duplicate-section", P("train"), ("{recipe}", "line 14", "'train'", "line 7"),
         setup=recipe_file("data:\n  source: {sni}\nmodel:\n  name: tiny-t5\nmethod:\n  name: lora\ntrain:\n"
                           "  steps: 2\neval:\n  batch_size: 2\noutput:\n  dir: {out}\n\ntrain:\n  lr: 0.1\n")),
    Case("recipe-alias-bomb", P("train"), ("{recipe}", "expands to more than"),
         setup=recipe_file("train: [&a0 [x, x, x, x, x, x, x, x, x, x]"
                           + "".join(f", &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)) + "]\n")),
    Case("output-dir-is-a-file-train", P("train", "output.dir={tmp}/afile"), ("output.dir", "{tmp}/afile", "is a file"),
         setup=lambda env: (env.tmp / "afile").write_text("x")),
    Case("output-dir-is-a-file-eval", P("eval", "output.dir={tmp}/afile"), ("output.dir", "{tmp}/afile", "is a file"),
         setup=lambda env: (env.tmp / "afile").write_text("x")),
    Case("output-dir-under-a-file", P("train", "output.dir={tmp}/afile/run"), ("output.dir", "{tmp}/afile"),
         setup=lambda env: (env.tmp / "afile").write_text("x")),
    Case("val-instances-leave-no-training-rows", P("train", "train.val_instances=4"),
         ("{recipe}", "train.val_instances", "4 instances"), "use a value below 4"),
    Case("ckpt-config-edited-shorter", P("eval", "eval.checkpoint={ck}"), ("{ck}/" + CONFIG, "modified after saving"),
         setup=checkpoint(edit_json(CONFIG, lambda config: config.pop("parameters")))),
    Case("model-builtin-typo", P("prepare", "model.name=smollm2-135m"), ("model.name", "smollm2-135m"),
         "did you mean 'smollm2-135m-instruct'"),
    Case("model-hub-id-unreachable", P("prepare", "model.name=nobody-here/no-such-model"),
         ("model.name", "nobody-here/no-such-model")),
    # ---- inspect-routing CHECKPOINT
    Case("routing-lora-has-no-routing", ("inspect-routing", "{ck}"), ("{ck}", "lora", "no routing to inspect"),
         setup=checkpoint()),
    Case("routing-missing-path", ("inspect-routing", "{tmp}/nothing"), ("{tmp}/nothing", "does not exist"),
         "train one first"),
    Case("routing-damaged-adapter", ("inspect-routing", "{ck}"), ("{ck}/" + WEIGHTS, "modified"),
         setup=checkpoint(flip_last_byte(WEIGHTS))),
    Case("routing-truncated-adapter-no-manifest", ("inspect-routing", "{ck}"), ("{ck}/" + WEIGHTS, "safetensors"),
         setup=checkpoint(truncate(WEIGHTS), manifest=False)),
    Case("routing-unknown-format", ("inspect-routing", "{ck}", "--format", "xml"), ("--format", "xml"),
         setup=checkpoint()),
    # ---- adapt RECIPE: the held-out tasks keep 2 instances for evaluation and 2 as their adaptation pool
    Case("adapt-zero-shots", P("adapt", *ADAPT, "--shots", "0"), ("{recipe}", "adapt.shots", "at least 1"),
         setup=checkpoint()),
    Case("adapt-k-above-the-pool", P("adapt", *ADAPT, "--shots", "3"),
         ("{recipe}", "adapt.shots", "more than the 2 pool instances"), setup=checkpoint()),
    Case("adapt-unknown-mode", P("adapt", *ADAPT, "--modes", "frobnicate"),
         ("{recipe}", "adapt mode 'frobnicate' is unknown"), setup=checkpoint()),
    Case("adapt-mode-does-not-fit-the-checkpoint", P("adapt", *ADAPT, "--modes", "mhr_z"),
         ("{recipe}", "'mhr_z' needs a mhr or mhr_mu checkpoint", "lora"), setup=checkpoint()),
    Case("adapt-task-without-a-pool", P("adapt", "adapt.checkpoint={ck}", "--modes", "lora", "--tasks", BROKEN),
         ("{recipe}", BROKEN, "no adaptation pool"), setup=checkpoint()),
    Case("adapt-checkpoint-of-another-base-model", P("adapt", *ADAPT, "model.tiny.hidden_size=64"),
         ("base_model.hidden_size",), setup=checkpoint()),
    # ---- rule 1: every path through one resolver; rule 2: never write over a checkpoint, a run or a user's files
    Case("path-output-dir-empty", P("train", "output.dir="), ("{recipe}", "output.dir", "is empty")),
    Case("path-output-dir-holds-the-recipe", P("train", "output.dir={tmp}"),
         ("{recipe}", "output.dir", "files orchmoe did not write")),
    Case("path-nul-byte", P("train", "output.dir={tmp}/a\x00b"), ("{recipe}", "output.dir", "NUL byte")),
    Case("path-name-too-long", P("eval", "eval.output_dir={tmp}/" + "n" * 300), ("eval.output_dir", "bytes long")),
    Case("path-unset-variable", P("prepare", "data.cache_dir=$ORCHMOE_TEST_UNSET/c"),
         ("{recipe}", "data.cache_dir", "ORCHMOE_TEST_UNSET is not set")),
    Case("path-adapt-into-a-checkpoint", P("adapt", *ADAPT, "adapt.output_dir={ck}"),
         ("{recipe}", "adapt.output_dir", "inside the saved checkpoint"), setup=checkpoint()),
    Case("path-adapt-into-a-training-run", P("adapt", *ADAPT, "adapt.output_dir={tmp}/run"),
         ("adapt.output_dir", "output of `orchmoe train`"),
         setup=lambda env: (env.checkpoint(), shutil.copytree(env.shared.run, env.tmp / "run"))),
    Case("path-default-adapt-dir-is-a-file", P("adapt", *ADAPT), ("{recipe}", "adapt.output_dir", "is a file"),
         setup=lambda env: (env.checkpoint(), (env.out / "adapt").write_text("mine"))),
    Case("path-eval-into-a-checkpoint", P("eval", "eval.checkpoint={ck}", "eval.output_dir={ck}"),
         ("eval.output_dir", "inside the saved checkpoint"), setup=checkpoint()),
    Case("path-routing-out-is-a-file", ("inspect-routing", "{ck}", "--out", "{tmp}/afile"), ("--out", "is a file"),
         setup=lambda env: (env.checkpoint(), (env.tmp / "afile").write_text("mine"))),
    Case("adapt-results-of-unknown-settings", P("adapt", *ADAPT), ("{recipe}", "adapt.output_dir", "no sweep.json"),
         setup=lambda env: (env.checkpoint(), (env.out / "adapt").mkdir(parents=True),
                            (env.out / "adapt" / "adapt_results.jsonl").write_text("{}\n"))),
]


def _params() -> list[Any]:
    return [pytest.param(case, id=case.id, marks=[pytest.mark.slow] if case.slow else []) for case in CASES]


def test_table_is_wide_enough() -> None:
    commands = {case.argv[0] for case in CASES}
    assert len(CASES) >= 40 and {"prepare", "eval", "train"} <= commands
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", _params())
def test_bad_input_is_one_line_and_exit_2(case: Case, shared: Shared, tmp_path: Path) -> None:
    sni = write_sni(tmp_path / "sni")
    out = tmp_path / "out"
    env = Env(tmp=tmp_path, sni=sni, out=out, recipe=tmp_path / "recipe.yaml", shared=shared)
    env.recipe.write_text(recipe_text(sni, shared.cache, out), encoding="utf-8")
    if not case.fresh_out:  # a run directory with an earlier run's content that must survive untouched
        (out / "eval-base").mkdir(parents=True)
        (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
        (out / "eval-base" / "results.json").write_text('{"earlier": true}\n')
    if case.setup is not None:
        case.setup(env)
    before = snapshot(out)

    code, stdout, stderr = run_main([env.fill(a) for a in case.argv])

    lines = [line for line in stderr.strip().splitlines() if not line.startswith("warning:")]  # warnings may precede
    context = f"exit {code}; stderr:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr + stdout, context
    assert code == 2, context
    assert len(lines) == 1, context
    line = lines[0]
    assert line.startswith("error:"), context
    assert "None:" not in line and "None " not in line, f"a missing name printed as None: {line}"  # rule 7
    for words in case.expect:
        assert env.fill(words) in line, f"{env.fill(words)!r} not named in: {line}"
    if case.hint is not None:
        assert env.fill(case.hint) in line, f"no hint {env.fill(case.hint)!r} in: {line}"
    assert snapshot(out) == before, f"{out} changed"


# --------------------------------------------------------------------------- recipe-field errors name the file once

# (command line, the dotted field at fault, setup): errors found in different layers (schema, data location,
# output checks, training, evaluation, adaptation), each raised with only its field; the command adds the file.
FIELD_ERRORS: list[tuple[tuple[str, ...], str, Callable[[Env], None] | None]] = [
    (P("train", "train.steps=abc"), "train.steps", None),
    (P("prepare", "data.source={tmp}/nowhere"), "data.source", None),
    (P("train", "output.dir={tmp}/afile/run"), "output.dir", lambda env: (env.tmp / "afile").write_text("x")),
    (P("train", "method.name=none"), "method.name", None),
    (P("train", "train.val_instances=4"), "train.val_instances", None),
    (P("eval", "eval.tasks=[task999_nope]"), "eval.tasks", None),
    (P("eval", "eval.checkpoint={tmp}/nothing"), "eval.checkpoint", None),
    (P("adapt", *ADAPT, "--tasks", "task999_nope"), "adapt.tasks", checkpoint()),
    (P("adapt", *ADAPT, "--shots", "3"), "adapt.shots", checkpoint()),
]


@pytest.mark.parametrize(("argv", "field", "setup"), FIELD_ERRORS, ids=[f for _, f, _ in FIELD_ERRORS])
def test_recipe_field_errors_start_with_the_recipe_once(argv: tuple[str, ...], field: str,
                                                       setup: Callable[[Env], None] | None, shared: Shared,
                                                       tmp_path: Path) -> None:
    """The one line is ``error: RECIPE: FIELD (set on the command line): ...``: the recipe path exactly once, then
    the dotted field and where its value came from (every case here sets it on the command line)."""
    sni, out = write_sni(tmp_path / "sni"), tmp_path / "out"
    env = Env(tmp=tmp_path, sni=sni, out=out, recipe=tmp_path / "recipe.yaml", shared=shared)
    env.recipe.write_text(recipe_text(sni, shared.cache, out), encoding="utf-8")
    if setup is not None:
        setup(env)

    code, stdout, stderr = run_main([env.fill(a) for a in argv])

    line = _one_error_line(code, stderr)
    assert "Traceback" not in stdout, stdout
    assert line.startswith(f"error: {env.recipe}: {field} (set on the command line): "), line
    assert line.count(f"{env.recipe}: ") == 1, line


@pytest.mark.parametrize(("argv", "field", "setup"), [case for case in FIELD_ERRORS if case[0][0] != "adapt"],
                         ids=[f for a, f, _ in FIELD_ERRORS if a[0] != "adapt"])
def test_the_same_values_in_the_recipe_file_name_the_file_alone(argv: tuple[str, ...], field: str,
                                                               setup: Callable[[Env], None] | None, shared: Shared,
                                                               tmp_path: Path) -> None:
    """Each value of the table above written into the recipe instead: ``error: RECIPE: FIELD: ...``."""
    import yaml

    sni, out = write_sni(tmp_path / "sni"), tmp_path / "out"
    env = Env(tmp=tmp_path, sni=sni, out=out, recipe=tmp_path / "recipe.yaml", shared=shared)
    raw = yaml.safe_load(recipe_text(sni, shared.cache, out))
    for item in argv[2:]:
        key, _, value = env.fill(item).partition("=")
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = yaml.safe_load(value)
    env.recipe.write_text(yaml.safe_dump(raw), encoding="utf-8")
    if setup is not None:
        setup(env)

    code, stdout, stderr = run_main([env.fill(a) for a in argv[:2]])

    line = _one_error_line(code, stderr)
    assert line.startswith(f"error: {env.recipe}: {field}: "), line


def test_recipe_source_names_only_field_errors_without_a_file() -> None:
    from orchmoe_cli.errors import OrchmoeError, recipe_source

    def raised(error: OrchmoeError) -> str:
        with pytest.raises(OrchmoeError) as info, recipe_source("outer.yaml"), recipe_source("r.yaml"):
            raise error
        return str(info.value)

    assert raised(OrchmoeError("empty", field="eval.tasks")) == "r.yaml: eval.tasks: empty"
    with pytest.raises(OrchmoeError) as info, recipe_source("r.yaml", ["eval.tasks=[]", "train.steps=3"]):
        raise OrchmoeError("empty", field="eval.tasks")
    assert str(info.value) == "r.yaml: eval.tasks (set on the command line): empty"
    with pytest.raises(OrchmoeError) as info, recipe_source("r.yaml", ["eval=3"]):  # a section set whole
        raise OrchmoeError("bad", field="eval.tasks")
    assert str(info.value) == "r.yaml: eval.tasks (set on the command line): bad"
    with pytest.raises(OrchmoeError) as info, recipe_source("r.yaml", ["evl.max_instances=1"]):  # a section it named
        raise OrchmoeError("unknown key", field="evl")
    assert str(info.value) == "r.yaml: evl (set on the command line): unknown key"
    with pytest.raises(OrchmoeError) as info, recipe_source("r.yaml", ["eval.batch_size=3"]):  # another field
        raise OrchmoeError("bad", field="eval.tasks")
    assert str(info.value) == "r.yaml: eval.tasks: bad"
    assert raised(OrchmoeError("bad\n  key", field="method.x", source="ck/cfg.json")) == "ck/cfg.json: method.x: bad key"
    assert raised(OrchmoeError("ck/weights: truncated")) == "ck/weights: truncated"  # another file: no field
    assert str(OrchmoeError("no\nfield")) == OrchmoeError("no field").message == "no field"


# --------------------------------------------------------------------------- disk full (ENOSPC)

NO_SPACE = "no space left"


def _enospc(path: object) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _one_error_line(code: int, stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("warning:")]
    assert "Traceback" not in stderr and code == 2 and len(lines) == 1, f"exit {code}; stderr:\n{stderr[-3000:]}"
    return lines[0]


@pytest.mark.parametrize("where", ["training-state", "adapter-weights"])
def test_disk_full_while_saving_a_checkpoint(where: str, shared: Shared, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills while step 2 is saved: exit 2, one line, step 1 intact, no temp dir, no lock."""
    from orchmoe_cli.core import checkpoint as ckpt
    from orchmoe_cli.core import state_files

    sni, run = write_sni(tmp_path / "sni"), tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(sni, shared.cache, run), encoding="utf-8")
    if where == "training-state":  # every file a checkpoint holds besides the adapter goes through these two
        original = ckpt.atomic_write_bytes

        def write_bytes(path: Path, data: bytes) -> None:
            if ".step-000002." in str(path):
                raise _enospc(path)
            original(path, data)

        monkeypatch.setattr(ckpt, "atomic_write_bytes", write_bytes)
        monkeypatch.setattr(state_files, "atomic_write_bytes", write_bytes)
    else:  # a full disk makes safetensors' save_file raise SafetensorError (os error 28), not OSError
        import safetensors.torch
        from safetensors import SafetensorError

        original_save = safetensors.torch.save_file

        def save_file_full(tensors: Any, filename: str, metadata: Any = None) -> None:
            if ".step-000002." in str(filename):
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            original_save(tensors, filename, metadata=metadata)

        monkeypatch.setattr(safetensors.torch, "save_file", save_file_full)

    code, _, stderr = run_main(["train", str(recipe), "train.steps=2", "train.save_every=1"])

    line = _one_error_line(code, stderr)
    assert NO_SPACE in line.lower(), line
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000001"]  # no step 2, no temp dir
    ckpt.verify_checkpoint(checkpoints / "step-000001")  # every file matches its sha256
    assert not (run / ".lock").exists()


class _FullDiskFile:
    """A text file whose flushes fail with ENOSPC after ``allowed`` successful writes."""

    def __init__(self, handle: Any, allowed: int) -> None:
        self._handle, self._allowed = handle, allowed

    def write(self, text: str) -> int:
        if self._allowed <= 0:
            raise _enospc(self._handle.name)
        self._allowed -= 1
        return self._handle.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __enter__(self) -> _FullDiskFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()


@pytest.mark.parametrize("where", ["predictions.jsonl", "results.json", "partial-predictions"])
def test_disk_full_while_eval_writes_results(where: str, shared: Shared, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished evaluation exists; a changed one hits a full disk: exit 2, one line, old results intact."""
    sni, out = write_sni(tmp_path / "sni"), tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(sni, shared.cache, out), encoding="utf-8")
    code, _, stderr = run_main(["eval", str(recipe)])
    assert code == 0, stderr
    results = out / "eval-base"
    finals = ("predictions.jsonl", "results.md", "recipe.yaml", "results.json")
    before = {name: (results / name).read_bytes() for name in finals}

    if where == "partial-predictions":  # the disk fills while predictions are appended during generation
        original_open = Path.open

        def open_full(self: Path, *args: Any, **kwargs: Any) -> Any:
            handle = original_open(self, *args, **kwargs)
            if self.name.startswith(".predictions.partial") and "w" in (args[0] if args else kwargs.get("mode", "r")):
                return _FullDiskFile(handle, allowed=2)  # the header and the rows that survived, then full
            return handle

        monkeypatch.setattr(Path, "open", open_full)
    else:  # the final artifacts are written into a staging folder, then renamed into eval-base/ one by one
        original_write_text = Path.write_text

        def write_text(self: Path, *args: Any, **kwargs: Any) -> int:  # the temp file of artifact `where`
            if self.name.startswith(f".{where}.") and self.parent.name.startswith(f".{results.name}."):
                raise _enospc(str(self))
            return original_write_text(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)

    code, _, stderr = run_main(["eval", str(recipe), "eval.max_instances=1"])  # other rows, other fingerprint

    line = _one_error_line(code, stderr)
    assert NO_SPACE in line.lower(), line
    after = {name: (results / name).read_bytes() for name in finals}
    changed = [name for name in finals if after[name] != before[name]]
    assert not changed, f"earlier results overwritten by a failed evaluation: {changed}"
    assert not [p.name for p in results.iterdir() if p.name.endswith(".tmp")]


def test_disk_full_while_preparing_data(shared: Shared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills while the encoded dataset is saved: exit 2, one line, no half-written cache entry."""
    import datasets

    sni, cache = write_sni(tmp_path / "sni"), tmp_path / "prepared"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(sni, cache, tmp_path / "out"), encoding="utf-8")

    def save_to_disk(self: Any, path: str, *args: Any, **kwargs: Any) -> None:
        Path(path, "train").mkdir(parents=True)
        raise _enospc(Path(path, "train", "data-00000-of-00001.arrow"))

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", save_to_disk)
    code, _, stderr = run_main(["prepare", str(recipe)])

    line = _one_error_line(code, stderr)
    assert NO_SPACE in line.lower(), line
    assert not list(cache.iterdir()), "a half-written prepared dataset was left in the cache"


# --------------------------------------------------------------------------- what inputs can never do

PACKAGE = Path(__file__).resolve().parents[1] / "orchmoe_cli"
_UNSAFE_CALLS = {("torch", "load"), ("yaml", "load"), ("yaml", "load_all"), ("yaml", "unsafe_load"),
                 ("yaml", "unsafe_load_all"), ("yaml", "full_load"), ("yaml", "full_load_all"),
                 ("importlib", "import_module"), ("pickle", "load"), ("pickle", "loads")}
_UNSAFE_MODULES = {"pickle", "cPickle", "dill", "joblib", "marshal", "shelve", "runpy"}


def test_source_never_unpickles_evaluates_or_imports_by_name() -> None:
    """No pickle, no torch.load, only yaml.safe_load, no eval/exec/__import__/import_module (so nothing in a
    recipe or checkpoint can name code to run), and trust_remote_code / weights_only never forced open."""
    import ast

    problems = []
    for source in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(source.read_text(encoding="utf-8"), str(source))
        for node in ast.walk(tree):
            where = f"{source.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                problems += [f"{where}: import {a.name}" for a in node.names
                             if a.name.split(".")[0] in _UNSAFE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _UNSAFE_MODULES:
                problems.append(f"{where}: from {node.module} import ...")
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                unsafe_loader = node.value.id == "yaml" and node.attr.endswith("Loader") and "Safe" not in node.attr
                if (node.value.id, node.attr) in _UNSAFE_CALLS or unsafe_loader:
                    problems.append(f"{where}: {node.value.id}.{node.attr}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                    "eval", "exec", "__import__", "compile"):
                problems.append(f"{where}: {node.func.id}()")
            elif isinstance(node, ast.keyword) and node.arg in ("trust_remote_code", "weights_only"):
                forced = isinstance(node.value, ast.Constant) and node.value.value is (node.arg == "trust_remote_code")
                if forced:
                    problems.append(f"{where}: {node.arg}={node.value.value}")
    assert not problems, problems

    from orchmoe_cli.recipe import ModelConfig

    assert ModelConfig().trust_remote_code is False
