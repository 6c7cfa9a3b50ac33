"""One mutation-testing job, in a fresh process: the child side of :mod:`kvmspec.fuzz.mutation`.

A job is a JSON file naming what to do; the result is a JSON file the parent reads:

* ``kill``: install one mutant of a ``reference/`` module, then run the campaign areas that
  reach the mutated function, in turn, for a budget of seconds. The result says whether the
  mutant was killed and how: a rule broken (an AssertionError: a machine's invariant, the
  harness's RulesBroken, a fuzzer's SpecViolation), another exception (the mutated model
  crashed, or Hypothesis gave up on the machine), or a timeout (a slice still running well
  past the budget, inside the mutated module).
* ``reach``: run one area of the unmutated reference under coverage for some seconds and
  report the lines of ``reference/`` it executed, and whether the area failed (an area that
  fails unmutated cannot tell a mutant from the reference).
* ``tests``: install one mutant, then run pytest on some test files (the suite's fast
  tests), to tell a mutant the campaign misses but the tests kill from one neither kills.

The mutant is installed before anything of the model is imported: a finder placed first on
``sys.meta_path`` answers for the mutated module's name with the mutated source, compiled
under the original file name (so tracebacks and the timeout check name the real file).
``reference/`` itself is never written. Each area runs the way the campaign runs it
(kvmspec.fuzz.campaign): a state machine in short slices of the ``kvmspec-thorough`` profile
with fresh random seeds and no example database (a mutant's failures must not land in the
campaign's), an Atheris target on its seed corpus first, then on random inputs of its
maximum length.

    python -m kvmspec.fuzz.mutation_run JOB.json RESULT.json
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

SLICE_EXAMPLES = 3
"""Examples per state-machine slice: short slices, so a budget of a few seconds is kept."""
FUZZ_INPUTS_PER_SLICE = 20
"""Random inputs per fuzzer slice (after its seed corpus)."""
GRACE_SECONDS = 10.0
"""How long (CPU seconds) a slice may run past the budget before the job stops it and looks
where it is."""


class MutantFinder(importlib.abc.MetaPathFinder):
    """Answers for one module name with a mutated source; every other name is left to the
    finders after it (the editable install's among them)."""

    def __init__(self, module: str, source: str) -> None:
        self.module = module
        self.source = source

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != self.module:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            original = finder.find_spec(fullname, path, target)
            if original is not None and original.origin is not None:
                return importlib.util.spec_from_file_location(
                    fullname,
                    original.origin,
                    loader=MutantLoader(self.source, original.origin),
                    submodule_search_locations=original.submodule_search_locations,
                )
        return None


class MutantLoader(importlib.abc.Loader):
    """Executes the mutated source as the module, under the original file's name."""

    def __init__(self, source: str, origin: str) -> None:
        self.source = source
        self.origin = origin

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        exec(compile(self.source, self.origin, "exec"), module.__dict__)


def install(module: str, source: str) -> None:
    """Make ``import module`` load ``source`` from now on (before the model is imported)."""
    if module in sys.modules:
        raise RuntimeError(f"{module} was imported before its mutant could be installed")
    sys.meta_path.insert(0, MutantFinder(module, source))


@dataclass
class Area:
    """One campaign area as the job runs it: a slice at a time."""

    name: str
    run_slice: Callable[[random.Random], None]


def _machine_area(name: str, machine: Any) -> Area:
    from hypothesis import Phase, settings
    from hypothesis.stateful import run_state_machine_as_test

    from kvmspec.fuzz.profiles import THOROUGH

    slice_settings = settings(
        settings.get_profile(THOROUGH),
        max_examples=SLICE_EXAMPLES,
        database=None,
        phases=[Phase.generate],  # a failure is what counts; shrinking it would only cost time
    )

    def run_slice(rng: random.Random) -> None:
        run_state_machine_as_test(machine, settings=slice_settings)

    return Area(name, run_slice)


def _fuzzer_area(name: str, module: str, seeds: Path, max_len: int) -> Area:
    target: Callable[[bytes], None] = importlib.import_module(module).TestOneInput
    pending = [path.read_bytes() for path in sorted(seeds.glob("*")) if path.is_file()]

    def run_slice(rng: random.Random) -> None:
        # The seed corpus first, as libFuzzer starts from it, then random inputs.
        inputs = pending[:] or [
            rng.randbytes(rng.randrange(1, max_len + 1)) for _ in range(FUZZ_INPUTS_PER_SLICE)
        ]
        pending.clear()
        for data in inputs:
            target(data)

    return Area(name, run_slice)


def campaign_areas(names: Sequence[str]) -> list[Area]:
    """The campaign's areas on the reference (its state machines and its Atheris targets)
    named in ``names``, or all of them when ``names`` is empty, in the campaign's order."""
    from rich.console import Console

    from kvmspec.fuzz import campaign
    from kvmspec.fuzz.profiles import register_profiles

    register_profiles()
    areas = [
        _machine_area(area.name, area.machine)
        for area in campaign._areas([], "reference", Console(quiet=True))
        if not names or area.name in names
    ]
    areas += [
        _fuzzer_area(area.name, area.module, area.seeds, area.max_len)
        for area in campaign.FUZZ_AREAS
        if not names or area.name in names
    ]
    return areas


def describe_failure(error: BaseException) -> tuple[str, str]:
    """How a failure kills a mutant: ``rule`` for an AssertionError (every rule check in the
    harness raises one), ``exception`` for anything else; and its first line."""
    kind = "rule" if isinstance(error, AssertionError) else "exception"
    text = " ".join(str(error).split())[:200]
    return kind, f"{type(error).__name__}: {text}"


def _frames(frame: FrameType | None) -> list[FrameType]:
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return frames


def _where(frames: list[FrameType]) -> str:
    for frame in frames:
        if "/reference/" in frame.f_code.co_filename or "/spec/" in frame.f_code.co_filename:
            return f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_qualname}"
    return "outside the model"


