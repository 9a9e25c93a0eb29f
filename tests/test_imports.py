"""Importing the project's modules has no side effects: no files, environment, logging, threads or signal handlers.

The third-party libraries the modules use are imported first (with their lazily imported parts) and the state is
taken after them, so only what the project's own top-level code does is compared.
"""

import json
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
MODULES = sorted(path.stem for path in REPOSITORY.glob("*.py"))

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
    assert {"main", "train", "ensemble", "utils", "config", "preprocess_dataset", "losses"} <= set(MODULES)


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
