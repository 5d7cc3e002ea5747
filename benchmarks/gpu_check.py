"""One GPU, a few minutes, one table: does orchmoe work on a GPU in bf16?

Offline (tiny models built from a config, the bundled SNI sample), every check in its own temporary directory:

1. ``orchmoe train``, ``orchmoe eval`` and ``orchmoe adapt`` (one short cell) for every registered routing method
   (``orchmoe_cli.adapters.registry.SPECS``), through the real command line, with ``model.dtype: bfloat16`` and
   ``train.mixed_precision: bf16``.
2. Merged against unmerged logits for every method that can merge: a bf16 base with non-zero adapters against the
   same model in fp32, as multiples of bf16's resolution at the logits' scale.
3. A synchronisation census: training under ``torch.cuda.set_sync_debug_mode("warn")``, host-device syncs per
   step and where they come from.
4. ``train.deterministic: true``: two runs of every method in a fresh process, adapters bit-identical.
5. The generation part of ``benchmarks/speed.py --quick`` on tiny-llama.

``--dry-run`` runs the same steps on the CPU in float32 at the smallest sizes (CI exercises the code paths);
what needs CUDA (the census, the bf16 comparison) reports "skipped: no GPU", and the merge check compares
float32 with float64 instead.

    benchmarks/gpu_check.sh              # on a machine with a GPU; under 8 minutes on one GPU
    benchmarks/gpu_check.sh --dry-run    # CPU: 30 s on 2 idle cores, about 2 minutes on busy ones

Exit code 0 when no check failed (WARN, INFO and SKIP do not fail), 1 otherwise. The table is Markdown, to paste into
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the dry run."""

    device: str
    dtype: str  # model.dtype
    mixed_precision: str  # train.mixed_precision
    tiny: dict[str, int]
    data: dict[str, int]
    method: dict[str, int]
    train: dict[str, int]
    eval: dict[str, int]
    eval_all_tasks: bool  # evaluate every held-out task, or only the first
    adapt: dict[str, Any]
    census_steps: tuple[int, int] = (2, 6)  # two lengths: their difference gives syncs per step
    speed_timeout_s: int = 300


