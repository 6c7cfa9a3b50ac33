"""The harness's mutation score on ``reference/`` (``make mutation``; a line of ``make power``).

A mutant is the reference model with one small change made by mutmut's operators (mutmut
3.3.1: a comparison or arithmetic operator swapped, a number bumped, a string altered, an
argument dropped or replaced by None, ``True`` for ``False``, ``is`` for ``is not``, an
assignment of None, ``continue`` for ``break``...), inside a top-level function or a method
of a top-level class (mutmut changes nothing else: not module constants, not decorated
functions or classes, not docstrings). The score is the share of the non-equivalent mutants
that the campaign's state machines and fuzzers kill within a per-mutant budget of CPU seconds
on one core. An equivalent mutant behaves exactly as the reference does, so nothing can kill
it; every other survivor is a gap in the harness: something the model could get wrong unseen.

How a mutant is run. mutmut's own runner (``mutmut run``) copies the sources into
``mutants/`` and runs pytest there, with trampolines that pick the mutant at run time. It
cannot work here: the package maps ``kvmspec.reference`` onto ``reference/`` (``package-dir``
in pyproject.toml, installed editable, and the editable finder maps the name to the absolute
path of ``reference/``), so every ``import kvmspec.reference...`` loads the original files,
never ``mutants/``. So only mutmut's mutation generation is used
(:func:`mutmut.file_mutation.create_mutations`, numbered as mutmut names its mutants), and
each mutant is run by :mod:`kvmspec.fuzz.mutation_run` in a fresh process that installs the
mutated module through an import hook before the model is imported (``reference/`` is never
written). The process runs, a slice at a time in turn, the campaign areas
(kvmspec.fuzz.campaign: the state machines, and the Atheris targets on their seeds then on
random inputs) that reach the mutated line (else its function), until the budget is spent.
Killed means a rule broken (an AssertionError: an invariant, RulesBroken, SpecViolation),
another exception (the mutated model crashed, or Hypothesis gave up), or a timeout (a slice
still running ten CPU seconds past the budget with the mutated module on the stack; a slice
slow elsewhere, such as the dirty-log contract on a huge slot, is an overrun and kills
nothing). Budgets count the process's CPU time, so other work on the machine does not
shorten them. Every job runs on a frozen copy of the repository (``build/mutation/tree``,
taken when the measurement starts; the report names its commit), so an hour's measurement
is not mixed with the commits made meanwhile.

Which areas reach which line is measured once, by a reach pass: every area runs the unmutated
reference under coverage for ``--reach-seconds`` (cached in ``build/mutation/reach.json``
until a source file of reference/, spec/ or fuzz/ changes). An area that fails unmutated is
left out (it cannot tell a mutant from the reference). A mutant in a function no area reached
survives without being run (``unreached``).

The full set is about 16,500 mutants, days of work on one core, so a uniform random sample
(``--sample``, fixed ``--seed``; :func:`stable_sample`, which keeps a mutant in the sample as
long as its stable id does not change) is measured and the score given with its 95% Wilson interval,
overall and per folder (generic, x86, arm64, ppc). Then the survivors are classified
(:mod:`kvmspec.fuzz.mutation_report`): equivalent by construction when the mutation only
changes the text of a label or message, or weakens a WARN; a gap when the suite's fast tests
of the module's folder kill it (the campaign misses what a test sees); by hand otherwise, in
``fuzz/mutation_survivors.toml``, keyed by a stable id (module, mutmut's function name, a
hash of the original and mutated code) that later runs reuse. A survivor no one has
classified counts against the score; ``--reclassify`` applies an edited table to the last
report without running anything.

    python -m kvmspec.fuzz.mutation [--sample N] [--budget SECONDS] [--seed S]
        [--report build/mutation/report.json] [--reach-seconds S] [--no-tests] [--reclassify]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvmspec.fuzz.mutation_mutants import (
    Mutant,
    Rendered,
    enumerate_mutants,
    modules,
    reference_dir,
    render,
)
from kvmspec.fuzz.mutation_report import Outcome, UsageError, conclude, load_classified
from kvmspec.fuzz.mutation_run import GRACE_SECONDS

REACH_ATTEMPTS = 3


def wall_clock_limit(cpu_seconds: float) -> float:
    """When to kill a job of ``cpu_seconds`` that does not stop by itself (its watchdog
    counts CPU time; on a busy machine that takes longer on the clock)."""
    return 4 * (cpu_seconds + GRACE_SECONDS) + 60


def freeze(repo: Path, tests_dir: Path, tree: Path) -> Path:
    """Copy what the jobs run into ``tree`` (made afresh) and return it: a copy of the
    repository's code folders, tests, seed corpora, examples and pyproject.toml (pytest's
    settings), laid out as the repository is (the code finds its corpora from its own
    path), and ``site/kvmspec`` linking the package names to the copies. A measurement
    takes an hour and the repository does not stand still meanwhile: every job runs on
    this copy (``PYTHONPATH`` puts ``site`` ahead of the editable install), so each mutant
    is one module changed in an otherwise fixed model."""
    shutil.rmtree(tree, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", ".hypothesis", "*.pyc")
    (tree / "site" / "kvmspec").mkdir(parents=True)
    for package in ("reference", "spec", "fuzz"):
        shutil.copytree(repo / package, tree / package, ignore=ignore)
        (tree / "site" / "kvmspec" / package).symlink_to(Path("..", "..", package))
    shutil.copytree(tests_dir, tree / "tests", ignore=ignore)
    for extra in ("corpus/seeds", "examples"):
        if (repo / extra).is_dir():
            shutil.copytree(repo / extra, tree / extra, ignore=ignore)
    if (repo / "pyproject.toml").exists():
        shutil.copy(repo / "pyproject.toml", tree / "pyproject.toml")
    return tree


def frozen_reference(tree: Path | None) -> Path:
    """The model's sources the jobs run: the frozen copy's, or the installed ones."""
    return reference_dir() if tree is None else tree / "reference"


def commit_of(repo: Path) -> str:
    """The repository's commit, and whether the code folders differ from it."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "reference", "spec", "fuzz"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} with uncommitted changes" if changed else head


