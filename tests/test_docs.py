"""The documentation's commands and snippets run as written: README.md and docs/*.md.

Every fenced ```bash / ```sh / ```python block is checked, and so is every inline `python ...` command:
(a) each flag a command gives exists: main.py's come from its parser (config keys and --preset --config --resume
    --dry_run --job_id), other scripts' from their own parse_args, train.sh's own (--sweep) from train.sh itself
    (the rest go to main.py), `accelerate launch`'s from accelerate's launch parser, sbatch's from a list;
(b) each script, requirements file and accelerate config a command names exists;
(c) the cheap ones run: every command with --dry_run runs as written, as a subprocess (at least
    `python main.py --preset paper --dry_run`), and every --help in-process; every other main.py command (also
    behind `accelerate launch` and `sbatch train.sh`) runs in-process with --dry_run added, unless it needs a run
    folder (--resume, $RUN); every other script's arguments go through its parse_args; every Python snippet is
    compiled and run, except those marked `<!-- test_docs: needs a run folder -->`, which are only compiled.
Also: local links and images resolve (their #anchors too), the README's test command is the one CI runs, and the
README stays a five-minute read.

Commands that do real work (the demo, the test suite, sbatch) are only checked, never run. A fenced ```yaml block
whose first line is `# NAME.yaml` stands for that file, for commands that pass `--config NAME.yaml`.
"""

import argparse
import contextlib
import dataclasses
import functools
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT_BYTES = 10_000
NEEDS_RUN = "needs a run folder"

# Scripts with a command line: the module whose parse_args parses it.
SCRIPTS = {name: name.removesuffix(".py") for name in (
    "main.py", "generate.py", "plot.py", "preprocess_dataset.py", "build_teacher_cache.py", "lm_eval_adapter.py",
    "study.py", "score.py", "push.py")}
# Side tools run as modules from the repository's root (`python -m benchmarks.bench`): the module is its own key.
SCRIPTS |= {module: module for module in ("benchmarks.bench", "benchmarks.bench_inference",
                                                    "benchmarks.demo_memory", "benchmarks.mutation_summary")}
TENSORBOARD_OPTIONS = {"--logdir", "--port", "--host", "--bind_all"}
MUTMUT_OPTIONS = {"run": {"--max-children"}, "results": {"--all"}}  # mutation testing (docs/layout.md), not installed
PYTHON_MODULES = {"pytest", "venv"}  # `python -m X` the docs may run
SHELL_PROGRAMS = {"cd", "mkdir", "ls", "head", "tail", ".", "source", "export", "cat", "echo"}  # harmless
SBATCH_OPTIONS = {"--array", "--chdir", "--cpus-per-task", "--dependency", "--gres", "--job-name", "--mem",
                  "--nodes", "--ntasks-per-node", "--open-mode", "--output", "--partition", "--requeue", "--signal",
                  "--time", "--account", "--qos", "--constraint", "--exclusive"}
