"""Every command the README and the docs pages show still runs as shown.

Each `orchmoe ...` line of a ```bash block in README.md and docs/*.md (also under `accelerate launch`, `torchrun`
or `python -m orchmoe_cli`) must name a real command and only options that command has; a command whose recipe
ships with the repository runs with `--show-config` appended (so every override it shows must be a recipe field
with a valid value), the others, whose recipe or checkpoint an earlier step makes, run `COMMAND --help`. A `make`
line must name Makefile targets and variables, a benchmark script must exist and take the flags shown, and every
repository path shown must exist. All in process (tests/cli_runner.py): `--help` and `--show-config` import no
torch, so the whole file takes seconds.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
import yaml
from cli_runner import run_cli

from orchmoe_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RECIPE_COMMANDS = {"prepare", "train", "eval", "adapt"}  # take a recipe file first: --show-config checks it
# shell commands a walkthrough uses around orchmoe; anything else must be checked below or added here
OTHER_PROGRAMS = {"git", "export", "pip", "hf", "huggingface-cli", "cd", ".", "source"}
REPO_DIRS = ("recipes/", "benchmarks/", "docs/", "tests/", "orchmoe_cli/")  # paths shown under these must exist
SEPARATORS = {"&&", "||", ";", "|", "&"}


@dataclass(frozen=True)
class Shown:
    """One simple command of a bash block, where it is shown."""

    page: str
    line: int
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {shlex.join(self.argv)}"


def _expand_braces(token: str) -> list[str]:
    """Bash brace expansion of the first ``{a,b}`` group (recursively): ``x/{a,b}.y`` -> ``x/a.y``, ``x/b.y``."""
    match = re.search(r"\{([^{}]*,[^{}]*)\}", token)
    if match is None:
        return [token]
    return [expanded for choice in match.group(1).split(",")
            for expanded in _expand_braces(token[:match.start()] + choice + token[match.end():])]


def bash_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, command line) of every ```bash block, continuation lines joined."""
    in_block, pending, start = False, "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("```"):
            in_block = line.strip() == "```bash" and not in_block
            continue
        if not in_block:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def simple_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line (split at ``&&``, ``;``, ``|`` ...), comments and leading ``VAR=value``
    assignments dropped, braces expanded."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in SEPARATORS:
            commands.append([])
        elif commands[-1] or not re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", token):
            commands[-1].extend(_expand_braces(token))
    return [command for command in commands if command]


def shown_commands(pages: list[Path]) -> list[Shown]:
    found = []
    for page in pages:
        name = str(page.relative_to(REPO)) if page.is_relative_to(REPO) else page.name
        for number, line in bash_lines(page.read_text(encoding="utf-8")):
            found.extend(Shown(name, number, tuple(argv)) for argv in simple_commands(line))
    return found


SHOWN = shown_commands(PAGES)


# --------------------------------------------------------------------------- checks


def _options(command: typer.core.TyperCommand | typer.core.TyperGroup) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts) if opt.startswith("-")}


def _check_paths(shown: Shown) -> None:
    """Every repository path the command names exists (a glob must match something)."""
    for token in shown.argv:
        for value in {token, token.partition("=")[2]}:
            if value.startswith(REPO_DIRS):
                matches = list(REPO.glob(value)) if "*" in value else [REPO / value]
                assert any(p.exists() for p in matches), f"{shown}: {value} does not exist"


def _orchmoe_args(argv: tuple[str, ...]) -> list[str] | None:
    """The orchmoe arguments of a command that runs orchmoe (directly or as ``-m orchmoe_cli``), else None."""
    if Path(argv[0]).name == "orchmoe":
        return list(argv[1:])
    if "-m" in argv and argv.index("-m") + 1 < len(argv) and argv[argv.index("-m") + 1] == "orchmoe_cli":
        assert Path(argv[0]).name in {"accelerate", "torchrun", "python", "python3"}, f"{argv[0]} runs orchmoe_cli?"
        return list(argv[argv.index("-m") + 2:])
    return None


