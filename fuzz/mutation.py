"""The harness's mutation score on ``reference/`` (``make mutation``; a line of ``make power``).

A mutant is the reference model with one small change made by mutmut's operators (mutmut
3.3.1: a comparison or arithmetic operator swapped, a number bumped, a string altered, an
argument dropped or replaced by None, ``True`` for ``False``, ``is`` for ``is not``, an
assignment of None, ``continue`` for ``break``...), inside a top-level function or a method
of a top-level class (mutmut changes nothing else: not module constants, not decorated
functions or classes, not docstrings). The score is the share of the non-equivalent mutants
that the campaign's state machines and fuzzers kill within a per-mutant budget of seconds on
one core. An equivalent mutant behaves exactly as the reference does, so nothing can kill it;
every other survivor is a gap in the harness: something the model could get wrong unseen.

How a mutant is run. mutmut's own runner (``mutmut run``) copies the sources into
``mutants/`` and runs pytest there, with trampolines that pick the mutant at run time; it
cannot work here, because the package maps ``kvmspec.reference`` onto ``reference/``
(``package-dir`` in pyproject.toml, installed editable), so every ``import
kvmspec.reference...`` finds the original files, never ``mutants/``. So only mutmut's mutation
generation is used (:func:`mutmut.file_mutation.create_mutations`, numbered as mutmut names
its mutants), and each mutant is run by :mod:`kvmspec.fuzz.mutation_run` in a fresh process
that installs the mutated module through an import hook before the model is imported
(``reference/`` is never written). The process runs, a slice at a time in turn, the campaign
areas (kvmspec.fuzz.campaign: the state machines and the Atheris targets) that reach the
mutated function, until the budget is spent. Killed means a rule broken (an AssertionError:
an invariant, RulesBroken, SpecViolation), another exception (the mutated model crashed, or
Hypothesis gave up), or a timeout (a slice still running ten seconds past the budget, inside
the mutated module; a slice slow elsewhere, such as the dirty-log contract on a huge slot, is
an overrun and kills nothing).

Which areas reach which function is measured once, by a reach pass: every area runs the
unmutated reference under coverage for ``--reach-seconds`` (cached in
``build/mutation/reach.json`` until a source file changes). An area that fails unmutated is
left out (it cannot tell a mutant from the reference). A mutant in a function no area reached
survives without being run ("unreached by the campaign").

The full set is about 17,000 mutants, days of work on one core, so a uniform random sample
(``--sample``, fixed ``--seed``) is measured and the score given with its 95% Wilson interval,
overall and per folder (generic, x86, arm64, ppc). Survivors are classified: automatically as
equivalent when the mutation only changes the text of a label or message (a ``Preempt`` or
``WaitUntil`` point, a ``warn_on`` message, an exception's message), automatically as a gap
when the suite's fast tests of the module's folder kill it (the campaign misses what a test
sees); by hand otherwise, in ``fuzz/mutation_survivors.toml``, keyed by a stable id (module,
mutmut's function name, a hash of the original and mutated code), which later runs reuse. A
survivor that no one has classified counts as a gap; one the tests do not kill either is
reported as "not killed by the tests either".

    python -m kvmspec.fuzz.mutation [--sample N] [--budget SECONDS] [--seed S]
        [--report build/mutation/report.json] [--reach-seconds S] [--no-tests]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvmspec.fuzz.mutation_mutants import (
    FOLDERS,
    Mutant,
    Rendered,
    enumerate_mutants,
    reference_dir,
    render,
)
from kvmspec.fuzz.mutation_run import GRACE_SECONDS

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


def run_job(job: dict[str, Any], timeout: float) -> dict[str, Any] | None:
    """Run one :mod:`kvmspec.fuzz.mutation_run` job in a fresh process; its result, or None
    when the process had to be killed (past ``timeout``)."""
    with tempfile.TemporaryDirectory() as scratch:
        job_path, result_path = Path(scratch, "job.json"), Path(scratch, "result.json")
        output = Path(scratch, "output.txt")
        job_path.write_text(json.dumps(job))
        module = "kvmspec.fuzz.mutation_run"
        command = [sys.executable, "-m", module, str(job_path), str(result_path)]
        try:
            with output.open("w") as log:
                subprocess.run(command, stdout=log, stderr=log, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return None
        if not result_path.exists():
            last = (output.read_text().strip().splitlines() or ["no output"])[-1]
            return {"status": "killed", "kind": "exception", "detail": f"process died: {last}"}
        result: dict[str, Any] = json.loads(result_path.read_text())
        return result


@dataclass
class Reach:
    """What the campaign's areas execute of the unmutated reference, and which fail on it."""

    lines: dict[str, dict[str, set[int]]]
    failing: dict[str, str]

    def areas_reaching(self, path: Path, first: int, last: int) -> list[str]:
        key = str(path.resolve())
        return [
            area
            for area, files in self.lines.items()
            if area not in self.failing and any(first <= n <= last for n in files.get(key, ()))
        ]