def _write(path: Path, result: dict[str, Any]) -> None:
    path.write_text(json.dumps(result) + "\n")


def watchdog(seconds: float, handler: Callable[[list[FrameType]], None]) -> None:
    """Call ``handler`` with the stack once the process has used ``seconds`` of CPU time
    (a slice cannot be stopped from inside: this is how one that runs on is seen)."""

    def fire(signum: int, frame: FrameType | None) -> None:
        handler(_frames(frame))
        os._exit(0)

    signal.signal(signal.SIGPROF, fire)
    signal.setitimer(signal.ITIMER_PROF, seconds)


@dataclass
class Progress:
    area: str = ""
    slices: int = 0


def kill(job: dict[str, Any], result_path: Path) -> None:
    """Run the job's areas in turn, a slice each, on the installed mutant until the budget
    (CPU seconds of this process: other work on the machine does not shorten it) is spent
    or one fails; write the result."""
    origin = str(Path(job["path"]).resolve())
    install(job["module"], job["source"])
    budget = float(job["budget"])
    progress = Progress()

    def stuck(frames: list[FrameType]) -> None:
        # A slice still running long after the budget: a timeout if the mutated module is on
        # the stack (it loops, or makes a caller loop), else a slow slice of the unmutated
        # code (the dirty-log contract on a huge slot), which kills nothing.
        inside = any(str(Path(f.f_code.co_filename).resolve()) == origin for f in frames)
        result = {
            "status": "killed" if inside else "survived",
            "kind": "timeout" if inside else "overrun",
            "area": progress.area,
            "detail": f"still running after {time.process_time():.0f} s in {_where(frames)}",
        }
        _write(result_path, {**result, "cpu_seconds": time.process_time(), **asdict(progress)})

    watchdog(budget + GRACE_SECONDS, stuck)
    try:
        areas = campaign_areas(job["areas"])
        rng = random.Random(job["seed"])
        while time.process_time() < budget:
            area = areas[progress.slices % len(areas)]
            progress.area = area.name
            area.run_slice(rng)
            progress.slices += 1
    except Exception as error:  # the mutant broke a rule or crashed: killed
        kind, detail = describe_failure(error)
        result = {"status": "killed", "kind": kind, "area": progress.area, "detail": detail}
    else:
        result = {"status": "survived", "kind": "", "area": "", "detail": ""}
    signal.setitimer(signal.ITIMER_PROF, 0)
    _write(result_path, {**result, "cpu_seconds": time.process_time(), **asdict(progress)})


def reach(job: dict[str, Any], result_path: Path) -> None:
    """Run one area of the unmutated reference under coverage for ``job["seconds"]`` of CPU
    time; write the executed lines of reference/ per file, and the area's failure if it
    failed."""
    import coverage

    reference = Path(job["reference"]).resolve()
    cov = coverage.Coverage(data_file=None, config_file=False, include=[f"{reference}/*"])
    seconds = float(job["seconds"])
    failure = ""

    def finish(frames: list[FrameType] | None = None) -> None:
        # Called by the watchdog too: what ran so far is reached; a slow slice is no failure.
        cov.stop()
        data = cov.get_data()
        lines = {path: sorted(data.lines(path) or ()) for path in data.measured_files()}
        _write(result_path, {"lines": lines, "failure": failure})

    cov.start()
    (area,) = campaign_areas([job["area"]])
    watchdog(seconds + GRACE_SECONDS, finish)
    rng = random.Random(job["seed"])
    try:
        while time.process_time() < seconds:
            area.run_slice(rng)
    except Exception as error:  # the unmutated reference fails in this area
        failure = describe_failure(error)[1]
    signal.setitimer(signal.ITIMER_PROF, 0)
    finish()


def tests(job: dict[str, Any], result_path: Path) -> None:
    """Run pytest on ``job["tests"]`` with the mutant installed (when the job names one);
    write pytest's exit status. Hypothesis keeps its examples in a scratch folder, so a
    mutant's failures never reach the suite's database."""
    import pytest

    if job.get("module"):
        install(job["module"], job["source"])
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = scratch
        status = pytest.main(["-x", "-q", "-p", "no:cacheprovider", *job["tests"]])
    _write(result_path, {"exit": int(status)})


def areas(job: dict[str, Any], result_path: Path) -> None:
    """Write the names of the campaign's areas."""
    _write(result_path, {"areas": [area.name for area in campaign_areas([])]})


JOBS: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "areas": areas,
    "kill": kill,
    "reach": reach,
    "tests": tests,
}


def main(argv: Sequence[str] | None = None) -> int:
    job_path, result_path = (sys.argv[1:] if argv is None else list(argv))[:2]
    job = json.loads(Path(job_path).read_text())
    # Findings the fuzz targets write go to a scratch folder, never to corpus/regressions.
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["KVMSPEC_REGRESSIONS"] = scratch
        JOBS[job["mode"]](job, Path(result_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
