"""Kills and Ctrl-C: `orchmoe train` / `orchmoe eval` run as real subprocesses on tiny-t5, are killed at
chosen moments, and are run again. The resumed run must end bit-identical to an uninterrupted one and
leave no temp files or lock behind. Bit-identical needs the same arithmetic on both sides: the runs in this
process and the child processes compute with the same thread count (``same_threads.py``), set here explicitly
rather than left to whichever test ran before.

Kill points are found by watching the run directory: the metrics file (one line per step), the
checkpoint staging directory ``checkpoints/.step-NNNNNN.*.tmp`` that exists only while a checkpoint is
written, the ``.step-*.prune.tmp`` name an old checkpoint gets while it is deleted, and the partial
predictions file of an evaluation. Only ``test_sigkill_while_saving_a_checkpoint_then_resume`` runs by
default (CI); the others are marked slow (``make test-all``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from same_threads import child_environment, torch_threads

from orchmoe_cli.cli import main
from orchmoe_cli.core.checkpoint import verify_checkpoint

TRAIN_TASKS = ("task001_alpha_qa", "task002_beta_title", "task003_gamma_qa")
TEST_TASKS = ("task101_delta_rewrite", "task102_epsilon_qa")
STEPS = 8
_STAGING = re.compile(r"\.step-(\d+)\..+\.tmp")


def write_sni(root: Path) -> Path:
    (root / "tasks").mkdir(parents=True)
    for name in TRAIN_TASKS + TEST_TASKS:
        task = {
            "Categories": ["Question Answering"], "Definition": [f"Answer the question ({name})"],
            "Positive Examples": [{"input": "What is 1 + 1?", "output": "2"}],
            "Instances": [{"id": f"{name}-{i}", "input": f"Question number {i} of {name}?",
                           "output": [f"answer {i}"] + ([f"other answer {i}"] if i % 2 else [])} for i in range(6)],
        }
        (root / "tasks" / f"{name}.json").write_text(json.dumps(task), encoding="utf-8")
    (root / "train_tasks.txt").write_text("\n".join(TRAIN_TASKS) + "\n", encoding="utf-8")
    (root / "test_tasks.txt").write_text("\n".join(TEST_TASKS) + "\n", encoding="utf-8")
    return root


@dataclass(frozen=True)
class Setup:
    """An SNI directory and a prepared-data cache shared by the module, and the reference runs' results."""

    root: Path
    sni: Path
    cache: Path

    def recipe(self, path: Path, out: Path) -> Path:
        """Training: lora, 8 steps, a checkpoint every 2 (the 2 newest kept), validation every 2 steps.
        Evaluation: 6 instances per test task, one per batch (no padding), up to 32 new tokens."""
        path.write_text(f"""\
data: {{source: {self.sni}, cache_dir: {self.cache}, num_pos_examples: 1, max_source_length: 96,
       max_target_length: 16}}
model: {{name: tiny-t5, tiny: {{hidden_size: 32, num_layers: 2, num_heads: 4, intermediate_size: 64}}}}
method: {{name: lora, rank: 4, alpha: 4}}
train: {{steps: {STEPS}, batch_size: 4, lr: 0.03, log_every: 1, save_every: 2, keep_last: 2, val_instances: 1,
        eval_every: 2}}
eval: {{max_instances: 6, batch_size: 1, max_new_tokens: 32}}
output: {{dir: {out}}}
""", encoding="utf-8")
        return path