def _fingerprint(reach_seconds: float) -> str:
    digest = hashlib.sha256(f"{reach_seconds}".encode())
    for folder in ("reference", "spec", "fuzz"):
        root = reference_dir().parent / folder
        for path in sorted(root.rglob("*.py")):
            digest.update(path.read_bytes())
    return digest.hexdigest()


def measure_reach(seconds: float, cache: Path, progress: bool) -> Reach:
    """Run every area for ``seconds`` under coverage, unmutated (or reuse the cache)."""
    from kvmspec.fuzz.mutation_run import campaign_areas

    fingerprint = _fingerprint(seconds)
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("fingerprint") == fingerprint:
            lines = {a: {p: set(n) for p, n in f.items()} for a, f in saved["lines"].items()}
            return Reach(lines, saved["failing"])
    reach = Reach({}, {})
    for area in (a.name for a in campaign_areas([])):
        job = {"mode": "reach", "area": area, "seconds": seconds, "seed": 0}
        job["reference"] = str(reference_dir())
        result = run_job(job, seconds + GRACE_SECONDS + 60)
        if result is None or "lines" not in result:
            reach.failing[area] = "the reach run did not finish"
            continue
        reach.lines[area] = {p: set(n) for p, n in result["lines"].items()}
        if result["failure"]:
            reach.failing[area] = result["failure"]
        if progress:
            state = f"FAILS unmutated: {result['failure']}" if result["failure"] else "ok"
            print(
                f"reach: {area}: {sum(map(len, reach.lines[area].values()))} lines, {state}",
                file=sys.stderr,
                flush=True,
            )
    cache.parent.mkdir(parents=True, exist_ok=True)
    listed = {a: {p: sorted(n) for p, n in f.items()} for a, f in reach.lines.items()}
    cache.write_text(
        json.dumps({"fingerprint": fingerprint, "lines": listed, "failing": reach.failing})
    )
    return reach


# -- the measurement ----------------------------------------------------------------------------

TEST_FILES = {
    "generic": (
        "test_reference_*.py",
        "test_generic_*.py",
        "test_guest_*.py",
        "test_concurrency.py",
        "test_machines.py",
    ),
    "x86": ("test_x86_*.py",),
    "arm64": ("test_arm64_*.py",),
    "ppc": ("test_ppc_*.py",),
}
"""The suite's fast tests of each folder's modules, as globs under the tests folder."""


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
    """Whether an area executed the mutated line in the reach pass (a hint for a survivor)."""
    seconds: float = 0.0
    areas: list[str] = field(default_factory=list)
    tests: str = ""
    """For a survivor: ``killed``, ``not killed`` or ``timeout`` by the fast tests, or why
    they were not run."""
    verdict: str = ""
    """For a survivor: ``equivalent``, ``gap`` or ``unclassified``."""
    why: str = ""


def run_mutant(
    mutant: Mutant, rendered: Rendered, reach: Reach, budget: float, seed: int
) -> Outcome:
    """Run one mutant in the areas that reach its function, for ``budget`` seconds."""
    outcome = Outcome(mutant.key, mutant.name, mutant.folder, rendered.diff, "survived", "")
    outcome.areas = reach.areas_reaching(mutant.path, *rendered.function_lines)
    outcome.line_reached = bool(reach.areas_reaching(mutant.path, *rendered.lines))
    if not outcome.areas:
        outcome.kind = "unreached"
        return outcome
    job = {
        "mode": "kill",
        "module": mutant.module,
        "path": str(mutant.path),
        "source": rendered.source,
        "areas": outcome.areas,
        "budget": budget,
        "seed": seed,
    }
    began = time.monotonic()
    result = run_job(job, budget + GRACE_SECONDS + 60)
    if result is None:
        result = {"status": "killed", "kind": "timeout", "detail": "the process did not stop"}
    outcome.status = result["status"]
    outcome.kind = result["kind"] or "undetected"
    outcome.area = result.get("area", "")
    outcome.detail = result.get("detail", "")
    outcome.seconds = time.monotonic() - began
    return outcome


def test_files(folder: str, tests_dir: Path) -> list[str]:
    return sorted(str(p) for pattern in TEST_FILES[folder] for p in tests_dir.glob(pattern))


def run_tests(mutant: Mutant | None, source: str, files: list[str], timeout: float) -> str:
    """``killed``, ``not killed`` or ``timeout``: the fast tests ``files`` on the mutant (on
    the unmutated reference when ``mutant`` is None)."""
    job: dict[str, Any] = {"mode": "tests", "tests": files}
    if mutant is not None:
        job |= {"module": mutant.module, "source": source}
    result = run_job(job, timeout)
    if result is None:
        return "timeout"
    return "not killed" if result.get("exit") == 0 else "killed"


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