GPU = Sizes(
    device="cuda", dtype="bfloat16", mixed_precision="bf16",
    tiny={"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 256},
    data={"max_source_length": 256, "max_target_length": 16, "max_train_instances": 8, "max_test_instances": 2,
          "max_pool_instances": 16},
    method={"rank": 4, "n_skills": 4, "n_abstract_tasks": 4},
    train={"steps": 8, "batch_size": 4, "log_every": 4, "val_instances": 1, "eval_every": 4},
    eval={"max_instances": 2, "batch_size": 2, "max_new_tokens": 16}, eval_all_tasks=True,
    adapt={"shots": [4], "seeds": [1], "steps": 4, "batch_size": 2, "val_instances": 2, "eval_every": 2},
)
DRY = Sizes(
    device="cpu", dtype="float32", mixed_precision="no",
    tiny={"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 64},
    data={"max_source_length": 64, "max_target_length": 8, "max_train_instances": 2, "max_test_instances": 1,
          "max_pool_instances": 4},
    method={"rank": 2, "n_skills": 2, "n_abstract_tasks": 2},
    train={"steps": 2, "batch_size": 2, "log_every": 1, "val_instances": 1, "eval_every": 2},
    eval={"max_instances": 1, "batch_size": 1, "max_new_tokens": 4}, eval_all_tasks=False,
    adapt={"shots": [2], "seeds": [1], "steps": 1, "batch_size": 2, "val_instances": 1, "eval_every": 1},
)

PASS, FAIL, WARN, SKIP, INFO = "PASS", "FAIL", "WARN", "SKIP", "INFO"
NO_GPU = "skipped: no GPU"


@dataclass
class Row:
    check: str
    result: str
    numbers: str


@dataclass
class Run:
    """One gpu_check invocation: its sizes, its work directory and the table it fills."""

    sizes: Sizes
    work: Path
    dry: bool
    rows: list[Row] = field(default_factory=list)

    def add(self, check: str, result: str, numbers: str) -> None:
        self.rows.append(Row(check, result, numbers))
        print(f"  {result:<5} {check}: {numbers}", file=sys.stderr, flush=True)

    def log(self, name: str) -> Path:
        path = self.work / "logs" / f"{name.replace(' ', '_').replace('/', '_')}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


# --------------------------------------------------------------------------- recipes and the command line


def held_out_tasks() -> list[str]:
    from orchmoe_cli.data.sni import bundled_dir

    return [t for t in (bundled_dir() / "test_tasks.txt").read_text(encoding="utf-8").split() if t]


def write_recipe(run: Run, method: str, out: Path, **train: Any) -> Path:
    """The recipe of one check: tiny-llama, the bundled sample, this run's sizes; ``train`` overrides."""
    import yaml

    s = run.sizes
    recipe = {
        "data": {"source": "bundled", "cache_dir": str(run.work / "prepared"), "num_pos_examples": 0, **s.data},
        "model": {"name": "tiny-llama", "dtype": s.dtype, "tiny": dict(s.tiny)},
        "method": {"name": method, **s.method},
        "train": {"mixed_precision": s.mixed_precision, "lr": 1e-3, **s.train, **train},
        "eval": {"checkpoint": "latest", **s.eval,
                 **({} if s.eval_all_tasks else {"tasks": held_out_tasks()[:1]})},
        "adapt": dict(s.adapt),
        "output": {"dir": str(out)},
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def cli(args: list[str], log: Path) -> tuple[int, str]:
    """``orchmoe ARGS`` in this process, its output into ``log``: (exit code, last line of an error)."""
    from orchmoe_cli.cli import main

    code, error = 0, ""
    with log.open("a", encoding="utf-8") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        print(f"$ orchmoe {' '.join(args)}", flush=True)
        try:
            main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception as exc:  # noqa: BLE001 - a crash is this check's result, not the end of the script
            traceback.print_exc()
            code, error = 1, f"{type(exc).__name__}: {exc}"
    if code and not error:
        lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        error = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
    return code, error.strip()[:160]


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def adapt_mode_for(method: str) -> str:
    """The first few-shot mode the method's family declares for a checkpoint of this method."""
    from orchmoe_cli.adapters.registry import SPECS

    family = SPECS[method].family
    return next((name for name, mode in family.adapt_modes.items() if method in mode.methods), "lora_scratch")


def check_commands(run: Run, methods: list[str]) -> None:
    """train, eval and one adapt cell per method, through `orchmoe`."""
    task = held_out_tasks()[0]
    for method in methods:
        out = run.work / "runs" / method
        recipe = write_recipe(run, method, out)
        log = run.log(f"commands-{method}")
        started = time.perf_counter()
        code, error = cli(["train", str(recipe)], log)
        seconds = time.perf_counter() - started
        if code:
            run.add(f"train {method}", FAIL, f"exit {code}: {error} (log {log})")
            run.add(f"eval {method}", SKIP, "train failed")
            run.add(f"adapt {method}", SKIP, "train failed")
            continue
        losses = [r["loss"] for r in _jsonl(out / "metrics.jsonl") if "loss" in r]
        val = [r["val_loss"] for r in _jsonl(out / "metrics.jsonl") if "val_loss" in r]
        summary = json.loads((out / "train_summary.json").read_text(encoding="utf-8"))
        if not losses:
            run.add(f"train {method}", FAIL, f"exit 0 but metrics.jsonl holds no loss (log {log})")
            continue
        finite = all(math.isfinite(v) for v in losses + val)
        numbers = (f"{summary['step']} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
                   + (f", val {val[-1]:.3f}" if val else "") + f", {run.sizes.dtype}, {seconds:.1f} s")
        run.add(f"train {method}", PASS if finite and summary["step"] == run.sizes.train["steps"] else FAIL, numbers)

        started = time.perf_counter()
        code, error = cli(["eval", str(recipe)], log)
        seconds = time.perf_counter() - started
        results = sorted(out.glob("eval-step-*/results.json"))
        if code or not results:
            run.add(f"eval {method}", FAIL, f"exit {code}: {error} (log {log})")
        else:
            found = json.loads(results[-1].read_text(encoding="utf-8"))
            run.add(f"eval {method}", PASS, f"instances: {found['n_instances']}, ROUGE-L "
                                             f"{found['results']['rougeL']:.2f}, {seconds:.1f} s")

        mode = adapt_mode_for(method)
        started = time.perf_counter()
        code, error = cli(["adapt", str(recipe), "--modes", mode, "--tasks", task], log)
        seconds = time.perf_counter() - started
        result_file = out / "adapt" / "adapt_results.jsonl"
        if code or not result_file.is_file():
            run.add(f"adapt {method} ({mode})", FAIL, f"exit {code}: {error} (log {log})")
        else:
            cell = _jsonl(result_file)[-1]
            run.add(f"adapt {method} ({mode})", PASS,
                    f"k={cell['shots']}, {cell['steps_run']} steps, {cell['trainable']:,} trainable, ROUGE-L "
                    f"{cell['rougeL']:.2f}, {seconds:.1f} s")
        free_memory()


# --------------------------------------------------------------------------- merged against unmerged


def short_name(dtype: Any) -> str:
    return {"torch.bfloat16": "bf16", "torch.float32": "fp32", "torch.float64": "fp64"}.get(str(dtype), str(dtype))


UPDATE_SIZE = 1e-2  # every adapted layer's folded update |dW| / |W| in the merge check


def merge_logits(model_cfg: Any, saved: Path, ids: Any, task_ids: Any, dtype: Any,
                 whole_model: bool) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """On a base in ``dtype`` with the adapter at ``saved`` (``whole_model``: the adapters in ``dtype`` too, else
    as loaded, as `orchmoe eval` has them): logits of the bare base, routed unmerged, and merged into the weights;
    each adapted weight's change when merged (float64); whether ``unmerge`` restored the weights exactly."""
    import torch

    from orchmoe_cli.adapters import load_adapted
    from orchmoe_cli.core.base_models import load_model

    base = load_model(model_cfg).model.to(device=ids.device, dtype=dtype)
    with torch.no_grad():
        found = {"base": base(input_ids=ids).logits.double()}
        model = load_adapted(base, saved).eval()
        if whole_model:
            model.to(dtype)
        with model.routing(task_ids=task_ids):
            found["unmerged"] = model.base(input_ids=ids).logits.double()
        before = {name: p.detach().clone() for name, p in model.base.named_parameters()
                  if name.endswith("base_layer.weight")}
        model.merge(None if task_ids is None else int(task_ids[0]))
        found["merged"] = model.base(input_ids=ids).logits.double()
        weights = dict(model.base.named_parameters())
        deltas = {name: weights[name].double() - weight.double() for name, weight in before.items()}
        model.unmerge()
        exact = all(torch.equal(weights[name], weight) for name, weight in before.items())
    return found, deltas, exact


def scale_updates(adapted: Any, task: int | None, size: float) -> None:
    """Scale each layer's B so that the update merged for ``task`` is ``size`` times the layer's weight (norms)."""
    import torch

    with torch.no_grad():
        before = {name: p.detach().clone() for name, p in adapted.base.named_parameters()
                  if name.endswith("base_layer.weight")}
        adapted.merge(task)
        weights = dict(adapted.base.named_parameters())
        relative = {name: float((weights[name] - w).norm() / w.norm()) for name, w in before.items()}
        adapted.unmerge()
        for name, module in adapted.base.named_modules():
            key = f"{name}.base_layer.weight"
            if key in relative and relative[key] > 0 and hasattr(module, "lora_B"):
                module.lora_B.mul_(size / relative[key])


def check_merge_method(run: Run, method: str, low: Any, high: Any) -> None:
    import torch

    from orchmoe_cli.adapters import attach_adapters
    from orchmoe_cli.core.base_models import load_model
    from orchmoe_cli.recipe import load_recipe

    recipe = load_recipe(write_recipe(run, method, run.work / "merge" / method))
    torch.manual_seed(0)
    adapted = attach_adapters(load_model(recipe.model).model.float(), recipe.method, ["task_a", "task_b", "task_c"])
    adapted.eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-zero adapters: B (and routing logits) away from their initial values
        for _, param in adapted.named_adapter_parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    task = 1 if adapted.family.needs_task_ids else None
    scale_updates(adapted, task, UPDATE_SIZE)
    saved = run.work / "merge" / method / "adapter"
    adapted.save(saved)
    device = torch.device(run.sizes.device)
    ids = torch.randint(3, adapted.base.get_input_embeddings().num_embeddings, (2, 24), generator=generator)
    ids = ids.to(device)
    task_ids = None if task is None else torch.full((2,), task, device=device)
    ref, ref_deltas, ref_exact = merge_logits(recipe.model, saved, ids, task_ids, high, whole_model=True)
    got, got_deltas, got_exact = merge_logits(recipe.model, saved, ids, task_ids, low, whole_model=False)
    scale = ref["unmerged"].abs().max().item()
    res, res_high = torch.finfo(low).eps * scale, torch.finfo(high).eps * scale  # resolutions at the logits' scale

    def units(a: torch.Tensor, b: torch.Tensor, resolution: float = res) -> float:
        return (a - b).abs().max().item() / resolution

    effect = units(ref["unmerged"], ref["base"])
    unmerged, merged = units(got["unmerged"], ref["unmerged"]), units(got["merged"], ref["unmerged"])
    fold_high = units(ref["merged"], ref["unmerged"], res_high)
    lost = sorted(float((got_deltas[n] - d).norm() / d.norm()) for n, d in ref_deltas.items())[len(ref_deltas) // 2]
    lo, hi = short_name(low), short_name(high)
    numbers = (f"logits in {lo} resolutions at their scale ({res:.2g}): adapter effect {effect:.0f}, "
               f"unmerged-{hi} {unmerged:.1f}, merged-{hi} {merged:.1f}, merged-unmerged "
               f"{units(got['merged'], got['unmerged']):.1f}; {hi} merged-unmerged {fold_high:.1f} {hi} "
               f"resolutions; folding into {lo} weights loses {lost:.1%} of an update {UPDATE_SIZE:.0%} the "
               f"weight's norm (median layer); unmerge exact: {ref_exact and got_exact}")
    finite = all(bool(torch.isfinite(t).all()) for found in (ref, got) for t in found.values())
    if not finite or not (ref_exact and got_exact) or fold_high > 256:
        result = FAIL  # broken merge arithmetic, or the base weights not restored
    elif lost > 0.1 or merged > 2 * unmerged + 2:
        result = WARN  # folding into `low` weights loses more than computing in `low` does
    else:
        result = PASS
    run.add(f"merge {method} {lo} vs {hi}", result, numbers)


def check_merge(run: Run, methods: list[str]) -> None:
    """``merge(task)`` against routed unmerged logits for every method that can merge: a base in the run's dtype
    (bf16 on a GPU) against the same model in a higher precision (fp32)."""
    import torch

    from orchmoe_cli.adapters.registry import SPECS

    low, high = (torch.float32, torch.float64) if run.dry else (torch.bfloat16, torch.float32)
    if run.dry:
        run.add("merge bf16 vs fp32 (every mergeable method)", SKIP, NO_GPU)
    for method in [m for m in methods if SPECS[m].family.mergeable]:
        try:
            check_merge_method(run, method, low, high)
        except Exception as exc:  # noqa: BLE001
            with run.log(f"merge-{method}").open("a", encoding="utf-8") as sink:
                traceback.print_exc(file=sink)
            check = f"merge {method} {short_name(low)} vs {short_name(high)}"
            run.add(check, FAIL, f"{type(exc).__name__}: {exc}"[:200])
        free_memory()


# --------------------------------------------------------------------------- synchronisation census


@contextlib.contextmanager
def sync_warnings(cuda: bool) -> Iterator[list[warnings.WarningMessage]]:
    """Every warning raised inside, with CUDA's synchronisation warnings switched on (when there is CUDA)."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")


def _site(w: warnings.WarningMessage) -> str:
    path = Path(w.filename)
    for root in (REPO, Path(sys.prefix)):
        with contextlib.suppress(ValueError):
            path = path.relative_to(root)
            break
    parts = path.parts
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1 :]
    return f"{'/'.join(parts)}:{w.lineno}"


def check_sync(run: Run, methods: list[str]) -> None:
    """Host-device synchronisations of a short `orchmoe train` per method: per step, and the rest (setup, the end).

    Without CUDA the census loop still runs, for the first method, so that the code a GPU run needs stays tested."""
    import torch

    cuda = torch.cuda.is_available()
    short, long = run.sizes.census_steps
    for method in methods if cuda else methods[:1]:
        counts: dict[int, int] = {}
        sites: Counter[str] = Counter()
        error = ""
        for steps in (short, long):
            out = run.work / "sync" / f"{method}-{steps}"
            # validation off and logging only at the end: what remains per step is the loop itself
            recipe = write_recipe(run, method, out, steps=steps, val_instances=0, log_every=1000)
            with sync_warnings(cuda) as caught:
                code, error = cli(["train", str(recipe)], run.log(f"sync-{method}"))
            if code:
                break
            syncs = [w for w in caught if "synchronizing" in str(w.message)]
            counts[steps] = len(syncs)
            if steps == long:
                sites = Counter(_site(w) for w in syncs)
        if error or len(counts) < 2:
            run.add(f"sync census {method}", FAIL, f"train failed: {error}")
            continue
        per_step = (counts[long] - counts[short]) / (long - short)
        top = ", ".join(f"{site} x{n}" for site, n in sites.most_common(3)) or "none"
        numbers = (f"{per_step:.1f} per step, {counts[short] - short * per_step:.0f} in setup and the end "
                   f"({long}-step run: {counts[long]}); top: {top}")
        if cuda:
            run.add(f"sync census {method}", INFO, numbers)
        else:
            run.add("sync census (every method)", SKIP, f"{NO_GPU} (its loop ran on CPU for {method}: {numbers})")
        free_memory()


# --------------------------------------------------------------------------- deterministic mode


def deterministic_worker(run: Run, methods: list[str]) -> dict[str, Any]:
    """In a fresh process (orchmoe's deterministic settings must come before CUDA is first used): two
    `orchmoe train` runs with train.deterministic: true per method; their adapter checksums."""
    found: dict[str, Any] = {"cublas_workspace_config_before": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
    for method in methods:
        checksums, errors, seconds = [], [], 0.0
        for attempt in (1, 2):
            out = run.work / "deterministic" / f"{method}-{attempt}"
            recipe = write_recipe(run, method, out, deterministic=True, val_instances=0)
            started = time.perf_counter()
            code, error = cli(["train", str(recipe)], run.log(f"deterministic-{method}"))
            seconds += time.perf_counter() - started
            if code:
                errors.append(error)
                continue
            summary = json.loads((out / "train_summary.json").read_text(encoding="utf-8"))
            checksums.append(summary["adapter_checksums"][0])
        found[method] = {"checksums": checksums, "errors": errors, "seconds": round(seconds, 1)}
    found["cublas_workspace_config_after"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    return found


def check_deterministic(run: Run, methods: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}  # orchmoe's own handling
    out = run.work / "deterministic.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--_deterministic-worker", str(out),
               "--workdir", str(run.work), "--methods", ",".join(methods)] + (["--dry-run"] if run.dry else [])
    log = run.log("deterministic-worker")
    with log.open("w", encoding="utf-8") as sink:
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=run.work, check=False)
    if done.returncode or not out.is_file():
        run.add("deterministic (every method)", FAIL, f"worker exit {done.returncode} (log {log})")
        return
    found = json.loads(out.read_text(encoding="utf-8"))
    workspace = found.get("cublas_workspace_config_after")
    for method in methods:
        entry = found[method]
        if entry["errors"]:
            run.add(f"deterministic {method}", FAIL, f"{entry['errors'][0]} (CUBLAS_WORKSPACE_CONFIG as set by "
                                                     f"orchmoe: {workspace!r})")
        elif len(set(entry["checksums"])) == 1:
            run.add(f"deterministic {method}", PASS, f"2 runs, adapters bit-identical, {entry['seconds']:.1f} s; "
                                                     f"CUBLAS_WORKSPACE_CONFIG {workspace!r}")
        else:
            run.add(f"deterministic {method}", FAIL, "2 runs, adapter checksums differ")


# --------------------------------------------------------------------------- speed.py generation


def check_speed(run: Run, budget_s: float) -> None:
    """`benchmarks/speed.py --quick`, generation only, on tiny-llama (no download). The dry run only checks that
    the script still takes these flags (its generation alone takes about a minute on 2 CPU cores)."""
    out = run.work / "speed.json"
    log = run.log("speed")
    flags = ["--quick", "--models", "", "--out", str(out)]
    started = time.perf_counter()
    if run.dry:
        import runpy

        argv = sys.argv
        sys.argv = ["speed.py", *flags, "--generation-model", "none", "--device", "cpu"]
        try:
            with log.open("w", encoding="utf-8") as sink, contextlib.redirect_stdout(sink):
                runpy.run_path(str(REPO / "benchmarks" / "speed.py"), run_name="__main__")
        finally:
            sys.argv = argv
        seconds = time.perf_counter() - started
        run.add("speed.py --quick generation", SKIP, "dry run: about a minute on CPU; its flags parse "
                                                     f"(--generation-model none, {seconds:.1f} s)")
        return
    command = [sys.executable, str(REPO / "benchmarks" / "speed.py"), *flags, "--generation-model", "tiny-llama",
               "--device", run.sizes.device]
    timeout = max(30, min(run.sizes.speed_timeout_s, budget_s))
    try:
        with log.open("w", encoding="utf-8") as sink:
            done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, cwd=run.work, timeout=timeout,
                                  check=False)
    except subprocess.TimeoutExpired:
        run.add("speed.py --quick generation", FAIL, f"over {timeout:.0f} s (log {log})")
        return
    seconds = time.perf_counter() - started
    if done.returncode or not out.is_file():
        run.add("speed.py --quick generation", FAIL, f"exit {done.returncode} (log {log})")
        return
    rows = json.loads(out.read_text(encoding="utf-8"))["generate"]
    bare = next(r for r in rows if r["variant"] == "bare")
    ratios = ", ".join(f"{r['variant']} {r['vs_bare']:.2f}x" for r in rows if r["variant"] != "bare")
    missed = [line.strip()[len("MISSED"):].strip() for line in log.read_text(encoding="utf-8").splitlines()
              if line.strip().startswith("MISSED")]
    # speed.py's targets are set for SmolLM2-135M; on tiny-llama they are indicative only, hence INFO
    run.add("speed.py --quick generation", INFO,
            f"tiny-llama, bare {bare['tokens_per_s']:.0f} tokens/s; adapted/bare: {ratios}; {seconds:.0f} s"
            + (f"; speed.py targets missed (set for SmolLM2-135M): {'; '.join(missed)}" if missed else ""))


# --------------------------------------------------------------------------- the table


def table(rows: list[Row]) -> str:
    lines = ["| check | result | numbers |", "|---|---|---|"]
    lines += [f"| {r.check} | {r.result} | {r.numbers.replace('|', '/')} |" for r in rows]
    return "\n".join(lines)


def describe_device(dry: bool) -> str:
    import torch

    if dry:
        return f"dry run: CPU, float32, torch {torch.__version__}"
    return f"{torch.cuda.get_device_name()}, bf16, torch {torch.__version__}, CUDA {torch.version.cuda}"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, float32, smallest sizes; skips what needs CUDA")
    parser.add_argument("--methods", default="", help="comma-separated methods (default: every registered one)")
    parser.add_argument("--workdir", default="", help="where runs and logs go (default: a new temporary directory, "
                                                      "removed at the end unless a check failed or --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: commands, merge, sync, "
                                                   "deterministic, speed")
    parser.add_argument("--json", default="", help="also write the table as JSON here")
    parser.add_argument("--_deterministic-worker", dest="worker", default="", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: the CPU even on a GPU machine
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from orchmoe_cli.adapters.registry import SPECS

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no GPU visible; run it on a machine with one, or pass --dry-run", file=sys.stderr)
        return 2
    methods = [m for m in args.methods.split(",") if m] or list(SPECS)
    unknown = [m for m in methods if m not in SPECS]
    if unknown:
        print(f"gpu_check: unknown method(s) {', '.join(unknown)}; registered: {', '.join(SPECS)}", file=sys.stderr)
        return 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="orchmoe-gpu-check-")).resolve()
    run = Run(DRY if args.dry_run else GPU, work, args.dry_run)
    if args.worker:
        Path(args.worker).write_text(json.dumps(deterministic_worker(run, methods)), encoding="utf-8")
        return 0

    skip = set(filter(None, args.skip.split(",")))
    started = time.perf_counter()
    print(f"gpu_check: {describe_device(run.dry)}; methods {', '.join(methods)}; work directory {work}",
          file=sys.stderr, flush=True)
    parts: list[tuple[str, Callable[[], None]]] = [
        ("commands", lambda: check_commands(run, methods)),
        ("merge", lambda: check_merge(run, methods)),
        ("sync", lambda: check_sync(run, methods)),
        ("deterministic", lambda: check_deterministic(run, methods)),
        ("speed", lambda: check_speed(run, 8 * 60 - (time.perf_counter() - started))),
    ]
    for name, part in parts:
        if name in skip:
            run.add(name, SKIP, "--skip")
            continue
        try:
            part()
        except Exception as exc:  # noqa: BLE001 - one broken part must not hide the others' rows
            traceback.print_exc()
            run.add(name, FAIL, f"{type(exc).__name__}: {exc}"[:200])
    wall = time.perf_counter() - started
    failed = [r for r in run.rows if r.result == FAIL]
    print(f"\n{describe_device(run.dry)}; {len(run.rows)} checks, {len(failed)} failed; wall {wall:.0f} s\n")
    print(table(run.rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": describe_device(run.dry), "wall_s": round(wall, 1),
                                               "rows": [r.__dict__ for r in run.rows]}, indent=2) + "\n")
    if failed or args.keep or args.workdir:
        print(f"\nlogs and runs: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
