"""The `orchmoe` command line: parse options, load the recipe, call the core, render with rich.

Every command takes a recipe file plus dotted overrides (``eval.max_instances=20``). Problems the
user can fix are reported as one red line with exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import traceback
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from orchmoe_cli import __version__
from orchmoe_cli.commands.common import (adapt_list_override, load_checked, once, prompts_and_overrides,
                                         with_option_overrides)
from orchmoe_cli.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, OrchmoeError, recipe_source
from orchmoe_cli.recipe import Recipe, dump_recipe, load_recipe

try:  # recent typer vendors click; its usage errors live here
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - typer on plain click
    from click.exceptions import ClickException

console = Console(stderr=False)
err_console = Console(stderr=True)

app = typer.Typer(
    name="orchmoe",
    help="Multi-task parameter-efficient fine-tuning with modular LoRA skills (OrchMoE, Poly, MHR, HyperLoader).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

RecipeArg = Annotated[str, typer.Argument(help="Recipe YAML file (see recipes/).", show_default=False)]
OverridesArg = Annotated[
    Optional[list[str]],
    typer.Argument(help="Dotted overrides applied after the file, e.g. eval.max_instances=20.", show_default=False),
]
ShowConfig = Annotated[bool, typer.Option("--show-config", help="Print the resolved recipe and exit.")]


def _version(value: bool) -> None:
    if value:
        console.print(f"orchmoe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Multi-task PEFT with modular adapters, evaluated on Super-NaturalInstructions."""


def _load(recipe_path: str, overrides: list[str] | None, show_config: bool, writes: str | None = None) -> Recipe:
    """The resolved recipe (checked by :func:`commands.common.load_checked`); ``--show-config`` prints it.
    Called inside the command's ``recipe_source(recipe_path, overrides)``, which names the file, or the command
    line, in field errors."""
    if show_config:
        console.print(dump_recipe(load_recipe(recipe_path, overrides or [])), markup=False, highlight=False, end="")
        raise typer.Exit()
    return load_checked(recipe_path, overrides or [], writes)


@app.command()
def prepare(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    show_config: ShowConfig = False,
    export_table: Annotated[Optional[str], typer.Option(
        "--export-table", help="Write the recipe's SNI tasks as one table (.jsonl or .parquet: task, id, instruction, "
                               "category, split, input, output) instead of preparing them.")] = None,
) -> None:
    """Validate the recipe's tasks (SNI task files or a table) and encode them (Tk-Instruct prompts) into a cached
    Arrow dataset."""
    with recipe_source(recipe, overrides or []):
        loaded = _load(recipe, overrides, show_config)
        if export_table is not None:
            from orchmoe_cli.paths import claim_file

            from orchmoe_cli.data.table_files import check_table_name

            target = check_table_name(claim_file(export_table, "--export-table", option=True))  # before torch
            from orchmoe_cli.commands.prepare import export_table as run_export

            console.print(f"wrote {run_export(loaded, target):,} rows to {target}", highlight=False)
            return
        from orchmoe_cli.analysis.terminal_tables import prepared_table
        from orchmoe_cli.commands.prepare import prepare as run_prepare

        prepared = run_prepare(loaded, console)
        title = f"prepared {'(from cache) ' if prepared.from_cache else ''}{prepared.path}"
        console.print(prepared_table(title, prepared.manifest))


@app.command("eval")
def eval_command(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    show_config: ShowConfig = False,
    with_base: Annotated[
        bool, typer.Option("--with-base", help="Also evaluate the base model and print both side by side.")
    ] = False,
) -> None:
    """Generate on held-out tasks and score with the official SNI ROUGE-L / exact match."""
    with recipe_source(recipe, overrides or []):
        loaded = _load(recipe, overrides, show_config, writes="eval")
        from orchmoe_cli.analysis.terminal_tables import results_table
        from orchmoe_cli.commands.eval import evaluate
        from orchmoe_cli.core.results import task_rows
        from orchmoe_cli.fsutil import distinct

        outcomes = evaluate(loaded, str(recipe), console, with_base=with_base)
        if not outcomes:  # a non-main process of a distributed evaluation
            return
        labels = distinct([o.label for o in outcomes])  # a checkpoint folder named "base" beside the base model
        columns = {label: task_rows(o.rows, o.metrics) for label, o in zip(labels, outcomes)}
        overall = {label: o.metrics for label, o in zip(labels, outcomes)}
        console.print(results_table(f"{loaded.model.name} on {loaded.eval.split} tasks (SNI official metric)",
                                    columns, overall))
        for outcome in outcomes:
            console.print(f"{outcome.label}: results in {outcome.output_dir}/ (results.json, predictions.jsonl, results.md)")