def classify(outcome: Outcome, mutant: Mutant, by_hand: dict[str, dict[str, str]]) -> None:
    """A survivor's verdict: a classification by hand first, then what is known for sure (a
    label's text is equivalent; a mutant the tests kill is not)."""
    if mutant.key in by_hand:
        outcome.verdict, outcome.why = by_hand[mutant.key]["class"], by_hand[mutant.key]["why"]
        if outcome.verdict == "equivalent" and outcome.tests == "killed":
            outcome.verdict, outcome.why = "gap", f"the tests kill it (classified: {outcome.why})"
    elif mutant.equivalent:
        outcome.verdict, outcome.why = "equivalent", mutant.equivalent
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


def measure(args: argparse.Namespace) -> int:
    began = time.monotonic()
    progress = not args.summary_only
    mutants = enumerate_mutants(reference_dir(), args.only)
    if not mutants:
        raise UsageError(f"no mutants in {args.only!r} (a module or package of the reference)")
    by_hand = load_classified()
    sample = random.Random(args.seed).sample(mutants, min(args.sample, len(mutants)))
    sample.sort(key=lambda m: (str(m.path), m.index))
    rendered = render(sample)
    reach = measure_reach(args.reach_seconds, args.report.parent / "reach.json", progress)
    rng = random.Random(args.seed)
    outcomes = []
    for n, mutant in enumerate(sample, 1):
        outcome = run_mutant(mutant, rendered[mutant.key], reach, args.budget, rng.getrandbits(64))
        outcomes.append(outcome)
        if progress:
            how = f"{outcome.status} ({outcome.kind}{', ' + outcome.area if outcome.area else ''})"
            print(
                f"[{n}/{len(sample)}] {how:<48} {outcome.seconds:5.1f} s  {mutant.name}",
                file=sys.stderr,
                flush=True,
            )
    baseline: dict[str, str] = {}
    for outcome, mutant in zip(outcomes, sample, strict=True):
        if outcome.status != "survived" or mutant.equivalent:
            continue
        files = test_files(mutant.folder, args.tests_dir)
        if args.no_tests or not files:
            outcome.tests = "not run"
        else:
            if mutant.folder not in baseline:
                baseline[mutant.folder] = run_tests(None, "", files, args.tests_timeout)
            if baseline[mutant.folder] != "not killed":
                outcome.tests = "not run: they fail unmutated"
            else:
                source = rendered[mutant.key].source
                outcome.tests = run_tests(mutant, source, files, args.tests_timeout)
        if progress:
            print(f"tests: {outcome.tests:<12} {mutant.name}", file=sys.stderr, flush=True)
    for outcome, mutant in zip(outcomes, sample, strict=True):
        if outcome.status == "survived":
            classify(outcome, mutant, by_hand)
    rows = tally(outcomes)
    elapsed = time.monotonic() - began
    header = (
        f"Mutation score of the campaign on reference/ (mutmut 3.3.1's operators): a sample of"
        f" {len(sample)} of {len(mutants)} mutants (seed {args.seed}), {args.budget:g} s each"
        f" on one core; {elapsed / 60:.1f} min"
    )
    for area, failure in reach.failing.items():
        print(f"  area left out, it fails unmutated: {area}: {failure}")
    if args.summary_only:
        print(summary_line(rows, len(mutants)))
    else:
        print_table(rows, outcomes, header)
        print(summary_line(rows, len(mutants)))
    report = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "population": len(mutants),
        "elapsed_seconds": elapsed,
        "left_out_areas": reach.failing,
        "folders": {folder: asdict(row) | {"score": row.score} for folder, row in rows.items()},
        "mutants": [asdict(o) for o in outcomes],
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if rows["all"].score[0] >= GOAL else 1


def positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise UsageError(message)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="python -m kvmspec.fuzz.mutation", description=__doc__.split("\n")[0])
    parser.add_argument("--sample", type=positive(int), default=200, help="mutants measured")
    parser.add_argument("--budget", type=positive(float), default=10.0, help="seconds a mutant")
    parser.add_argument("--seed", type=int, default=1, help="the sample's random seed")
    parser.add_argument("--report", type=Path, default=Path("build/mutation/report.json"))
    parser.add_argument(
        "--reach-seconds",
        type=positive(float),
        default=10.0,
        help="seconds each area runs unmutated to learn what it reaches",
    )
    parser.add_argument(
        "--no-tests", action="store_true", help="do not run the fast tests on the survivors"
    )
    parser.add_argument("--tests-timeout", type=positive(float), default=180.0)
    parser.add_argument("--tests-dir", type=Path, default=Path("tests"))
    parser.add_argument(
        "--only",
        default="kvmspec.reference",
        help="measure only the modules whose name starts with this",
    )
    parser.add_argument("--summary-only", action="store_true", help="print only the score line")
    try:
        args = parser.parse_args(argv)
        if args.report.is_dir():
            raise UsageError(f"--report {args.report} is a folder")
        return measure(args)
    except UsageError as error:
        print(f"kvmspec mutation: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