def check_orchmoe(shown: Shown, args: list[str]) -> None:
    group = typer.main.get_command(app)
    root = [arg for arg in args[:next((i for i, a in enumerate(args) if not a.startswith("-")), len(args))]]
    stale = sorted(set(root) - _options(group))
    assert not stale, f"{shown}: orchmoe has no option {stale[0]} (options of a command go after its name)"
    name, rest = args[len(root)], args[len(root) + 1:]
    assert name in group.commands, f"{shown}: no command '{name}' (orchmoe has {', '.join(group.commands)})"
    options = _options(group.commands[name])
    stale = sorted({arg.partition("=")[0] for arg in rest if arg.startswith("--")} - options)
    assert not stale, f"{shown}: `orchmoe {name}` has no option {stale[0]} (it has {', '.join(sorted(options))})"
    if name in RECIPE_COMMANDS and rest and (REPO / rest[0]).is_file():
        code = run_cli([*root, name, *rest, "--show-config"])
        assert code == 0, f"{shown}: exit {code} with --show-config (a stale field or value? see the output above)"
    else:  # its recipe or checkpoint is made by an earlier step (or is a placeholder)
        assert run_cli([name, "--help"]) == 0, f"{shown}: `orchmoe {name} --help` failed"


def check_make(shown: Shown) -> None:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", makefile, flags=re.MULTILINE))
    for arg in shown.argv[1:]:
        if "=" in arg:
            variable = arg.partition("=")[0]
            assert re.search(rf"\$\({variable}\)|^\s*(export\s+)?{variable}\s*[:?+]?=", makefile, flags=re.MULTILINE), (
                f"{shown}: the Makefile has no variable {variable}")
        elif not arg.startswith("-"):
            assert arg in targets, f"{shown}: the Makefile has no target '{arg}' (it has {', '.join(sorted(targets))})"


def check_script(shown: Shown) -> None:
    """``python benchmarks/x.py --flag`` or ``benchmarks/x.sh --flag``: the script exists and takes the flags."""
    argv = list(shown.argv)
    if Path(argv[0]).name.startswith("python"):
        if argv[1:2] == ["-m"]:
            assert argv[2] in {"pytest", "venv"}, f"{shown}: which module is this?"
            return
        if argv[1:2] == ["-c"]:
            return
        argv = argv[1:]
    script = REPO / argv[0]
    assert script.is_file(), f"{shown}: {argv[0]} does not exist"
    source = script.read_text(encoding="utf-8")
    if script.suffix == ".sh" and script.with_suffix(".py").is_file():  # a wrapper passing its arguments on
        source += script.with_suffix(".py").read_text(encoding="utf-8")
    for flag in (arg.partition("=")[0] for arg in argv[1:] if arg.startswith("--")):
        assert f'"{flag}"' in source or f"'{flag}'" in source, f"{shown}: {argv[0]} takes no {flag}"


def check(shown: Shown) -> None:
    _check_paths(shown)
    program = Path(shown.argv[0]).name or shown.argv[0]  # `.` (source) has no name
    args = _orchmoe_args(shown.argv)
    if args is not None:
        if program == "accelerate":
            assert shown.argv[1] == "launch", f"{shown}: accelerate launch?"
        check_orchmoe(shown, args)
    elif program == "make":
        check_make(shown)
    elif program.startswith("python") or shown.argv[0].startswith("benchmarks/"):
        check_script(shown)
    else:
        assert program in OTHER_PROGRAMS, f"{shown}: '{program}' is neither checked here nor a known other program"