@app.command()
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    show_config: ShowConfig = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint.")] = False,
) -> None:
    """Train the recipe's adapter method on the training tasks (accelerate; resumable)."""
    with recipe_source(recipe, overrides or []):
        loaded = _load(recipe, overrides, show_config, writes="train")
        from orchmoe_cli.commands.train import train as run_training

        outcome = run_training(loaded, console, resume=resume)
        if not outcome.is_main_process:
            return
        if outcome.interrupted:
            err_console.print(
                f"[yellow]interrupted at step {outcome.step}[/yellow]; checkpoint saved to {outcome.final_checkpoint}. "
                f"Resume with: orchmoe train {recipe} {' '.join(overrides or [])} --resume".rstrip(),
                highlight=False, soft_wrap=True,
            )
            sys.exit(EXIT_INTERRUPTED)  # already reported: not through typer.Exit, which main reports as interrupted
        if outcome.final_checkpoint is not None:
            console.print(f"trained {outcome.step} steps; adapter checkpoint: {outcome.final_checkpoint}")


@app.command()
def adapt(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    show_config: ShowConfig = False,
    shots: Annotated[Optional[str], typer.Option("--shots", help="k values, e.g. 16,64 (adapt.shots).")] = None,
    seeds: Annotated[Optional[str], typer.Option("--seeds", help="seeds, e.g. 13,42,58 (adapt.seeds).")] = None,
    modes: Annotated[Optional[str], typer.Option("--modes", help="modes, e.g. zero_shot,lora_scratch,mhr_z.")] = None,
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="held-out tasks (default: all with a pool).")] = None,
    keep_adapters: Annotated[bool, typer.Option("--keep-adapters", help="keep each cell's adapter.")] = False,
) -> None:
    """Few-shot adaptation of a trained checkpoint to held-out tasks: every mode x k x seed, resumable."""
    with recipe_source(recipe, overrides or []):
        every = with_option_overrides(overrides or [], {
            "--shots": adapt_list_override("shots", shots, int), "--seeds": adapt_list_override("seeds", seeds, int),
            "--modes": adapt_list_override("modes", modes, str), "--tasks": adapt_list_override("tasks", tasks, str),
            "--keep-adapters": "adapt.keep_adapters=true" if keep_adapters else None})
    with recipe_source(recipe, every):
        loaded = _load(recipe, every, show_config, writes="adapt")
        from orchmoe_cli.analysis.adaptation_report import (
            PREDICTIONS,
            RESULTS,
            read_results,
            summary_table,
            write_summary,
        )
        from orchmoe_cli.commands.adapt import adapt as run_adaptation

        out = run_adaptation(loaded, str(recipe), console)
        if out is None:  # another process of `accelerate launch`: the main one reports
            return
        summary = write_summary(out, read_results(out / RESULTS))
        console.print(summary_table(summary))
        console.print(f"results: {out}/ ({RESULTS}, adapt_summary.md, adapt_summary.json, sample_efficiency.png, "
                      f"{PREDICTIONS}/)",
                      highlight=False)