def run_job(job: dict[str, Any], timeout: float, tree: Path | None = None) -> dict[str, Any] | None:
    """Run one :mod:`kvmspec.fuzz.mutation_run` job in a fresh process (on the frozen copy
    ``tree`` when given); its result, or None when the process had to be killed (past
    ``timeout``)."""
    env = dict(os.environ)
    if tree is not None:
        site = str(tree / "site")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as scratch:
        job_path, result_path = Path(scratch, "job.json"), Path(scratch, "result.json")
        output = Path(scratch, "output.txt")
        job_path.write_text(json.dumps(job))
        module = "kvmspec.fuzz.mutation_run"
        command = [sys.executable, "-m", module, str(job_path), str(result_path)]
        try:
            with output.open("w") as log:
                subprocess.run(
                    command,
                    stdout=log,
                    stderr=log,
                    timeout=timeout,
                    check=False,
                    env=env,
                    cwd=tree,
                )
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


def _fingerprint(reach_seconds: float, reference: Path) -> str:
    digest = hashlib.sha256(f"{reach_seconds} {reference}".encode())
    for folder in ("reference", "spec", "fuzz"):
        for path in sorted((reference.parent / folder).rglob("*.py")):
            if not path.name.startswith("mutation"):  # what the areas run, not this tool
                digest.update(path.read_bytes())
    return digest.hexdigest()


def measure_reach(seconds: float, cache: Path, progress: bool, tree: Path | None) -> Reach:
    """Run every area for ``seconds`` under coverage, unmutated (or reuse the cache)."""
    reference = frozen_reference(tree)
    fingerprint = _fingerprint(seconds, reference)
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("fingerprint") == fingerprint:
            lines = {a: {p: set(n) for p, n in f.items()} for a, f in saved["lines"].items()}
            return Reach(lines, saved["failing"])
    listing = run_job({"mode": "areas"}, wall_clock_limit(0), tree)
    if listing is None or "areas" not in listing:
        raise UsageError(f"the campaign's areas cannot be listed: {listing}")
    reach = Reach({}, {})
    for area in listing["areas"]:
        for seed in range(REACH_ATTEMPTS):
            # A slice can block where no signal gets in (one huge integer operation): the
            # job is then killed with what it had, and the area tried again on other seeds.
            job = {"mode": "reach", "area": area, "seconds": seconds, "seed": seed}
            job["reference"] = str(reference)
            result = run_job(job, wall_clock_limit(seconds), tree)
            if result is not None and "lines" in result:
                break
        if result is None or "lines" not in result:
            reach.failing[area] = f"the reach run did not finish ({REACH_ATTEMPTS} tries)"
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


