"""What resuming a training run asks of the recipe and of the run directory: the settings a checkpoint's optimizer
and schedule restore stay as they were, and a directory whose every checkpoint is damaged says how to go on
rather than send the user back and forth between ``--resume`` and running without it."""

from __future__ import annotations

from pathlib import Path

import yaml

from orchmoe_cli.core import checkpoint as ckpt
from orchmoe_cli.core.records import first_difference
from orchmoe_cli.errors import OrchmoeError
from orchmoe_cli.paths import user_path
from orchmoe_cli.recipe import TrainConfig

# train fields a resumed run must keep: values the optimizer and scheduler state a checkpoint restores hold, and
# where its weights came from (init_from)
_RESTORED_FIELDS = ("lr", "router_lr", "hypernetwork_lr", "weight_decay", "schedule", "warmup_steps", "grad_accum",
                    "batch_size", "seed", "task_sampling", "group_by_length", "init_from")
# what each schedule is also a function of: the scheduler is rebuilt from the recipe, so a linear decay would
# jump to the learning rate of another length (a constant one does not depend on the length)
_SCHEDULE_FIELDS = {"linear": ("steps",), "constant": ()}
# data fields a resumed run may change: where the data is (it may have moved; the tasks are compared by name) and
# what only the held-out tasks' evaluation reads
_DATA_FIELDS_FREE = ("source", "split_dir", "cache_dir", "format", "max_test_instances", "max_pool_instances")
# what a checkpoint written before a field existed was trained with
_BEFORE_THE_FIELD = {"group_by_length": False}


def check_unchanged(checkpoint: Path, cfg: TrainConfig, recipe_yaml: str = "") -> None:
    """Resuming restores the optimizer and scheduler as saved, and goes on with the rows and adapters it
    started with: a changed setting they hold would be recorded but not used (or used for part of the run only),
    so it is refused, naming the field. ``train.steps`` counts only when training goes on past the checkpoint's
    step (at or below it, nothing is trained). ``recipe_yaml``: the run's recipe now, for its method and data."""
    saved = yaml.safe_load((checkpoint / "recipe.yaml").read_text(encoding="utf-8")) or {}
    if not isinstance(saved, dict):
        return
    current = yaml.safe_load(recipe_yaml) if recipe_yaml else {}
    for section in ("method", "data"):
        was, now = saved.get(section), (current or {}).get(section)
        if not isinstance(was, dict) or not isinstance(now, dict):
            continue
        kept = {name: value for name, value in now.items() if name in was and name not in _DATA_FIELDS_FREE}
        found = first_difference(was, kept, f"{section}.")
        if found is not None:
            field, old, new = found
            raise OrchmoeError(f"{field}: {new!r} differs from the {old!r} that {checkpoint} was trained with, and "
                               f"resuming would not continue the same run; resume with {field}="
                               f"{yaml.safe_dump(old, default_flow_style=True).strip().removesuffix('...').strip()} "
                               "or train afresh in another output.dir")
    train = saved.get("train")
    if not isinstance(train, dict):
        return
    step = int(checkpoint.name.partition("-")[2])  # latest_checkpoint returns only step-NNNNNN directories
    going_on = _SCHEDULE_FIELDS[cfg.schedule] if cfg.steps > step else ()
    for name in _RESTORED_FIELDS + going_on:
        saved_value = train.get(name, _BEFORE_THE_FIELD.get(name))
        if name == "init_from" and saved_value is not None:  # as this recipe's paths are: resolved
            saved_value = str(user_path(saved_value, "train.init_from"))
        if (name in train or name in _BEFORE_THE_FIELD) and saved_value != getattr(cfg, name):
            raise OrchmoeError(f"train.{name}: {getattr(cfg, name)!r} differs from the {saved_value!r} that "
                               f"{checkpoint} was trained with, and resuming would not continue the same run; "
                               f"resume with train.{name}={saved_value} or train afresh in another output.dir")


def latest_complete(run_dir: Path) -> Path | None:
    """The run's newest checkpoint that verifies, None when it has none. When every one is damaged, one line that
    says both ways on: restore the files to resume, or delete the damaged checkpoints (or choose another
    output.dir) to train afresh."""
    try:
        return ckpt.latest_checkpoint(run_dir)
    except OrchmoeError as exc:
        damaged = ckpt.step_directories(run_dir)
        which = damaged[0] if len(damaged) == 1 else Path(run_dir) / ckpt.CHECKPOINTS
        raise OrchmoeError(f"{exc}; restore the damaged files to continue with --resume, or train afresh: delete "
                           f"{which} or choose another output.dir") from None