@app.command("inspect-routing")
def inspect_routing(
    checkpoint: Annotated[str, typer.Argument(help="Adapter checkpoint, or a run directory (its newest one).",
                                               show_default=False)],
    data: Annotated[Optional[str], typer.Option(
        "--data", help="Recipe whose data adds SNI categories and, for orchmoe, the classifier's view of every "
                       "real task (training and held-out); its model is loaded for that.")] = None,
    task: Annotated[Optional[list[str]], typer.Option("--task", help="Only these rows (tasks or abstract-N).")] = None,
    layer: Annotated[Optional[list[str]], typer.Option("--layer", help="Only layers matching (e.g. 3 or "
                                                                       "layers.3.self_attn.q_proj).")] = None,
    output_format: Annotated[str, typer.Option("--format", help="table, json or csv on standard output.")] = "table",
    out: Annotated[Optional[str], typer.Option("--out", help="Directory for routing.json, routing.csv and the "
                                                              "PNG figures (default: routing-<checkpoint> in the "
                                                              "run directory).")] = None,
) -> None:
    """Show which skills each task uses, how tasks cluster by routing, and what OrchMoE's classifier inferred."""
    if output_format not in ("table", "json", "csv"):
        raise OrchmoeError(f"--format: '{output_format}' is not one of table, json, csv")
    once(task, "--task")
    once(layer, "--layer")
    with recipe_source(data) if data is not None else contextlib.nullcontext():  # --data: a recipe
        recipe = _load(data, [], False) if data is not None else None
        from orchmoe_cli.analysis.routing_report import to_csv
        from orchmoe_cli.commands.inspect_routing import default_out_dir, inspect_checkpoint, write_report
        from orchmoe_cli.core.checkpoint import find_checkpoint
        from orchmoe_cli.paths import claim_directory, user_path

        given = out is not None  # an empty --out is refused, not taken for the default
        if given:
            user_path(out, "--out", option=True)  # before the checkpoint is looked for
        path = find_checkpoint(user_path(checkpoint, "CHECKPOINT", option=True))
        target = claim_directory(out if given else default_out_dir(path), "--out" if given else "the report folder "
                                 "(choose one with --out)", "inspect-routing", option=True)
        quiet = Console(stderr=True, quiet=output_format != "table")
        report = inspect_checkpoint(path, recipe, quiet, tasks=task, layers=layer)
        written = write_report(report, target)
        if output_format == "json":
            from orchmoe_cli.fsutil import json_text

            console.print_json(json_text(report.as_dict(), "standard output"))
            return
        if output_format == "csv":
            sys.stdout.write(to_csv(report))
            return
        from orchmoe_cli.analysis.terminal_tables import routing_summary, routing_table

        console.print(routing_table(report))
        for line in routing_summary(report):
            console.print(line, highlight=False)
        console.print(f"files: {written[0].parent}/ ({', '.join(p.name for p in written)})", highlight=False)


CheckpointArg = Annotated[str, typer.Argument(
    help="Adapter checkpoint, a run directory (its newest checkpoint), or none (the base model; needs --recipe).",
    show_default=False)]
RecipeOption = Annotated[Optional[str], typer.Option(
    "--recipe", help="Recipe to use instead of the one saved with the checkpoint (model, prompt format, eval.*).")]
@app.command()
def generate(
    checkpoint: CheckpointArg,
    words: Annotated[Optional[list[str]], typer.Argument(
        help="Prompts to answer, and dotted recipe overrides (eval.num_beams=4).", show_default=False)] = None,
    input_file: Annotated[Optional[str], typer.Option(
        "--input", help="JSONL / CSV / TSV rows with an input field (and optional instruction, task, id), or text "
                        "with one prompt per line; - reads standard input.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", help="JSONL file to write (default: standard "
                                                                   "output).")] = None,
    task: Annotated[Optional[str], typer.Option("--task", help="Task-routed methods: route as this training "
                                                               "task (default: the average of skills).")] = None,
    instruction: Annotated[Optional[str], typer.Option(
        "--instruction", help="The task definition to put in every prompt (rows may carry their own).")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the text as it is, without the training prompt "
                                                    "format.")] = False,
    route_only: Annotated[bool, typer.Option(
        "--route-only", help="Only say how each prompt is routed (OrchMoE: its abstract task and exported adapter "
                             "name), for a multi-LoRA server.")] = False,
    recipe: RecipeOption = None,
) -> None:
    """Answer free-text prompts with a trained checkpoint (or the base model), as JSONL."""
    prompts, overrides = prompts_and_overrides(words or [])
    with recipe_source(recipe, overrides) if recipe is not None else contextlib.nullcontext():
        from orchmoe_cli.commands.common import resolve_target
        from orchmoe_cli.commands.generate import generate as run_generate
        from orchmoe_cli.commands.generate import check_raw, read_prompts, write_rows
        from orchmoe_cli.paths import claim_file

        texts = read_prompts(prompts, input_file)
        if raw:
            check_raw(texts, instruction, "standard input" if input_file == "-" else input_file)
        if output is not None and output != "-":
            output = str(claim_file(output, "--output", option=True))
        target, loaded = resolve_target(checkpoint, recipe, overrides)
        rows = run_generate(checkpoint, texts, loaded, target, task, instruction, raw, route_only, err_console)
        write_rows(rows, output)
        if output is not None and output != "-":
            err_console.print(f"wrote {len(rows)} row(s) to {output}", highlight=False)