def child_env() -> dict[str, str]:
    """A child run computes with the thread count :func:`run_in_process` sets here."""
    return child_environment(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")


def run_in_process(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with torch_threads(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            return int(exc.code or 0), err.getvalue()
    return -1, err.getvalue()  # pragma: no cover - main always exits


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("interruption")
    return Setup(root, write_sni(root / "sni"), root / "prepared")


@pytest.fixture(scope="module")
def reference_adapter(setup: Setup) -> dict[str, torch.Tensor]:
    """The final adapter of an uninterrupted training run."""
    run = setup.root / "reference-run"
    code, err = run_in_process(["train", str(setup.recipe(setup.root / "reference-train.yaml", run))])
    assert code == 0, err
    return final_adapter(run)


@pytest.fixture(scope="module")
def reference_predictions(setup: Setup) -> bytes:
    """predictions.jsonl of an uninterrupted evaluation of the base model."""
    out = setup.root / "reference-eval"
    code, err = run_in_process(["eval", str(setup.recipe(setup.root / "reference-eval.yaml", out))])
    assert code == 0, err
    return (out / "eval-base" / "predictions.jsonl").read_bytes()


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def spawn(command: str, recipe: Path, *extra: str, log: Path) -> Iterator[subprocess.Popen]:
    """`python -m orchmoe_cli COMMAND RECIPE ...` with stderr in ``log``; killed on the way out if still running."""
    with log.open("ab") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "orchmoe_cli", command, str(recipe), *extra],
                                stdout=subprocess.DEVNULL, stderr=stderr, env=child_env())
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def run_to_end(command: str, recipe: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchmoe_cli", command, str(recipe), *extra],
                          capture_output=True, text=True, env=child_env(), timeout=timeout)


def wait_for(proc: subprocess.Popen, moment: Callable[[], bool], log: Path, poll: float = 0.002,
              timeout: float = 300) -> None:
    """Return as soon as ``moment()`` holds; fail if the process ends (or time runs out) first."""
    deadline = time.monotonic() + timeout
    while not moment():
        if proc.poll() is not None:
            pytest.fail(f"the process ended (exit {proc.returncode}) before the kill point; stderr:\n"
                        f"{log.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the kill point never came")
        time.sleep(poll)


def sigkill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def logged_steps(run: Path) -> list[dict]:
    """Complete lines of metrics.jsonl (a line being written is skipped)."""
    try:
        text = (run / "metrics.jsonl").read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines(keepends=True):
        if line.endswith("\n"):
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    return rows


def step_logged(run: Path, step: int) -> Callable[[], bool]:
    return lambda: any(r.get("step", 0) >= step and "loss" in r for r in logged_steps(run))


def staging_dir(run: Path, min_step: int) -> Callable[[], bool]:
    """A checkpoint of step >= min_step is being written right now."""
    def moment() -> bool:
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(run / "checkpoints"):
                match = _STAGING.fullmatch(entry.name)
                if match and not entry.name.endswith(".prune.tmp") and int(match.group(1)) >= min_step:
                    return True
        return False
    return moment


def pruning(run: Path) -> Callable[[], bool]:
    def moment() -> bool:
        with contextlib.suppress(FileNotFoundError):
            return any(e.name.endswith(".prune.tmp") for e in os.scandir(run / "checkpoints"))
        return False
    return moment


def final_adapter(run: Path) -> dict[str, torch.Tensor]:
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert newest.name == f"step-{STEPS:06d}", newest
    return load_file(str(newest / "adapter_model.safetensors"))


def assert_same_adapter(run: Path, reference: dict[str, torch.Tensor]) -> None:
    resumed = final_adapter(run)
    assert resumed.keys() == reference.keys()
    differing = [k for k in reference if not torch.equal(resumed[k], reference[k])]
    assert not differing, f"{len(differing)} tensors differ from the uninterrupted run, e.g. {differing[0]}"


def assert_no_leftovers(run: Path) -> None:
    leftovers = [p.relative_to(run).as_posix() for p in run.rglob("*")
                 if p.name.endswith((".tmp", ".old")) or p.name == ".lock"]
    assert not leftovers, f"left behind: {leftovers}"
    for step_dir in (run / "checkpoints").glob("step-*"):
        verify_checkpoint(step_dir)


# --------------------------------------------------------------------------- training


def test_child_runs_compute_like_the_runs_in_this_process() -> None:
    """What a bit-identical resume rests on: a child run uses the thread count and the kernels (CPU capability)
    of the runs in this process, whatever an earlier test left set."""
    query = "import torch; print(torch.get_num_threads(), torch.backends.cpu.get_cpu_capability())"
    child = subprocess.run([sys.executable, "-c", query], capture_output=True, text=True, env=child_env(), timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    with torch_threads():
        here = f"{torch.get_num_threads()} {torch.backends.cpu.get_cpu_capability()}"
    assert child.stdout.split() == here.split()


def test_sigkill_while_saving_a_checkpoint_then_resume(setup: Setup, reference_adapter: dict, tmp_path: Path) -> None:
    """SIGKILL while step 4's checkpoint is being written; `train --resume` ends bit-identical."""
    run, log = tmp_path / "run", tmp_path / "stderr.log"
    recipe = setup.recipe(tmp_path / "recipe.yaml", run)
    with spawn("train", recipe, log=log) as proc:
        wait_for(proc, staging_dir(run, min_step=4), log, poll=0.0005)
        sigkill(proc)
    assert (run / "checkpoints" / "step-000002").is_dir()  # the previous checkpoint survived the kill

    code, err = run_in_process(["train", str(recipe), "--resume"])

    assert code == 0, err
    assert_same_adapter(run, reference_adapter)
    assert_no_leftovers(run)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["during-a-step", "during-validation", "while-saving-step-6", "while-pruning",
                                   "twice"])
def test_sigkill_then_resume_is_bit_identical(point: str, setup: Setup, reference_adapter: dict,
                                              tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "stderr.log"
    recipe = setup.recipe(tmp_path / "recipe.yaml", run)
    moments = {
        "during-a-step": [step_logged(run, 3)],  # step 3 is logged: step 4 is being computed
        "during-validation": [step_logged(run, 4)],  # step 4 is logged: its validation runs now, then its save
        "while-saving-step-6": [staging_dir(run, min_step=6)],
        "while-pruning": [pruning(run)],  # the third save deletes step 2 (keep_last 2)
        "twice": [step_logged(run, 3), staging_dir(run, min_step=6)],
    }[point]
    for moment in moments:
        with spawn("train", recipe, *(["--resume"] if (run / "checkpoints").is_dir() else []), log=log) as proc:
            wait_for(proc, moment, log, poll=0.0005)
            sigkill(proc)

    result = run_to_end("train", recipe, "--resume")

    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_adapter(run, reference_adapter)
    assert_no_leftovers(run)


@pytest.mark.slow
def test_sigint_saves_exits_130_and_resumes(setup: Setup, reference_adapter: dict, tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "stderr.log"
    recipe = setup.recipe(tmp_path / "recipe.yaml", run)
    with spawn("train", recipe, log=log) as proc:
        wait_for(proc, step_logged(run, 3), log)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    stderr = log.read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in stderr, stderr
    assert "--resume" in stderr, stderr
    saved = re.search(r"interrupted at step (\d+)", stderr)
    assert saved, stderr
    step_dir = run / "checkpoints" / f"step-{int(saved.group(1)):06d}"
    verify_checkpoint(step_dir)  # the checkpoint of the interrupted step exists and is complete
    assert not (run / ".lock").exists()

    result = run_to_end("train", recipe, "--resume")

    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(rf"resumed from\s+{re.escape(str(step_dir))}", result.stdout), result.stdout[-2000:]
    assert_same_adapter(run, reference_adapter)
    assert_no_leftovers(run)


# --------------------------------------------------------------------------- evaluation


@pytest.mark.slow
def test_eval_sigkill_then_rerun_gives_the_same_predictions(setup: Setup, reference_predictions: bytes,
                                                            tmp_path: Path) -> None:
    out, log = tmp_path / "out", tmp_path / "stderr.log"
    recipe = setup.recipe(tmp_path / "recipe.yaml", out)
    partial = out / "eval-base" / ".predictions.partial.jsonl"

    def some_predictions_written() -> bool:  # the header line and at least 3 predictions
        return partial.is_file() and partial.read_bytes().count(b"\n") >= 4

    with spawn("eval", recipe, log=log) as proc:
        wait_for(proc, some_predictions_written, log, poll=0.01)
        sigkill(proc)
    assert not (out / "eval-base" / "results.json").exists()
    written = partial.read_bytes().count(b"\n") - 1

    result = run_to_end("eval", recipe)

    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(rf"resuming:\s+{written}\s+predictions", result.stdout), result.stdout[-2000:]
    assert (out / "eval-base" / "predictions.jsonl").read_bytes() == reference_predictions
    assert json.loads((out / "eval-base" / "results.json").read_text())["n_instances"] == 12
    leftovers = [p.name for p in (out / "eval-base").iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_eval_keeps_predictions_and_says_interrupted(signum: int, setup: Setup, tmp_path: Path) -> None:
    """Ctrl-C or a scheduler's SIGTERM: exit 130 with an `interrupted` line, the partial predictions kept."""
    out, log = tmp_path / "out", tmp_path / "stderr.log"
    recipe = setup.recipe(tmp_path / "recipe.yaml", out)
    partial = out / "eval-base" / ".predictions.partial.jsonl"
    # longer answers: the 10 generations left after the first 2 take seconds, so the signal lands mid-evaluation
    # even when the test process waits for a busy core
    with spawn("eval", recipe, "eval.max_new_tokens=128", log=log) as proc:
        wait_for(proc, lambda: partial.is_file() and partial.read_bytes().count(b"\n") >= 2, log, poll=0.01)
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 130
    stderr = log.read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].strip() == "interrupted", stderr
    assert partial.read_bytes().count(b"\n") >= 2 and not (out / "eval-base" / "results.json").exists()
