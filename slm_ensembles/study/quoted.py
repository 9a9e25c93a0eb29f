"""Numbers quoted from results: the numbers a text quotes (as rounded), and those no committed result file rounds to,
so that a result in the docs is generated and copied, never typed."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pandas as pd

# A number as prose quotes it: a sign, digits with thousands commas, decimals, an exponent, a suffix (%, M, k).
# Not one inside a word, a date or a path (SmolLM2-135M, 2026-12-02, run_1).
QUOTED_NUMBER = re.compile(r"(?<![\w.\-−/])(?P<number>[-−+]?\d{1,3}(?:,\d{3})+(?![\d])|[-−+]?\d+(?:\.\d+)?)"
                           r"(?:[eE](?P<exponent>[-−+]?\d+))?(?P<suffix>%|M\b|k\b)?(?![\w\-/]|\.\d)")
SUFFIX_SCALE = {"%": 0.01, "M": 1e6, "k": 1e3, None: 1.0}
NOT_QUOTED = re.compile(r"```.*?```|`[^`\n]*`|\]\([^)\s]*\)", re.S)  # code and link targets quote no result


@dataclasses.dataclass(frozen=True)
class Quoted:
    """A number of a text: its value and the half-unit of its last digit (what rounding to it may move)."""

    text: str
    value: float
    tolerance: float

    def matches(self, number: float) -> bool:
        return abs(abs(number) - abs(self.value)) <= self.tolerance * (1 + 1e-9) + 1e-12 * abs(self.value)


def quoted_numbers(text: str) -> list[Quoted]:
    """The numbers a text quotes: decimals (5.857, 0.29, 3.6e13, 6.38M, 12.5%), and integers from 100 on (smaller
    ones are counts: 5 seeds, 3 of 3); none inside code spans, code blocks or link targets."""
    found = []
    for match in QUOTED_NUMBER.finditer(NOT_QUOTED.sub(" ", text)):
        digits = match["number"].replace(",", "").replace("−", "-")
        decimals = len(digits.split(".")[1]) if "." in digits else 0
        scale = SUFFIX_SCALE[match["suffix"]] * 10.0 ** int((match["exponent"] or "0").replace("−", "-"))
        if decimals == 0 and match["exponent"] is None and match["suffix"] in (None, "%") and abs(int(digits)) < 100:
            continue
        found.append(Quoted(match.group(0), float(digits) * scale, 0.5 * 10.0 ** -decimals * scale))
    return found


def numbers_in_results(paths) -> set[float]:
    """Every number in the result files: each CSV cell that reads as a number, and the numbers of other text
    files (summary.md) as quoted_numbers reads them."""
    numbers = set()
    for path in map(Path, paths):
        if path.suffix == ".csv":
            values = pd.to_numeric(pd.read_csv(path, dtype=str).stack(), errors="coerce")
            numbers.update(float(v) for v in values.dropna())
        else:
            numbers.update(q.value for q in quoted_numbers(path.read_text()))
    return {n for n in numbers if math.isfinite(n)}


def quoted_numbers_missing(text: str, result_files: list[Path]) -> list[str]:
    """The numbers `text` quotes that no number of the result files rounds to, as written in the text: a result
    is to be generated and copied, never typed. A percentage matches a fraction or a percentage."""
    numbers = numbers_in_results(result_files)
    missing = []
    for quoted in quoted_numbers(text):
        forms = [quoted]
        if quoted.text.endswith("%"):
            forms.append(Quoted(quoted.text, quoted.value * 100, quoted.tolerance * 100))
        if not any(form.matches(number) for form in forms for number in numbers):
            missing.append(quoted.text)
    return missing