def run_mutant(
    mutant: Mutant,
    rendered: Rendered,
    reach: Reach,
    budget: float,
    seed: int,
    tree: Path | None = None,
) -> Outcome:
    """Run one mutant for ``budget`` seconds in the areas that reach the mutated line in the
    reach pass, or failing that in those that reach its function (on the frozen copy
    ``tree``, where ``mutant`` was found, when given)."""
    outcome = Outcome(mutant.key, mutant.name, mutant.folder, rendered.diff, "survived", "")
    outcome.auto = mutant.equivalent
    outcome.areas = reach.areas_reaching(mutant.path, *rendered.lines)
    outcome.line_reached = bool(outcome.areas)
    if not outcome.areas:
        outcome.areas = reach.areas_reaching(mutant.path, *rendered.function_lines)
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
    result = run_job(job, wall_clock_limit(budget), tree)
    if result is None:
        result = {"status": "killed", "kind": "timeout", "detail": "the process did not stop"}
    outcome.status = result["status"]
    outcome.kind = result["kind"] or "undetected"
    outcome.area = result.get("area", "")
    outcome.detail = result.get("detail", "")
    outcome.seconds = time.monotonic() - began
    outcome.cpu_seconds = result.get("cpu_seconds", 0.0)
    return outcome


def test_files(folder: str, tests_dir: Path) -> list[str]:
    return sorted(str(p) for pattern in TEST_FILES[folder] for p in tests_dir.glob(pattern))


def run_tests(
    mutant: Mutant | None, source: str, files: list[str], timeout: float, tree: Path | None
) -> str:
    """``killed``, ``not killed`` or ``timeout``: the fast tests ``files`` on the mutant (on
    the unmutated reference when ``mutant`` is None)."""
    job: dict[str, Any] = {"mode": "tests", "tests": files}
    if mutant is not None:
        job |= {"module": mutant.module, "source": source}
    result = run_job(job, timeout, tree)
    if result is None:
        return "timeout"
    return "not killed" if result.get("exit") == 0 else "killed"


def survivors_against_tests(
    outcomes: Sequence[Outcome],
    sample: Sequence[Mutant],
    rendered: dict[str, Rendered],
    args: argparse.Namespace,
    tree: Path,
) -> None:
    """Run the fast tests of its folder (in the frozen copy ``tree``) on every survivor not
    equivalent by construction, once the same tests have passed on the unmutated reference."""
    baseline: dict[str, str] = {}
    for outcome, mutant in zip(outcomes, sample, strict=True):
        if outcome.status != "survived" or mutant.equivalent:
            continue
        files = test_files(mutant.folder, tree / "tests")
        if args.no_tests or not files:
            outcome.tests = "not run"
        else:
            if mutant.folder not in baseline:
                baseline[mutant.folder] = run_tests(None, "", files, args.tests_timeout, tree)
            if baseline[mutant.folder] != "not killed":
                outcome.tests = "not run: they fail unmutated"
            else:
                source = rendered[mutant.key].source
                outcome.tests = run_tests(mutant, source, files, args.tests_timeout, tree)
        if not args.summary_only:
            print(f"tests: {outcome.tests:<12} {mutant.name}", file=sys.stderr, flush=True)