@pytest.fixture()
def in_repository(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run where a user runs the commands, with the SNI variable the sni recipes read set (to an empty place)."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("ORCHMOE_SNI_DIR", str(tmp_path))


# --------------------------------------------------------------------------- tests


@pytest.mark.usefixtures("in_repository")
@pytest.mark.parametrize("shown", SHOWN, ids=str)
def test_shown_command_still_runs(shown: Shown) -> None:
    check(shown)


def test_the_pages_show_every_command() -> None:
    by_page: dict[str, set[str]] = {}
    for shown in SHOWN:
        args = _orchmoe_args(shown.argv)
        if args:
            by_page.setdefault(shown.page, set()).add(next(a for a in args if not a.startswith("-")))
    assert set(typer.main.get_command(app).commands) <= by_page["docs/commands.md"], by_page["docs/commands.md"]
    assert {"train", "eval", "generate", "export", "compare"} <= by_page["README.md"], by_page["README.md"]
    assert any(s.page == "README.md" and s.argv[:2] == ("make", "demo") for s in SHOWN)


@pytest.mark.usefixtures("in_repository")
@pytest.mark.parametrize(("line", "problem"), [
    ("orchmoe train recipes/quickstart.yaml --no-such-option", "has no option --no-such-option"),
    ("orchmoe train recipes/quickstart.yaml --debug", "has no option --debug"),
    ("orchmoe train recipes/quickstart.yaml eval.max_instance=20", "exit 2 with --show-config"),
    ("orchmoe evaluate recipes/quickstart.yaml", "no command 'evaluate'"),
    ("orchmoe train recipes/no-such-recipe.yaml", "recipes/no-such-recipe.yaml does not exist"),
    ("orchmoe generate runs/x --no-such-option", "has no option --no-such-option"),
    ("make no-such-target", "no target 'no-such-target'"),
    ("make install NO_SUCH_VARIABLE=1", "no variable NO_SUCH_VARIABLE"),
    ("python benchmarks/study/run.py --no-such-flag", "takes no --no-such-flag"),
    ("orchmoe-typo train R", "neither checked here"),
])
def test_a_stale_command_fails(tmp_path: Path, line: str, problem: str) -> None:
    page = tmp_path / "page.md"
    page.write_text(f"# A page\n\n```bash\n{line}\n```\n", encoding="utf-8")
    [shown] = shown_commands([page])
    with pytest.raises(AssertionError, match=re.escape(problem)):
        check(shown)


def test_lines_are_split_like_a_shell() -> None:
    assert simple_commands("A=1 make demo && orchmoe eval r.yaml x.y=2   # a comment") == [
        ["make", "demo"], ["orchmoe", "eval", "r.yaml", "x.y=2"]]
    assert simple_commands("orchmoe compare d/{a,b}.jsonl --format markdown") == [
        ["orchmoe", "compare", "d/a.jsonl", "d/b.jsonl", "--format", "markdown"]]
    text = "```bash\norchmoe train r.yaml \\\n  eval.x=1\n```\n```text\norchmoe not-a-command\n```\n"
    assert list(bash_lines(text)) == [(2, "orchmoe train r.yaml    eval.x=1")]


# --------------------------------------------------------------------------- what the pages say around commands


def test_yaml_excerpts_match_their_files() -> None:
    """A ```yaml block headed `# recipes/<file>.yaml` shows values the file really has."""
    for page in PAGES:
        for block in re.findall(r"```yaml\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.DOTALL):
            named = re.match(r"# ((?:recipes|benchmarks)/\S+\.yaml)", block)
            if named is None:
                continue
            shown, actual = yaml.safe_load(block), yaml.safe_load((REPO / named.group(1)).read_text(encoding="utf-8"))
            for section, fields in shown.items():
                for key, value in fields.items():
                    assert actual[section][key] == value, (
                        f"{page.name}: {named.group(1)} has {section}.{key}: {actual[section][key]!r}, not {value!r}")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_resolve() -> None:
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: link to {target}: no such file"
            if anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", linked.read_text(encoding="utf-8"), flags=re.MULTILINE)
                assert anchor in {_anchor(h) for h in headings}, f"{page.name}: link to {target}: no such heading"


def test_recipes_that_share_a_budget_share_one_lora_scale() -> None:
    """recipes/sni/ compares methods at equal size, which the pages say includes the LoRA scale alpha / rank."""
    scales = {}
    for path in sorted((REPO / "recipes" / "sni").glob("*.yaml")):
        method = yaml.safe_load(path.read_text(encoding="utf-8"))["method"]
        scales[path.name] = method.get("alpha"), method.get("rank")
    assert len(scales) == 7 and all(alpha is not None and rank is not None for alpha, rank in scales.values()), scales
    assert len({alpha / rank for alpha, rank in scales.values()}) == 1, scales
