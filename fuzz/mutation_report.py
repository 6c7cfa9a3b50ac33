"""The mutation score's verdicts: survivors classified, the score with its interval, the table
and the report (for :mod:`kvmspec.fuzz.mutation`).

A survivor is classified by hand first (``fuzz/mutation_survivors.toml``: a table per mutant
id with ``class``, "equivalent" or "gap", and ``why``), unless the fast tests kill it (then it
is not equivalent, whatever the table says); then automatically: equivalent by construction
(Mutant.equivalent), a gap when the tests kill it; else it stays unclassified and counts as
not killed. The score is the killed share of the mutants not equivalent, with the 95% Wilson
score interval (a sample's proportion near 1 needs it: the normal interval would pass 100%).

Equivalent is judged against the rules, not the bytes: besides mutants that change nothing
the model does (a label, a dead branch, a value only tested for truth), a mutant whose only
difference is one every rule allows counts as equivalent, with its why saying so: a TLB
flush stronger than needed, a page reported dirty that was not written (the dirty log may
over-report), a different host reclaim choice. No check can kill those without forbidding
correct kernels. A gap is a survivor some correct check could kill: a path the campaign
does not reach, or a result nothing compares.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvmspec.fuzz.mutation_mutants import FOLDERS

CLASSIFIED = Path(__file__).with_name("mutation_survivors.toml")
"""The survivors classified by hand: ``["<mutant id>"]`` tables of ``class`` ("equivalent" or
"gap") and ``why``."""
GOAL = 0.90


class UsageError(Exception):
    """Bad input a user can cause: one line, exit status 2."""


def wilson(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion (0..1)."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = (
        z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    )
    return max(0.0, centre - half), min(1.0, centre + half)


# -- running jobs in fresh processes ------------------------------------------------------------


@dataclass
class Outcome:
    """What happened to one mutant, and for a survivor, what it is."""

    key: str
    name: str
    folder: str
    diff: list[str]
    status: str
    """``killed`` or ``survived``."""
    kind: str
    """How: ``rule``, ``exception`` or ``timeout``; or why not: ``undetected``,
    ``unreached`` (no area reaches its function), ``overrun`` (a slow slice elsewhere)."""
    area: str = ""
    detail: str = ""
    line_reached: bool = False
    """Whether an area executed the mutated line in the reach pass."""
    auto: str = ""
    """Why the mutant is equivalent by construction, or "" (Mutant.equivalent)."""
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    areas: list[str] = field(default_factory=list)
    tests: str = ""
    """For a survivor: ``killed``, ``not killed`` or ``timeout`` by the fast tests, or why
    they were not run."""
    verdict: str = ""
    """For a survivor: ``equivalent``, ``gap`` or ``unclassified``."""
    why: str = ""


def load_classified(path: Path = CLASSIFIED) -> dict[str, dict[str, str]]:
    """The survivors classified by hand, by mutant id."""
    if not path.exists():
        return {}
    with path.open("rb") as file:
        table = tomllib.load(file)
    for key, entry in table.items():
        if entry.get("class") not in ("equivalent", "gap") or not entry.get("why"):
            raise UsageError(f"{path}: [{key!r}] needs class = equivalent|gap and a why")
    return table


def classify(outcome: Outcome, by_hand: dict[str, dict[str, str]]) -> None:
    """A survivor's verdict: a classification by hand first, then what is known for sure (a
    label's text is equivalent; a mutant the tests kill is not)."""
    if outcome.key in by_hand:
        outcome.verdict, outcome.why = by_hand[outcome.key]["class"], by_hand[outcome.key]["why"]
        if outcome.verdict == "equivalent" and outcome.tests == "killed":
            outcome.verdict, outcome.why = "gap", f"the tests kill it (classified: {outcome.why})"
    elif outcome.auto:
        outcome.verdict, outcome.why = "equivalent", outcome.auto
    elif outcome.tests in ("killed", "timeout"):
        outcome.verdict = "gap"
        outcome.why = f"the fast tests kill it ({outcome.tests}); the campaign does not"
    else:
        outcome.verdict = "unclassified"
        outcome.why = "not killed by the tests either" if outcome.tests else "not classified"