@app.command()
def export(
    checkpoint: CheckpointArg,
    to: Annotated[str, typer.Option("--to", help="peft (LoRA adapters PeftModel loads) or merged (full models "
                                                 "transformers loads).")],
    out: Annotated[str, typer.Option("--out", help="New directory to write (refused if it holds anything).")],
    task: Annotated[Optional[list[str]], typer.Option("--task", help="Task-routed methods: the tasks to export "
                                                                     "(repeatable).")] = None,
    all_tasks: Annotated[bool, typer.Option("--all-tasks", help="Task-routed methods: every training "
                                                                "task.")] = False,
    recipe: RecipeOption = None,
    overrides: OverridesArg = None,
) -> None:
    """Write a checkpoint as peft LoRA adapters or merged models (OrchMoE: one LoRA per abstract task + router)."""
    once(task, "--task")
    with recipe_source(recipe, overrides or []) if recipe is not None else contextlib.nullcontext():
        from orchmoe_cli.analysis.terminal_tables import exported_table
        from orchmoe_cli.commands.export import export as run_export
        from orchmoe_cli.paths import user_path

        target = user_path(str(out), "--out", option=True)
        manifest = run_export(checkpoint, to, task or [], all_tasks, target, recipe, overrides or [])
        console.print(exported_table(f"exported {manifest['method']} to {target} ({to})", manifest))
        if "trained_on" in manifest:
            console.print(f"trained on {manifest['trained_on']}", highlight=False)
        lossy = [e for e in manifest["adapters"] if e.get("update_kept", 1.0) < 0.9]
        if lossy:
            err_console.print(f"[yellow]warning:[/yellow] in {manifest['dtype']} the merged weights keep only "
                              f"{min(e['update_kept'] for e in lossy):.0%} of the adapter's update (rounding); "
                              "export --to peft, or merge into float32 weights with model.dtype=float32",
                              highlight=False)
        if "router" in manifest:
            console.print(f"router: {target}/{manifest['router']}/ (route each prompt with "
                          f"orchmoe generate {checkpoint} --route-only)", highlight=False)


@app.command()
def compare(
    runs: Annotated[list[str], typer.Argument(metavar="RUN", show_default=False, help="Evaluation directories, "
                                              "predictions JSONL files or run directories holding one evaluation; "
                                              "the first is the reference.")],
    output_format: Annotated[str, typer.Option("--format", help="table, json, csv or markdown.")] = "table",
    plot: Annotated[Optional[str], typer.Option("--plot", help="Also draw the intervals into this PNG.")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", min=1, help="Bootstrap resamples.",
                                                   show_default="10000")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Bootstrap seed.", show_default="0")] = None,
) -> None:
    """Each run minus the first in ROUGE-L and exact match, per task and overall, with 95% paired-bootstrap
    intervals over the same (task, id) instances."""
    if len(runs) < 2:
        raise typer.BadParameter("give at least two runs: the reference and one to compare with it", param_hint="RUN")
    from orchmoe_cli.commands.compare import compare as run_compare

    run_compare(runs, output_format, plot, samples, seed, console, err_console)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class _WarningLines(logging.Handler):
    """orchmoe's logged warnings as ``warning: ...`` lines on stderr, apart from results and the error line."""

    def emit(self, record: logging.LogRecord) -> None:
        err_console.print(f"[yellow]warning:[/yellow] {escape(record.getMessage())}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the Typer app, turning user errors into one line and exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    # bitsandbytes, imported by transformers / peft whenever installed, warns on every CPU start that an optional
    # kernel package is missing, even when nothing is quantised
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    package = logging.getLogger("orchmoe_cli")
    if not any(isinstance(handler, _WarningLines) for handler in package.handlers):
        package.addHandler(_WarningLines(logging.WARNING))
    if not console.is_terminal:  # logs and pipes: do not squeeze result tables into 80 columns
        console.width = max(console.width, 160)
    signal.signal(signal.SIGTERM, _terminate)  # kill, docker stop, SLURM: as Ctrl-C (train saves first)
    try:
        code = app(args=args, prog_name="orchmoe", standalone_mode=False)
    except OrchmoeError as exc:
        if debug:
            traceback.print_exc()
        err_console.print(f"[bold red]error:[/bold red] {escape(exc.message)}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(EXIT_BAD_INPUT)
    except ClickException as exc:
        if not exc.format_message().strip():  # `orchmoe` alone: the help was shown
            sys.exit(0)
        command = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "orchmoe"
        err_console.print(
            f"[bold red]error:[/bold red] {escape(exc.format_message())} (see '{command} --help')",
            highlight=False, soft_wrap=True,
        )
        sys.exit(EXIT_BAD_INPUT)
    except (KeyboardInterrupt, typer.Abort):
        err_console.print("[yellow]interrupted[/yellow]")
        sys.exit(EXIT_INTERRUPTED)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    if code == EXIT_INTERRUPTED:  # Typer turns a KeyboardInterrupt into this returned code
        err_console.print("[yellow]interrupted[/yellow]")
    sys.exit(code if isinstance(code, int) else 0)
