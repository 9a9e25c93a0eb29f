"""Importing the project's modules has no side effects (no files, environment, logging, threads or signal handlers),
and their imports keep to the layers drawn in docs/layout.md: no circle, no import hidden inside a function, none
from a layer above.

The third-party libraries the modules use are imported first (with their lazily imported parts) and the state is
taken after them, so only what the project's own top-level code does is compared.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
PACKAGES = ("slm_ensembles", "slm_ensembles.study", "benchmarks")  # the machinery, the study's pieces; side tools
MODULES = sorted([path.stem for path in REPOSITORY.glob("*.py")]
                 + [f"{package}.{path.stem}" for package in PACKAGES
                    for path in (REPOSITORY / package.replace(".", "/")).glob("*.py") if path.stem != "__init__"])

PROBE = """
import json, logging, os, signal, sys, warnings
import torch, transformers, trl, datasets, accelerate, pandas, matplotlib
# transformers and trl import their submodules lazily, on first attribute access: do it before the first state
transformers.PreTrainedModel, transformers.GenerationMixin, transformers.LlamaForCausalLM, trl.SFTTrainer

def state():
    return {
        "environment": dict(os.environ),
        "root_handlers": [repr(h) for h in logging.getLogger().handlers],
        "root_level": logging.getLogger().level,
        "threads": torch.get_num_threads(),
        "default_dtype": str(torch.get_default_dtype()),
        "grad_enabled": torch.is_grad_enabled(),
        "signals": {name: repr(signal.getsignal(getattr(signal, name))) for name in ("SIGTERM", "SIGUSR1", "SIGINT")},
        "warning_filters": len(warnings.filters),
        "rng": torch.random.get_rng_state().sum().item(),
    }

before = state()
sys.path.insert(0, sys.argv[1])
for module in json.loads(sys.argv[2]):
    __import__(module)
print(json.dumps({"before": before, "after": state()}))
"""


def test_the_modules_exist():
    assert DESIGN_CARD | {"slm_ensembles.losses"} <= set(MODULES)


def test_importing_every_module_changes_nothing(tmp_path):
    result = subprocess.run([sys.executable, "-c", PROBE, str(REPOSITORY), json.dumps(MODULES)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    states = json.loads(result.stdout.strip().splitlines()[-1])
    before, after = states["before"], states["after"]
    new_variables = set(after["environment"]) - set(before["environment"])
    changed = {k for k in before["environment"] if after["environment"].get(k) != before["environment"][k]}
    assert not new_variables and not changed, (new_variables, changed)
    for key in ("root_handlers", "root_level", "threads", "default_dtype", "grad_enabled", "signals",
                "warning_filters", "rng"):
        assert after[key] == before[key], key
    assert list(tmp_path.iterdir()) == []  # nothing written into the working folder


# --- layers: what may import what ------------------------------------------------------------------------------------

# The project's modules, bottom first (drawn in docs/layout.md). A module imports only from its own layer or those
# below it, so that the ones at the bottom can be read, tested and changed without the scripts above them.
LAYERS = {
    "foundation": ["checksums", "config", "model_io", "slm_ensembles.run_layout", "slm_ensembles.files",
                   "slm_ensembles.compute", "slm_ensembles.processes"],
    "parts": ["utils", "preprocess_dataset", "ensemble", "slm_ensembles.embedded", "slm_ensembles.students",
              "slm_ensembles.losses", "slm_ensembles.tracking", "slm_ensembles.answer_text",
              "slm_ensembles.scoring", "slm_ensembles.study.grid", "slm_ensembles.study.matching",
              "slm_ensembles.study.quoted"],
    "state": ["slm_ensembles.run_state", "slm_ensembles.teacher_cache", "slm_ensembles.distributed_ensemble"],
    "stages": ["train", "plot", "slm_ensembles.evaluation", "slm_ensembles.dry_run", "slm_ensembles.model_card",
               "slm_ensembles.teacher", "slm_ensembles.records", "push", "slm_ensembles.study.status",
               "slm_ensembles.study.spec", "slm_ensembles.study.running", "slm_ensembles.study.collecting",
               "slm_ensembles.study.fits", "slm_ensembles.study.comparison", "slm_ensembles.study.teacher_gap",
               "slm_ensembles.study.latency", "slm_ensembles.study.figures", "slm_ensembles.study.report",
               "slm_ensembles.study.across",
               "slm_ensembles.study.carrying"],
    "commands": ["main", "study", "generate", "score", "lm_eval_adapter", "build_teacher_cache",
                 "benchmarks.bench", "benchmarks.bench_inference", "benchmarks.demo_memory",
                 "benchmarks.mutation_summary"],
}
# The top level shows what a user runs or edits: the design card's files, and the commands a user runs next.
DESIGN_CARD = {"main", "train", "ensemble", "utils", "preprocess_dataset", "config"}
LAYER_OF = {module: depth for depth, modules in enumerate(LAYERS.values()) for module in modules}


def project_imports(module: str) -> tuple[set[str], set[str]]:
    """The project modules `module` imports at its top level, and those it imports inside a function."""
    tree = ast.parse((REPOSITORY / f"{module.replace('.', '/')}.py").read_text())
    inside = {id(node) for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(function)}
    top, deferred = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in PACKAGES:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        found = set(names) & set(MODULES)
        (deferred if id(node) in inside else top).update(found)
    return top, deferred


def import_graph() -> dict[str, set[str]]:
    return {module: set.union(*project_imports(module)) - {module} for module in MODULES}


def test_every_module_has_a_layer():
    assert sorted(LAYER_OF) == MODULES, "place each module in one layer of LAYERS (and in docs/layout.md)"


def test_the_top_level_holds_only_what_a_user_runs_or_edits():
    """Beside the design card's files, a top-level module is a command (it runs as a script) or a file the package
    imports that a saved ensemble folder also carries (model_io, checksums); the rest is machinery, in a package."""
    top_level = {module for module in MODULES if "." not in module}
    commands = {module for module in top_level
                if 'if __name__ == "__main__":' in (REPOSITORY / f"{module}.py").read_text()}
    assert top_level - DESIGN_CARD - commands == {"model_io", "checksums"}


def test_no_module_imports_a_project_module_inside_a_function():
    """An import inside a function hides an arrow of the graph (often one that would close a circle); third-party
    imports there (lm_eval, optional) are fine."""
    deferred = {module: sorted(project_imports(module)[1]) for module in MODULES}
    assert not {module: names for module, names in deferred.items() if names}


def test_no_module_imports_from_a_layer_above_its_own():
    names = list(LAYERS)
    upward = [f"{module} ({names[LAYER_OF[module]]}) imports {imported} ({names[LAYER_OF[imported]]})"
              for module, imports in import_graph().items() for imported in sorted(imports)
              if LAYER_OF[imported] > LAYER_OF[module]]
    assert not upward


def test_the_import_graph_has_no_circle():
    graph, finished, path = import_graph(), set(), []

    def visit(module):  # depth first: a module met again while on the path closes a circle
        if module in path:
            raise AssertionError("import circle: " + " -> ".join([*path[path.index(module):], module]))
        if module in finished:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        finished.add(module)

    for module in MODULES:
        visit(module)