def stable_sample(mutants: Sequence[Mutant], size: int, seed: int) -> list[Mutant]:
    """A uniform random sample of ``size`` mutants (all, if there are fewer), in file order:
    the ones whose stable ids hash lowest under ``seed`` (bottom-k sampling). The draw
    depends on each mutant's own id, not on its position in the population, so code added
    elsewhere changes the sample only by the few new mutants that hash low enough to
    enter it; the survivors already classified are measured again, not reshuffled away."""

    def rank(mutant: Mutant) -> bytes:
        return hashlib.sha256(f"{seed}\0{mutant.key}".encode()).digest()

    sample = sorted(mutants, key=rank)[:size]
    sample.sort(key=lambda m: (str(m.path), m.index))
    return sample


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Sample, run every mutant of the sample, run the survivors against the tests: the
    report, not classified yet."""
    began = time.monotonic()
    progress = not args.summary_only
    if not modules(reference_dir(), args.only):
        raise UsageError(f"no mutants in {args.only!r} (a module or package of the reference)")
    if not args.tests_dir.is_dir():
        raise UsageError(f"--tests-dir {args.tests_dir} is not a folder")
    load_classified()  # a broken table is reported before the long run, not after
    repo = reference_dir().parent
    commit = commit_of(repo)
    tree = freeze(repo, args.tests_dir, args.report.parent.resolve() / "tree")
    mutants = enumerate_mutants(frozen_reference(tree), args.only)
    sample = stable_sample(mutants, args.sample, args.seed)
    rendered = render(sample)
    cache = args.report.parent / "reach.json"
    reach = measure_reach(args.reach_seconds, cache, progress, tree)
    rng = random.Random(args.seed)
    outcomes = []
    for n, mutant in enumerate(sample, 1):
        seed = rng.getrandbits(64)
        outcome = run_mutant(mutant, rendered[mutant.key], reach, args.budget, seed, tree)
        outcomes.append(outcome)
        if progress:
            how = f"{outcome.status} ({outcome.kind}{', ' + outcome.area if outcome.area else ''})"
            print(
                f"[{n}/{len(sample)}] {how:<48} {outcome.seconds:5.1f} s  {mutant.name}",
                file=sys.stderr,
                flush=True,
            )
    survivors_against_tests(outcomes, sample, rendered, args, tree)
    return {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "commit": commit,
        "population": len(mutants),
        "elapsed_seconds": time.monotonic() - began,
        "left_out_areas": reach.failing,
        "mutants": [asdict(o) for o in outcomes],
    }


def reread(path: Path) -> dict[str, Any]:
    """A report to classify again, each mutant's equivalence by construction brought up to
    date with today's rules (keys are stable, so the mutants are found again)."""
    try:
        report: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read the report {path}: {error}") from None
    entries = {entry["key"]: entry for entry in report["mutants"]}
    for module in {key.split(":")[0] for key in entries}:
        for mutant in enumerate_mutants(reference_dir(), module):
            if mutant.key in entries:
                entries[mutant.key]["auto"] = mutant.equivalent
    return report


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
    parser.add_argument("--sample", type=positive(int), default=150, help="mutants measured")
    parser.add_argument("--budget", type=positive(float), default=10.0, help="CPU seconds a mutant")
    parser.add_argument("--seed", type=int, default=1, help="the sample's random seed")
    parser.add_argument(
        "--report",
        type=Path,
        default=Path("build/mutation/report.json"),
        help="the JSON report (its folder also keeps the reach cache and the frozen copy)",
    )
    parser.add_argument(
        "--reach-seconds",
        type=positive(float),
        default=10.0,
        help="CPU seconds each area runs unmutated, to learn what it reaches",
    )
    parser.add_argument(
        "--no-tests", action="store_true", help="do not run the fast tests on the survivors"
    )
    parser.add_argument(
        "--tests-timeout", type=positive(float), default=180.0, help="seconds per tests run"
    )
    parser.add_argument(
        "--tests-dir", type=Path, default=Path("tests"), help="the fast tests' folder"
    )
    parser.add_argument(
        "--only",
        default="kvmspec.reference",
        help="measure only this module or package",
    )
    parser.add_argument("--summary-only", action="store_true", help="print only the score line")
    parser.add_argument(
        "--reclassify",
        action="store_true",
        help="run nothing: classify the survivors of the --report file again (after editing"
        " fuzz/mutation_survivors.toml)",
    )
    try:
        args = parser.parse_args(argv)
        if args.report.is_dir():
            raise UsageError(f"--report {args.report} is a folder")
        report = reread(args.report) if args.reclassify else measure(args)
        return conclude(report, args.report, args.summary_only)
    except UsageError as error:
        print(f"kvmspec mutation: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
