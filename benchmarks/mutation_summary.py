"""The mutation score per module, from mutmut's list of mutants and a list of the equivalent ones.

    mutmut run --max-children 2                                       # pyproject.toml names the modules and tests
    mutmut results --all true > results/mutation/mutmut_results.txt   # each mutant: "NAME: STATE"
    python -m benchmarks.mutation_summary results/mutation/mutmut_results.txt \
        --equivalent results/mutation/equivalent.csv --output results/mutation/summary.csv

A mutant is caught when its module's tests fail (killed) or hang (timeout) on it. An equivalent mutant changes no
behaviour (equivalent.csv names each with the reason), so no test can catch it: the score is the caught share of
the mutants that ran and are not equivalent. `no tests` mutants sit in code that the module's own tests never run;
`not checked` ones were never run.
"""

import argparse
import csv
import sys
from pathlib import Path

import pandas as pd

STATES = {"killed": "killed", "timeout": "timeout", "survived": "survived", "no tests": "no_tests",
          "not checked": "not_run", "suspicious": "timeout", "skipped": "not_run"}
COLUMNS = ["module", "mutants", "run", "killed", "timeout", "survived", "equivalent", "no_tests", "not_run",
           "caught_share"]


def read_states(text: str) -> dict[str, str]:
    """Each mutant's state (a STATES value) by name, from `mutmut results --all true`'s lines."""
    states = {}
    for line in text.splitlines():
        name, separator, state = line.strip().rpartition(": ")
        if not separator or "__mutmut_" not in name:
            continue
        if state not in STATES:
            raise ValueError(f"mutant {name}: unknown state {state!r}; known: {', '.join(STATES)}")
        states[name] = STATES[state]
    return states


def module_of(mutant: str) -> str:
    """The module a mutant's name starts with: the part before its function (x_NAME or xǁCLASSǁNAME)."""
    parts = mutant.split(".")
    return ".".join(parts[:next(i for i, part in enumerate(parts) if part.startswith("x"))])


def read_equivalent(path: Path | None, states: dict[str, str]) -> set[str]:
    """The mutants equivalent.csv names (columns mutant, reason), each one a mutant that survived: a mutant a test
    catches, or one not in the results, is no equivalent mutant."""
    if path is None:
        return set()
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    wrong = [row["mutant"] for row in rows if states.get(row["mutant"]) != "survived" or not row.get("reason")]
    if wrong:
        raise ValueError(f"{path}: {', '.join(wrong)}: an equivalent mutant must have survived and say why")
    return {row["mutant"] for row in rows}


def summary(states: dict[str, str], equivalent: set[str]) -> pd.DataFrame:
    """Per module, then all: the counts by state and the caught share of the non-equivalent mutants that ran."""
    rows = []
    modules = sorted({module_of(name) for name in states})
    for module in [*modules, "all"]:
        names = [name for name in states if module == "all" or module_of(name) == module]
        count = {state: sum(states[name] == state for name in names) for state in set(STATES.values())}
        same = sum(name in equivalent for name in names)
        ran = count["killed"] + count["timeout"] + count["survived"]
        caught = count["killed"] + count["timeout"]
        rows.append(dict(module=module, mutants=len(names), run=ran, killed=count["killed"],
                         timeout=count["timeout"], survived=count["survived"] - same, equivalent=same,
                         no_tests=count["no_tests"], not_run=count["not_run"],
                         caught_share=round(caught / (ran - same), 4) if ran > same else float("nan")))
    return pd.DataFrame(rows, columns=COLUMNS)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="`mutmut results --all true`'s output")
    parser.add_argument("--equivalent", type=Path, default=None, help="CSV of mutant, reason")
    parser.add_argument("--output", type=Path, default=None, help="write the table here as CSV")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        states = read_states(args.results.read_text())
        table = summary(states, read_equivalent(args.equivalent, states))
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.output is not None:
        table.to_csv(args.output, index=False)
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