@dataclass
class Tally:
    """One row of the table."""

    mutants: int = 0
    killed: dict[str, int] = field(default_factory=dict)
    survived: int = 0
    equivalent: int = 0
    gaps: int = 0
    unclassified: int = 0

    def add(self, outcome: Outcome) -> None:
        self.mutants += 1
        if outcome.status == "killed":
            self.killed[outcome.kind] = self.killed.get(outcome.kind, 0) + 1
        else:
            self.survived += 1
            self.equivalent += outcome.verdict == "equivalent"
            self.gaps += outcome.verdict == "gap"
            self.unclassified += outcome.verdict == "unclassified"

    @property
    def score(self) -> tuple[float, float, float]:
        """The killed share of the non-equivalent mutants, and its 95% interval."""
        killed, trials = sum(self.killed.values()), self.mutants - self.equivalent
        low, high = wilson(killed, trials)
        return (killed / trials if trials else 0.0), low, high


def tally(outcomes: Sequence[Outcome]) -> dict[str, Tally]:
    rows = {folder: Tally() for folder in (*FOLDERS, "all")}
    for outcome in outcomes:
        rows[outcome.folder].add(outcome)
        rows["all"].add(outcome)
    return rows


def summary_line(rows: dict[str, Tally], population: int) -> str:
    score, low, high = rows["all"].score
    total = rows["all"]
    return (
        f"Mutation score: {score:.1%} (95% CI {low:.1%}-{high:.1%}) of "
        f"{total.mutants - total.equivalent} non-equivalent mutants killed, a sample of "
        f"{total.mutants} of {population} (goal: {GOAL:.0%})"
    )


def print_table(rows: dict[str, Tally], outcomes: Sequence[Outcome], header: str) -> None:
    print(header)
    print(
        f"  {'folder':<8} {'mutants':>7} {'killed':>6} {'(rule':>6} {'exc':>4} {'timeout)':>8}"
        f" {'survived':>8} {'equiv':>5} {'gap':>4} {'unclass':>7}  score (95% CI)"
    )
    for folder, row in rows.items():
        score, low, high = row.score
        k = row.killed
        print(
            f"  {folder:<8} {row.mutants:>7} {sum(k.values()):>6} {k.get('rule', 0):>6}"
            f" {k.get('exception', 0):>4} {k.get('timeout', 0):>8} {row.survived:>8}"
            f" {row.equivalent:>5} {row.gaps:>4} {row.unclassified:>7}"
            f"  {score:6.1%} ({low:.1%}-{high:.1%})"
        )
    survivors = [o for o in outcomes if o.status == "survived"]
    print(f"Survivors ({len(survivors)}):")
    for outcome in survivors:
        line = "line reached" if outcome.line_reached else "line not reached"
        tests = outcome.tests or "-"
        print(f"  {outcome.verdict:<12} {outcome.key}  [{outcome.kind}, {line}; tests: {tests}]")
        print(f"      {outcome.why}")
        for line in outcome.diff[1:]:
            print(f"      {line.strip()[:110]}")


def conclude(report: dict[str, Any], path: Path, summary_only: bool) -> int:
    """Classify the survivors (with today's hand classifications), print the table and the
    survivors, and write the report to ``path``."""
    outcomes = [Outcome(**entry) for entry in report["mutants"]]
    by_hand = load_classified()
    for outcome in outcomes:
        if outcome.status == "survived":
            classify(outcome, by_hand)
    rows = tally(outcomes)
    settings = report["settings"]
    header = (
        f"Mutation score of the campaign on reference/ (mutmut 3.3.1's operators): a sample of"
        f" {len(outcomes)} of {report['population']} mutants (seed {settings['seed']}),"
        f" {settings['budget']} CPU s each on one core; {report['elapsed_seconds'] / 60:.1f} min;"
        f" commit {report.get('commit', 'unknown')}"
    )
    for area, failure in report["left_out_areas"].items():
        print(f"  area left out, it fails unmutated: {area}: {failure}")
    if not summary_only:
        print_table(rows, outcomes, header)
    print(summary_line(rows, report["population"]))
    report["folders"] = {f: asdict(row) | {"score": row.score} for f, row in rows.items()}
    report["mutants"] = [asdict(o) for o in outcomes]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if rows["all"].score[0] >= GOAL else 1