SRUN_OPTIONS = {"--nodes", "--ntasks", "--ntasks-per-node", "--gres", "--cpus-per-task", "--export"}
PIP_OPTIONS = {"-r", "--requirement", "--no-deps", "-q", "--quiet", "-U", "--upgrade"}
OPERATORS = {"&&", "||", ";", "|", "&"}
SUBSTITUTION = re.compile(r"\$\([^()]*\)")  # $(...) becomes one placeholder word
PLACEHOLDER_VALUE = "SUBSTITUTED"
# A fenced block, with the note of a `<!-- test_docs: NOTE -->` line right above it.
FENCE = re.compile(r"(?:^<!--\s*test_docs:\s*(?P<note>[^>]*?)\s*-->\s*\n)?"
                   r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
INLINE_COMMAND = re.compile(r"(?<!`)`((?:python3?|accelerate launch|torchrun|sbatch) [^`]+)`(?!`)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@dataclasses.dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    body: str
    note: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(*langs: str) -> list[Block]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            if match["lang"] in langs:
                line = text.count("\n", 0, match.start("body"))
                found.append(Block(path, line, match["lang"], match["body"], (match["note"] or "").strip()))
    return found


SHELL_BLOCKS = blocks("bash", "sh")
PYTHON_BLOCKS = blocks("python")


def config_files(tmp_path: Path) -> dict[str, Path]:
    """The docs' ```yaml blocks that start with `# NAME.yaml`, written into tmp_path: {NAME.yaml: path}."""
    files = {}
    for block in blocks("yaml"):
        first = block.body.splitlines()[0].strip() if block.body.strip() else ""
        if re.fullmatch(r"#\s*[\w.-]+\.ya?ml", first):
            name = first.lstrip("#").strip()
            files[name] = tmp_path / name
            files[name].write_text(block.body)
    return files


# --- parsing shell -----------------------------------------------------------------------------------------------

def simple_commands(body: str) -> list[list[str]]:
    """The simple commands of a shell block: words, with comments, operators and VAR=value prefixes removed,
    $(...) replaced by a placeholder word, and $REPO / $PWD expanded to the repository."""
    commands = []
    for line in body.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(SUBSTITUTION.sub(PLACEHOLDER_VALUE, line), posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words = []
        for token in [*lexer, ";"]:
            if token in OPERATORS:
                while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
                    words.pop(0)
                if words:
                    commands.append([re.sub(r"\$\{?(REPO|PWD)\}?", str(ROOT), word) for word in words])
                words = []
            else:
                words.append(token)
    return commands


def flags(arguments: list[str]) -> list[str]:
    """The option names among arguments (--key=value gives --key), up to a bare --."""
    found = []
    for word in arguments:
        if word == "--":
            break
        if word.startswith("-") and not re.fullmatch(r"-\d[\d.e+-]*", word):
            found.append(word.split("=", 1)[0])
    return found


@functools.cache
def script_module(script: str):
    return importlib.import_module(SCRIPTS[script])


class _Captured(Exception):
    def __init__(self, parser):
        super().__init__()
        self.parser = parser


@functools.cache
def script_options(script: str) -> frozenset[str]:
    """The option strings of a script's command line: its parse_args builds the parser, which is caught before it
    parses anything."""
    def capture(self, *args, **kwargs):
        raise _Captured(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", capture):
        try:
            script_module(script).parse_args([])
        except _Captured as captured:
            return frozenset(captured.parser._option_string_actions)
    raise AssertionError(f"{script}.parse_args did not build an argparse parser")


@functools.cache
def accelerate_launch_options() -> frozenset[str]:
    from accelerate.commands.launch import launch_command_parser
    return frozenset(launch_command_parser()._option_string_actions)


@functools.cache
def torchrun_options() -> frozenset[str]:
    from torch.distributed.run import get_args_parser
    return frozenset(get_args_parser()._option_string_actions)


@functools.cache
def gpu_check_options() -> frozenset[str]:
    """gpu_check.sh's options: those it tests its first argument for (`"${1:-}" = "--pack"`)."""
    return frozenset(re.findall(r'"\$\{1:-\}" = "(--[\w-]+)"', (ROOT / "gpu_check.sh").read_text()))


def train_sh_options() -> frozenset[str]:
    """train.sh's own options: those its argument loop takes out (`if [ "$1" = "--sweep" ]`)."""
    return frozenset(re.findall(r'"\$1" = "(--[\w-]+)"', (ROOT / "train.sh").read_text()))


@dataclasses.dataclass
class Check:
    """What one shell command asks of the repository: problems found, and the main.py dry runs to make."""

    problems: list[str] = dataclasses.field(default_factory=list)
    dry_runs: list[list[str]] = dataclasses.field(default_factory=list)
    parses: list[tuple[str, list[str]]] = dataclasses.field(default_factory=list)

    def exists(self, path: str, what: str) -> bool:
        if "*" in path or PLACEHOLDER_VALUE in path or path.startswith("$"):
            return True
        if not (Path(path) if os.path.isabs(path) else ROOT / path).exists():
            self.problems.append(f"{what} {path} does not exist")
            return False
        return True

    def known_flags(self, arguments: list[str], known, owner: str) -> None:
        for flag in flags(arguments):
            if flag not in known:
                self.problems.append(f"{owner} has no option {flag}")

    def script(self, script: str, arguments: list[str]) -> None:
        """A project script run with arguments: it exists, names only its options, parses them."""
        name = Path(script).name
        if not self.exists(script, "script"):
            return
        if name not in SCRIPTS:
            self.problems.append(f"{script}: not a script tests/test_docs.py knows (add it to SCRIPTS)")
            return
        self.known_flags(arguments, script_options(name), name)
        if name == "main.py":
            self.dry_runs.append(arguments)
        else:
            self.parses.append((name, arguments))

    def command(self, words: list[str]) -> None:
        program, arguments = words[0], words[1:]
        if re.fullmatch(r"[A-Z_]+=\S*", program) and arguments:  # an environment setting for the command after it
            self.command(arguments)
        elif program in ("python", "python3"):
            if arguments[:1] == ["-m"] and arguments[1] in SCRIPTS:
                self.known_flags(arguments[2:], script_options(arguments[1]), arguments[1])
                self.parses.append((arguments[1], arguments[2:]))
            elif arguments[:1] == ["-m"]:
                if arguments[1] not in PYTHON_MODULES:
                    self.problems.append(f"python -m {arguments[1]}: not a module the docs may run")
            elif arguments and arguments[0].endswith(".py"):
                self.script(arguments[0], arguments[1:])
            else:
                self.problems.append(f"python {' '.join(arguments)}: expected a script or -m MODULE")
        elif program == "accelerate":
            scripts = [i for i, word in enumerate(arguments) if word.endswith(".py")]
            if arguments[:1] != ["launch"] or not scripts:
                self.problems.append("expected `accelerate launch [OPTIONS] SCRIPT.py ...`")
                return
            launch = arguments[1:scripts[0]]
            self.known_flags(launch, accelerate_launch_options(), "accelerate launch")
            for flag, value in zip(launch, launch[1:]):
                if flag in ("--config_file", "--config-file"):
                    self.exists(value, "accelerate config")
            self.script(arguments[scripts[0]], arguments[scripts[0] + 1:])
        elif program == "torchrun":
            scripts = [i for i, word in enumerate(arguments) if word.endswith(".py")]
            if not scripts:
                self.problems.append("expected `torchrun [OPTIONS] SCRIPT.py ...`")
                return
            self.known_flags(arguments[:scripts[0]], torchrun_options(), "torchrun")
            self.script(arguments[scripts[0]], arguments[scripts[0] + 1:])
        elif program == "srun":  # a step of a SLURM job: srun [--OPTION=VALUE ...] COMMAND...
            command = next((i for i, word in enumerate(arguments) if not word.startswith("-")), len(arguments))
            self.known_flags(arguments[:command], SRUN_OPTIONS, "srun")
            if command < len(arguments):
                self.command(arguments[command:])
        elif program == "sbatch":
            scripts = [i for i, word in enumerate(arguments) if word.endswith(".sh")]
            if not scripts or Path(arguments[scripts[0]]).name != "train.sh":
                self.problems.append("expected `sbatch [OPTIONS] train.sh ...`")
                return
            self.known_flags(arguments[:scripts[0]], SBATCH_OPTIONS, "sbatch")
            if self.exists(arguments[scripts[0]], "script"):
                self.train_sh(arguments[scripts[0] + 1:])
        elif program == "pip":
            self.known_flags(arguments[1:], PIP_OPTIONS, "pip install")
            for flag, value in zip(arguments, arguments[1:]):
                if flag in ("-r", "--requirement"):
                    self.exists(value, "requirements file")
        elif program == "bash":  # the project's shell scripts other than train.sh: gpu_check.sh
            if arguments[:1] != ["gpu_check.sh"]:
                self.problems.append("expected `bash gpu_check.sh [--pack]`")
            elif self.exists(arguments[0], "script"):
                self.known_flags(arguments[1:], gpu_check_options(), "gpu_check.sh")
        elif program == "tensorboard":  # installed with requirements.txt (report_to=tensorboard)
            self.known_flags(arguments, TENSORBOARD_OPTIONS, "tensorboard")
        elif program == "mutmut":
            if arguments[:1] and arguments[0] in MUTMUT_OPTIONS:
                self.known_flags(arguments[1:], MUTMUT_OPTIONS[arguments[0]], f"mutmut {arguments[0]}")
            else:
                self.problems.append(f"expected `mutmut {{{','.join(MUTMUT_OPTIONS)}}} ...`")
        elif program not in SHELL_PROGRAMS:
            self.problems.append(f"{program}: not a program tests/test_docs.py knows")

    def train_sh(self, arguments: list[str]) -> None:
        """train.sh's arguments: its own --sweep KEY=V0,V1,...; the rest go to main.py (one dry run per value)."""
        main_arguments, sweep = [], None
        words = iter(arguments)
        for word in words:
            if word in train_sh_options():
                sweep = next(words, "")
            else:
                main_arguments.append(word)
        self.known_flags(main_arguments, script_options("main.py") | train_sh_options(), "train.sh (main.py)")
        if sweep is None:
            self.dry_runs.append(main_arguments)
            return
        key, _, values = sweep.partition("=")
        if f"--{key}" not in script_options("main.py") or not values:
            self.problems.append(f"train.sh --sweep {sweep}: expected KEY=V0,V1,... with a main.py key")
            return
        self.dry_runs.extend([*main_arguments, f"--{key}", value] for value in values.split(","))


def check(commands: list[list[str]]) -> Check:
    result = Check()
    for words in commands:
        before = len(result.problems)
        result.command(words)
        result.problems[before:] = [f"`{shlex.join(words)}`: {problem}" for problem in result.problems[before:]]
    return result


def dry_run_main(arguments: list[str], configs: dict[str, Path]) -> str | None:
    """main.py with --dry_run added, in-process; None when it printed its plan, else what went wrong."""
    main = script_module("main.py")
    arguments = [str(configs.get(word, word)) for word in arguments]
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            code = main.main([*arguments, "--dry_run"])
    except SystemExit as error:
        code = error.code
    except Exception as error:  # noqa: BLE001 - any failure is the finding
        return f"{type(error).__name__}: {error}"
    if code != 0 or "Plan" not in output.getvalue():
        return f"exit code {code}: {output.getvalue()[-2000:]}"
    return None


def needs_run_folder(arguments: list[str]) -> bool:
    """Whether a main.py command cannot dry-run here: it needs a run folder (--resume, $RUN, a glob), or is --help
    (test_help_commands_print_usage runs those)."""
    return any(word in ("--help", "-h", "--resume", "--job_id") or PLACEHOLDER_VALUE in word or "$" in word
               or "*" in word for word in arguments)


# --- tests -------------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))


def test_the_docs_have_commands_and_snippets():
    assert (ROOT / "docs").is_dir() and len(DOCS) > 5
    assert len(SHELL_BLOCKS) > 10 and PYTHON_BLOCKS
    assert any(not block.note for block in PYTHON_BLOCKS), "no self-contained Python snippet runs"


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=str)
def test_shell_block(block, tmp_path):
    """(a) flags exist, (b) scripts and files exist; main.py commands dry-run, other scripts' arguments parse."""
    result = check(simple_commands(block.body))
    configs = config_files(tmp_path)
    for arguments in result.dry_runs:
        if needs_run_folder(arguments):
            continue
        for word in arguments:
            if word.endswith((".yaml", ".yml")) and word not in configs:
                result.exists(word, "config file")
        if not result.problems:
            problem = dry_run_main(arguments, configs)
            if problem:
                result.problems.append(f"`python main.py {shlex.join(arguments)} --dry_run`: {problem}")
    for script, arguments in result.parses:
        error = io.StringIO()
        try:
            with contextlib.redirect_stderr(error), contextlib.redirect_stdout(io.StringIO()):
                script_module(script).parse_args(arguments)
        except SystemExit:
            result.problems.append(f"`python {script} {shlex.join(arguments)}`: {error.getvalue().strip()}")
    assert not result.problems, f"{block}:\n" + "\n".join(result.problems)


def test_inline_commands():
    """Commands in running text name existing scripts and options too."""
    problems = []
    for path in DOCS:
        for command in INLINE_COMMAND.findall(path.read_text()):
            problems += [f"{path.relative_to(ROOT)}: {p}" for p in check(simple_commands(command)).problems]
    assert not problems, "\n".join(problems)


def cheap_commands(option: str) -> list[str]:
    """The docs' python commands that give `option` (--dry_run, --help), each once."""
    return sorted({shlex.join(words) for block in SHELL_BLOCKS for words in simple_commands(block.body)
                   if words[0] in ("python", "python3") and option in words})


@pytest.fixture(scope="module", autouse=True)
def dry_runs_as_written():
    """The --dry_run commands, started as subprocesses when this module's first test starts, so that they import
    torch while the tests import it in-process (this keeps the module under 30 s on 2 cores)."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    processes = {command: subprocess.Popen([sys.executable, *shlex.split(command)[1:]], cwd=ROOT, env=environment,
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for command in cheap_commands("--dry_run")}
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_dry_runs_run_as_written(dry_runs_as_written):
    """(c) Every command with --dry_run runs as written, in the repository, offline, and prints its plan."""
    assert "python main.py --preset paper --dry_run" in dry_runs_as_written
    failures = []
    for command, process in dry_runs_as_written.items():
        output, _ = process.communicate(timeout=180)
        plan = "Study " if shlex.split(command)[1] == "study.py" else "Plan"  # a study's plan lists its grid points
        if process.returncode != 0 or plan not in output:
            failures.append(f"`{command}` exited {process.returncode}:\n{output[-2000:]}")
    assert not failures, "\n".join(failures)


def test_help_commands_print_usage():
    """(c) Every command with --help prints its usage (in-process: the same parse_args the script runs)."""
    commands = cheap_commands("--help")
    assert "python main.py --help" in commands
    for command in commands:
        script, *arguments = shlex.split(command)[1:]
        output = io.StringIO()
        with contextlib.redirect_stdout(output), pytest.raises(SystemExit) as exit_:
            if script == "main.py":
                script_module(script).main(arguments)
            else:
                script_module(script).parse_args(arguments)
        assert exit_.value.code in (0, None) and "usage:" in output.getvalue(), command


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=str)
def test_python_snippet(block):
    """(c) Snippets compile; the self-contained ones run (those marked as needing a run folder only compile)."""
    code = compile(block.body, str(block), "exec")
    if block.note == NEEDS_RUN:
        return
    assert not block.note, f"{block}: unknown test_docs note {block.note!r} (known: {NEEDS_RUN!r})"
    with contextlib.redirect_stdout(io.StringIO()):
        exec(code, {"__name__": "__docs__"})  # noqa: S102 - the docs' own snippet


def test_local_links_resolve():
    """Links and images to files of the repository exist, and a #anchor names a heading of its file."""
    problems = []
    for path in DOCS:
        for target in LINK.findall(path.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                problems.append(f"{path.relative_to(ROOT)}: {target}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                problems.append(f"{path.relative_to(ROOT)}: {target}: no heading #{anchor} in {file or path.name}")
    assert not problems, "\n".join(problems)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_readme_gives_ci_test_command_and_install():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    test_command = next(line for line in reversed(ci) if "pytest" in line)
    readme = [words for block in SHELL_BLOCKS if block.path.name == "README.md"
              for words in simple_commands(block.body)]
    assert shlex.split(test_command) in readme, f"the README's test command must be CI's: {test_command}"
    assert ["python", "main.py"] in readme
    for line in ci:
        if line.startswith("pip install"):  # CI installs quietly (-q); the README the same way without it
            assert [word for word in shlex.split(line) if word != "-q"] in readme, line


def test_readme_is_short_and_links_everything():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < README_LIMIT_BYTES, "the README is a five-minute read: move detail into docs/"
    linked = {Path(target.partition("#")[0]) for target in LINK.findall(readme)}
    for doc in DOCS[1:]:
        assert doc.relative_to(ROOT) in linked, f"README.md does not link {doc.relative_to(ROOT)}"
    for name in ("LICENSE", "CITATION.cff", "results/evidence_d360/summary.md"):
        assert Path(name) in linked, f"README.md does not link {name}"


def test_metric_columns_are_documented():
    """Every metrics.csv column (records.METRIC_COLUMNS) is described in docs/combining.md; its demo results table
    shows num_tokens and seconds too."""
    columns = importlib.import_module("slm_ensembles.records").METRIC_COLUMNS
    described = (ROOT / "docs" / "combining.md").read_text()
    assert not [column for column in columns if f"`{column}`" not in described]
    header = next(line for line in described.splitlines() if line.startswith("| held-out"))
    assert "`num_tokens`" in header and "`seconds`" in header


def test_layout_names_every_file():
    layout = (ROOT / "docs" / "layout.md").read_text()
    files = sorted(str(path.relative_to(ROOT)) for pattern in ("*.py", "*.sh", "slm_ensembles/*.py",
                                                               "slm_ensembles/study/*.py", "benchmarks/*.py")
                   for path in ROOT.glob(pattern) if path.name != "__init__.py")
    assert not [name for name in files if f"`{name}`" not in layout], "docs/layout.md misses files"


def test_license_and_citation():
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    assert "Copyright 2026 The slm-ensembles authors" in license_text
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["title"] == "slm-ensembles"
    assert citation["message"] and citation["abstract"]
    assert citation["authors"] == [{"name": "The slm-ensembles authors"}]
    assert str(citation["date-released"]) == "2026-12-02" and citation["license"] == "Apache-2.0"


def test_every_number_in_the_readme_results_comes_from_a_committed_result_file():
    """Results are generated, not typed: each number the README's results section quotes (rounded as written)
    is a number of a committed file under results/."""
    from slm_ensembles.study.quoted import quoted_numbers_missing

    readme = (ROOT / "README.md").read_text()
    start = readme.index("\n## Results")
    section = readme[start:readme.index("\n## ", start + 1)]
    files = sorted((ROOT / "results").rglob("*.csv")) + sorted((ROOT / "results").rglob("*.md"))
    assert quoted_numbers_missing(section, files) == []
