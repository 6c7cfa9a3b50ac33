"""``kvmspec campaign``: run the state machines and the fuzzers for a time budget, summarise.

Each area is a state machine bound to a profile and a target, or an Atheris fuzz target. The
campaign runs the state machines in short slices (``SLICE_EXAMPLES`` examples of the
``kvmspec-thorough`` Hypothesis profile) in a pool of worker processes, one slice per worker
at a time, taking the areas in turn; all of them share Hypothesis's example database in
``.hypothesis/`` (so a failure found once is retried first next time). With Atheris installed,
one more process runs the fuzzers one after the other: the memslot fuzzer
(fuzz/fuzz_memslots.py), the generic-layer fuzzer (fuzz/fuzz_generic.py), the x86 shadow-MMU
fuzzer (fuzz/fuzz_x86.py), the POWER HPT fuzzer (fuzz/fuzz_ppc.py) and the arm64 stage-2
fuzzer (fuzz/fuzz_arm64.py). ``--workers N`` sets the number of processes (default:
one per core): the fuzzers take one, the state machines the others; with one worker they take
turns, the state machines first.

The campaign shows live progress (steps, steps per second, coverage, failures) and ends with
a summary table: steps (rules for a state machine, executions or harness actions for a
fuzzer), steps per second, coverage, invariant checks, failures, and the peak memory of the
workers. Each failure is written as a replayable trace (or, for the generic and
x86 fuzzers, the input and its report) under corpus/regressions/; a generic or x86 state
machine's failure also leaves its run as an input of that layer's fuzzer, which replays it
with its report. A worker process that dies is reported and replaced; Ctrl-C stops every
worker, keeps the example database and every reproducer, and prints the summary.

Coverage: a fuzzer's is libFuzzer's count of edges. A state machine's is the number of branch
arcs of reference/ and spec/ its slices reached, measured by coverage.py. Tracing every line
slows a machine down three to eight times, so only a sample of slices is traced: an area's
first slice and every ``COVERAGE_EVERY``-th after it (the figure is a lower bound that grows
as the campaign runs). Under ``make power``, where coverage.py already traces everything,
the campaign measures nothing itself and records each area as a coverage context instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import multiprocessing
import os
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

from hypothesis import Phase, settings
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from kvmspec.fuzz import machines
from kvmspec.fuzz.allocator import keep_freed_memory
from kvmspec.fuzz.arm64_machine import arm64_machine
from kvmspec.fuzz.campaign_atheris import SPAWN_LOCK, AreaResult, AtherisWorkers, FuzzArea
from kvmspec.fuzz.campaign_database import CheckedDatabase, open_database
from kvmspec.fuzz.generic_machine import generic_machine
from kvmspec.fuzz.ppc_machine import ppc_machine
from kvmspec.fuzz.profiles import THOROUGH, register_profiles
from kvmspec.fuzz.radix_machine import RadixMachine
from kvmspec.fuzz.regressions import cite, rule_of, write_regression_test
from kvmspec.fuzz.targets import TargetUnavailable, make_target
from kvmspec.fuzz.tdp_machine import tdp_machine
from kvmspec.fuzz.x86_machine import x86_machine
from kvmspec.spec.checked_by import CHECKED_BY, NOT_CHECKED
from kvmspec.spec.platforms import ARM64, DEFAULT_PROFILE, PPC64_HV, PPC64_HV_RADIX, PROFILES
from kvmspec.spec.rules import RULES

REGRESSIONS = Path("corpus/regressions")
SLICE_EXAMPLES = 10
COVERAGE_EVERY = 10
"""One slice of an area in this many runs under coverage.py (and the area's first)."""
CODE = Path(__file__).resolve().parents[1]
"""The repository (or the installed package) whose reference/ and spec/ coverage counts."""
DEATHS_BEFORE_GIVING_UP = 3
"""An area whose slices were running when a worker died this many times is not run again."""


@dataclass
class Area:
    name: str
    target: str
    machine: type[RuleBasedStateMachine]


_LINUX_KVM_AREAS = ("memslots/linux-kvm", "differential/linux-kvm", "guest/linux-kvm")
"""The areas that run on the real KVM (built below when /dev/kvm opens)."""

FUZZ_AREAS = (
    FuzzArea(
        "atheris/memslots",
        "memslots",
        "kvmspec.fuzz.fuzz_memslots",
        Path("corpus/seeds/memslots"),
        1024,
    ),
    FuzzArea(
        "atheris/generic",
        "generic",
        "kvmspec.fuzz.fuzz_generic",
        Path("corpus/seeds/generic"),
        512,
        counts_actions=True,
    ),
    FuzzArea(
        "atheris/x86",
        "x86",
        "kvmspec.fuzz.fuzz_x86",
        Path("corpus/seeds/x86"),
        256,
        counts_actions=True,
    ),
    FuzzArea(
        "atheris/ppc",
        "ppc",
        "kvmspec.fuzz.fuzz_ppc",
        Path("corpus/seeds/ppc"),
        256,
        counts_actions=True,
    ),
    FuzzArea(
        "atheris/arm64",
        "arm64",
        "kvmspec.fuzz.fuzz_arm64",
        Path("corpus/seeds/arm64"),
        256,
        counts_actions=True,
    ),
)


def _fuzz_areas(wanted: Sequence[str], target: str | None) -> list[FuzzArea]:
    """The Atheris areas to run: all of them unless areas are named ("atheris", an area's
    name, its family or "reference" name it); none without atheris or off the reference."""
    if target not in (None, "reference") or importlib.util.find_spec("atheris") is None:
        return []
    return [
        area
        for area in FUZZ_AREAS
        if not wanted or any(w in ("atheris", "reference", area.name, area.family) for w in wanted)
    ]


def _areas(wanted: Sequence[str], target: str | None, console: Console) -> list[Area]:
    areas = []
    if target in (None, "reference"):
        for name, profile in PROFILES.items():
            areas.append(Area(f"memslots/{name}", "reference", machines.memslot_machine(profile)))
        for profile in (DEFAULT_PROFILE, ARM64):
            areas.append(Area(f"generic/{profile.name}", "reference", generic_machine(profile)))
        guest = machines.memslot_machine(DEFAULT_PROFILE, mix="guest")
        areas.append(Area(f"guest/{DEFAULT_PROFILE.name}", "reference", guest))
        x86 = x86_machine(DEFAULT_PROFILE)
        areas.append(Area(f"x86/{DEFAULT_PROFILE.name}", "reference", x86))
        areas.append(Area("x86-tdp/x86_64", "reference", tdp_machine()))
        areas.append(Area("x86-tdp/x86_64-no-ad", "reference", tdp_machine(ad_bits=False)))
        areas.append(Area("x86-tdp/x86_64-pml", "reference", tdp_machine(pml=True)))
        areas.append(Area(f"arm64/{ARM64.name}", "reference", arm64_machine(ARM64)))
        areas.append(Area(f"ppc/{PPC64_HV.name}", "reference", ppc_machine(PPC64_HV)))
        areas.append(Area(f"ppc/{PPC64_HV_RADIX.name}", "reference", RadixMachine))
    # The linux-kvm areas open /dev/kvm: only when everything is wanted, or the target, one
    # of its areas, or a family that includes them (guest, differential) is named.
    kvm_names = {"linux-kvm", "guest", "differential", *_LINUX_KVM_AREAS}
    kvm_wanted = target == "linux-kvm" or (
        target is None and (not wanted or any(w in kvm_names for w in wanted))
    )
    if kvm_wanted:
        try:
            make_target("linux-kvm", DEFAULT_PROFILE).close()
        except (TargetUnavailable, ImportError) as reason:
            console.print(f"[yellow]linux-kvm areas skipped: {reason}[/]")
        else:
            areas.append(
                Area(
                    "memslots/linux-kvm",
                    "linux-kvm",
                    machines.memslot_machine(DEFAULT_PROFILE, "linux-kvm"),
                )
            )
            areas.append(
                Area(
                    "differential/linux-kvm",
                    "linux-kvm",
                    machines.differential_machine(DEFAULT_PROFILE),
                )
            )
            areas.append(
                Area(
                    "guest/linux-kvm",
                    "linux-kvm",
                    machines.differential_machine(DEFAULT_PROFILE, mix="guest"),
                )
            )
    if wanted:
        # "memslots" picks a family, "memslots/arm64" one area, "linux-kvm" a target.
        areas = [
            a
            for a in areas
            if any(w in (a.name, a.target) or a.name.startswith(w + "/") for w in wanted)
        ]
    return areas


def _table(results: list[AreaResult], elapsed: float, budget: float, workers: int) -> Table:
    table = Table(title=f"kvmspec campaign: {elapsed:.0f}s of {budget:.0f}s, {workers} workers")
    for column in ("area", "target", "examples", "steps", "steps/s", "coverage", "failures"):
        left = column in ("area", "target")
        table.add_column(column, justify="left" if left else "right", no_wrap=column == "area")
    for result in results:
        failures = len(result.failures)
        deaths = f" [yellow]+{len(result.worker_deaths)} died[/]" if result.worker_deaths else ""
        table.add_row(
            result.area,
            result.target,
            str(result.examples),
            str(result.steps),
            f"{result.rate:,.0f}",
            "-" if result.coverage is None else f"{result.coverage:,} {result.coverage_unit}",
            (f"[red]{failures}[/]" if failures else "0") + deaths,
        )
    return table


def _record_failure(area: Area, error: BaseException) -> str:
    """Keep the failing run under corpus/regressions/ (its trace or its fuzzer input, and a
    pytest case that replays it) and return a summary line: the first broken rule, where it
    comes from, and how to replay it."""
    trace = machines.LAST_RUN.get("trace", "")
    digest = hashlib.sha1(trace.encode()).hexdigest()[:12]
    REGRESSIONS.mkdir(parents=True, exist_ok=True)
    suffix = machines.LAST_RUN.get("suffix", ".jsonl")
    stem = f"{area.name.replace('/', '-')}-{digest}"
    path = REGRESSIONS / f"{stem}{suffix}"
    path.write_text(trace)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    rule_id = rule_of(first)
    source = f"; {cite(rule_id).splitlines()[1].strip()}" if rule_id else ""
    reproducer = machines.LAST_RUN.get("reproducer")
    if reproducer is not None:
        # A generic or x86 machine's run as an input of its family's fuzzer:
        # ./fuzz/fuzz_<family>.py FILE replays it and prints the broken rules with each step.
        binary = path.with_name(f"{stem}.bin")
        binary.write_bytes(bytes.fromhex(reproducer))
        test = write_regression_test(binary, f"{area.name}: {first}")
        fuzzer = f"./fuzz/fuzz_{area.name.split('/')[0]}.py"
        return f"{first}{source} (interleaving: {path}; replay: {fuzzer} {binary}; test: {test})"
    if suffix == ".jsonl":
        test = write_regression_test(path, f"{area.name}: {first}")
        return f"{first}{source} (replay: kvmspec replay --check {path}; test: {test})"
    return f"{first}{source} (steps: {path})"


# ---------------------------------------------------------------------------------------------
# The state-machine workers
# ---------------------------------------------------------------------------------------------

# The areas a worker can run, by name, and the example database they share. Workers are
# forked from the campaign, so they inherit both (and anything a test patched before the
# campaign started).
_WORKER_AREAS: dict[str, Area] = {}
_DATABASE: list[CheckedDatabase] = []


@dataclass(frozen=True)
class SliceResult:
    """What one slice of one area did in a worker (only plain data crosses processes)."""

    area: str
    steps: int
    checks: int
    seconds: float
    examples: int
    failure: str | None
    pid: int
    peak_rss_kib: int
    rss_kib: int
    corrupt_entries: int
    arcs: frozenset[tuple[str, int, int]] | None
    """The branch arcs of reference/ and spec/ the slice reached, if it was traced."""


def _outer_coverage(name: str) -> bool:
    """Under coverage.py (``make power``), record what follows as reached by area ``name``,
    so the report shows which machine reaches what; True when there is such a tracer."""
    coverage = sys.modules.get("coverage")
    current = coverage.Coverage.current() if coverage is not None else None
    if current is not None:
        current.switch_context(name)
    return current is not None


def _traced_arcs(run: Callable[[], None]) -> frozenset[tuple[str, int, int]]:
    """Run ``run`` under coverage.py with branch coverage of reference/ and spec/, and
    return the arcs it reached (file relative to the code folders, from line, to line)."""
    import coverage  # a dev dependency: only campaigns that trace need it

    folders = [str(CODE / "reference"), str(CODE / "spec")]
    tracer = coverage.Coverage(
        data_file=None,
        branch=True,
        include=[f"{folder}/*" for folder in folders],
        config_file=False,
    )
    tracer.start()
    try:
        run()
    finally:
        tracer.stop()
    data = tracer.get_data()
    return frozenset(
        (str(Path(path).relative_to(CODE)), start, end)
        for path in data.measured_files()
        for start, end in data.arcs(path) or ()
    )


def _current_rss_kib() -> int:
    """This process's resident set now (Linux), in KiB; 0 where /proc cannot tell."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _worker_start() -> None:
    """Workers leave Ctrl-C to the campaign, which stops them itself, and print nothing: the
    campaign's live table owns the terminal (a failure's report is in its trace file). The
    campaign stops a worker with SIGTERM, which must end it at once: a worker is forked with
    the campaign's own handler, which only takes note (and a handler that raised could do so
    inside coverage.py's lock of a traced slice, and hang the worker there)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    keep_freed_memory()  # each example's fresh VM reuses the last one's memory
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the process's life


def run_slice(name: str, examples: int, trace: bool = False, replay: bool = False) -> SliceResult:
    """Run ``examples`` examples of one area's state machine (in a worker process), traced
    by coverage.py if ``trace`` (and no outer tracer runs). With ``replay``, run only the
    examples the database holds for the area, as they are (no shrinking), and ``examples``
    new ones only if it holds none."""
    area = _WORKER_AREAS[name]
    (database,) = _DATABASE
    traced = trace and not _outer_coverage(name)
    steps, checks = machines.STATS["steps"], machines.STATS["invariant_checks"]
    corrupt = database.skipped
    began = time.monotonic()
    failure = None
    arcs = None

    def run() -> None:
        chosen = settings(settings.get_profile(THOROUGH), max_examples=examples, database=database)
        if replay:
            # What the database holds comes first; without it, one new example runs (a
            # run of no examples at all is an error to Hypothesis).
            chosen = settings(chosen, phases=(Phase.explicit, Phase.reuse, Phase.generate))
        run_state_machine_as_test(area.machine, settings=chosen)

    try:
        if traced:
            arcs = _traced_arcs(run)
        else:
            run()
    except Exception as error:  # a broken rule, reported with its trace
        failure = _record_failure(area, error)
    return SliceResult(
        area=name,
        steps=machines.STATS["steps"] - steps,
        checks=machines.STATS["invariant_checks"] - checks,
        seconds=time.monotonic() - began,
        examples=examples,
        failure=failure,
        pid=os.getpid(),
        peak_rss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        rss_kib=_current_rss_kib(),
        corrupt_entries=database.skipped - corrupt,
        arcs=arcs,
    )


class MachinePool:
    """The state-machine areas, a slice at a time, on ``workers`` processes until the campaign
    stops filling it. Each worker is a one-process pool of its own, so a worker that dies is
    known to have been running its one slice: that slice is reported against its area, a new
    worker replaces it, and an area whose slices killed ``DEATHS_BEFORE_GIVING_UP`` workers is
    not run again."""

    def __init__(self, areas: Sequence[Area], results: Sequence[AreaResult], workers: int) -> None:
        self.areas = list(areas)
        self.results = {result.area: result for result in results}
        self.workers: list[ProcessPoolExecutor] = [self._new_worker() for _ in range(workers)]
        self.pending: dict[Future[SliceResult], tuple[str, int]] = {}
        self.checks = 0
        self.corrupt_entries = 0
        self.peak_rss_kib: dict[int, int] = {}
        self.rss_kib: dict[int, int] = {}  # each worker's resident set after its last slice
        self._turn = 0
        self.slices: dict[str, int] = {area.name: 0 for area in areas}  # handed out, by area
        self.arcs: dict[str, set[tuple[str, int, int]]] = {area.name: set() for area in areas}
        _WORKER_AREAS.clear()
        _WORKER_AREAS.update({area.name: area for area in areas})

    @staticmethod
    def _new_worker() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("fork"), initializer=_worker_start
        )

    def _runnable(self, name: str) -> bool:
        result = self.results[name]
        return not result.failures and len(result.worker_deaths) < DEATHS_BEFORE_GIVING_UP

    def fill(self) -> None:
        """Give every idle worker a slice of the next runnable area, in turn."""
        names = [area.name for area in self.areas]
        busy = {index for _, index in self.pending.values()}
        for index in range(len(self.workers)):
            if index in busy:
                continue
            runnable = [n for n in names[self._turn :] + names[: self._turn] if self._runnable(n)]
            if not runnable:
                return
            name = runnable[0]
            self._turn = (names.index(name) + 1) % len(names)
            trace = self.slices[name] % COVERAGE_EVERY == 0
            self.slices[name] += 1
            with SPAWN_LOCK:  # the first submit to a worker forks its process
                future = self.workers[index].submit(run_slice, name, SLICE_EXAMPLES, trace)
            self.pending[future] = (name, index)

    def collect(self, timeout: float) -> None:
        """Take in the slices that finished within ``timeout`` seconds."""
        if not self.pending:
            return
        done, _ = wait(self.pending, timeout=timeout, return_when=FIRST_COMPLETED)
        for future in done:
            name, index = self.pending.pop(future)
            result = self.results[name]
            try:
                outcome = future.result()
            except BrokenProcessPool:
                result.worker_deaths.append(
                    "a worker process died while running a slice of this area (replaced)"
                )
                self.workers[index].shutdown(wait=False)
                self.workers[index] = self._new_worker()
                continue
            except Exception as error:  # the worker could not even report the slice
                result.failures.append(f"worker error: {type(error).__name__}: {error}")
                continue
            result.steps += outcome.steps
            result.seconds += outcome.seconds
            result.examples += outcome.examples
            self.checks += outcome.checks
            self.corrupt_entries += outcome.corrupt_entries
            self.peak_rss_kib[outcome.pid] = outcome.peak_rss_kib
            self.rss_kib[outcome.pid] = outcome.rss_kib
            if outcome.arcs is not None:
                self.arcs[name] |= outcome.arcs
                result.coverage, result.coverage_unit = len(self.arcs[name]), "arcs"
            if outcome.failure is not None:
                result.failures.append(outcome.failure)

    def replay(self, names: Sequence[str]) -> None:
        """Replay, without shrinking, what the database holds for each area (one slice each,
        the workers in turn): a slice cut short while Hypothesis was shrinking a failure
        has saved that failure there, and this reports it."""
        for turn, name in enumerate(names):
            index = turn % len(self.workers)
            with SPAWN_LOCK:
                future = self.workers[index].submit(run_slice, name, 1, False, True)
            self.pending[future] = (name, index)

    def cut_short(self) -> list[str]:
        """End the slices still running: their workers are replaced; the areas they ran."""
        names = [name for name, _ in self.pending.values()]
        self.stop()
        self.pending.clear()
        self.workers = [self._new_worker() for _ in self.workers]
        return names

    def stop(self) -> None:
        """Stop at once: cancel what has not started, end the workers."""
        for worker in self.workers:
            processes = list(getattr(worker, "_processes", {}).values())
            worker.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.terminate()

    def close(self) -> None:
        for worker in self.workers:
            worker.shutdown(wait=True)


def _grace(budget: float) -> float:
    """How long slices may run on past the budget before they are cut short."""
    return max(30.0, budget / 10)


class _StopRequest:
    """Ctrl-C or SIGTERM (a CI job's time limit, `kill`) asks the campaign to stop. The
    handler only takes note, and the main loop stops at its next turn (within half a
    second): an exception raised by the signal itself could land inside a fork or a lock of
    the worker pools and leave the stop waiting on it."""

    def __init__(self) -> None:
        self.asked = False

    def __call__(self, signum: int, frame: object) -> None:
        self.asked = True


def _usable_workers(requested: int | None) -> int:
    return requested if requested is not None else max(os.cpu_count() or 1, 1)


def run_campaign(
    wanted: Sequence[str],
    minutes: float,
    target: str | None,
    report: str | None,
    workers: int | None = None,
    database: str | None = None,
) -> int:
    """Run the campaign; exit status 0 when no rule was broken, 1 otherwise, 2 when nothing
    can run, 130 when interrupted (the summary and the report are written all the same).
    ``database`` is the example database to share (see campaign_database.py); a database
    that cannot be used raises DatabaseError."""
    register_profiles()
    _DATABASE[:] = [open_database(database)]
    # A report piped to a file or CI log gets a width that fits the table.
    console = Console(width=None if sys.stdout.isatty() else 120)
    processes = _usable_workers(workers)
    areas = _areas(wanted, target, console)
    fuzz_areas = _fuzz_areas(wanted, target)
    if not areas and not fuzz_areas:
        console.print("kvmspec: error: no area matches, or no usable target")
        return 2
    budget = max(minutes * 60.0, 1.0)
    # Who runs when: the fuzzers in a process of their own beside the machine pool, or, with
    # one worker, after the machines' share of the budget.
    shared = processes == 1 and bool(areas) and bool(fuzz_areas)
    machine_budget = budget * len(areas) / (len(areas) + len(fuzz_areas)) if shared else budget
    machine_workers = processes if shared or not fuzz_areas else max(processes - 1, 1)
    results = [AreaResult(area.name, area.target) for area in areas]
    scratch = tempfile.TemporaryDirectory(prefix="kvmspec-campaign-")
    start = time.monotonic()
    pool = MachinePool(areas, results, machine_workers) if areas else None
    fuzzers = (
        AtherisWorkers(
            fuzz_areas,
            budget - machine_budget if shared else budget,
            Path(scratch.name),
            REGRESSIONS,
            delay=machine_budget if shared else 0.0,
        )
        if fuzz_areas
        else None
    )
    everything = results + (fuzzers.results if fuzzers is not None else [])
    rss_timeline: list[tuple[float, float, float]] = []
    interrupted = False
    cut_at = machine_budget + _grace(budget)  # when slices still running are cut short
    replayed = False  # whether the areas of cut slices were replayed already
    stop = _StopRequest()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with Live(
            _table(everything, 0, budget, processes),
            console=console,
            refresh_per_second=2,
            transient=True,
        ) as live:
            while True:
                if stop.asked:
                    raise KeyboardInterrupt
                elapsed = time.monotonic() - start
                if pool is not None:
                    if elapsed < machine_budget:
                        pool.fill()
                    pool.collect(timeout=0.5)
                    # Every 10 seconds, the largest worker's resident set after its last slice
                    # and the largest peak so far: a long campaign's memory profile.
                    due = not rss_timeline or elapsed - rss_timeline[-1][0] >= 10
                    if pool.rss_kib and due:
                        now = max(pool.rss_kib.values()) / 1024
                        peak = max(pool.peak_rss_kib.values()) / 1024
                        rss_timeline.append((elapsed, now, peak))
                else:
                    time.sleep(0.5)
                live.update(_table(everything, time.monotonic() - start, budget, processes))
                if pool is not None and pool.pending and elapsed >= cut_at:
                    # A slice that runs on long past the budget (a long shrink) is cut short.
                    # Hypothesis has already saved what it found in the example database: a
                    # replay of each such area, without shrinking, reports it now (and the
                    # next campaign starts from it). A replay that runs on too is cut short.
                    names = pool.cut_short()
                    for name in names:
                        what = "the replay" if replayed else "a slice"
                        console.print(
                            f"[yellow]cut short[/] {what} of {name} still running"
                            f" {elapsed - machine_budget:.0f} s after the budget"
                        )
                    if not replayed:
                        pool.replay(names)
                        replayed = True
                        cut_at = elapsed + _grace(budget)
                machines_done = pool is None or (elapsed >= machine_budget and not pool.pending)
                fuzzers_done = fuzzers is None or not fuzzers.thread.is_alive()
                if machines_done and fuzzers_done:
                    break
    except KeyboardInterrupt:
        interrupted = True
        console.print("[yellow]interrupted: stopping the workers[/]")
        if pool is not None:
            pool.stop()
        if fuzzers is not None:
            fuzzers.stop()
    else:
        if pool is not None:
            pool.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if fuzzers is not None:
        fuzzers.finish()
    scratch.cleanup()
    elapsed = time.monotonic() - start
    checks = pool.checks if pool is not None else 0
    peak_rss = max(pool.peak_rss_kib.values(), default=0) / 1024 if pool is not None else 0.0
    console.print()
    console.print(_table(everything, elapsed, budget, processes))
    total_steps = sum(r.steps for r in everything)
    checked = sum(1 for by in CHECKED_BY.values() if not by[0].startswith(NOT_CHECKED))
    console.print(
        f"{total_steps} steps in {elapsed:.1f}s on {processes} workers; invariant checks run "
        f"after every reference step: {checks}; rules with a checker: {checked} of "
        f"{len(RULES)}; peak RSS of a state-machine worker: {peak_rss:.0f} MiB"
    )
    if pool is not None and any(pool.arcs.values()):
        reached = set().union(*pool.arcs.values())
        console.print(
            f"state machines: {len(reached):,} branch arcs of reference/ and spec/ reached in"
            f" the traced slices (an area's first slice and every {COVERAGE_EVERY}th)"
        )
    failures = [f"{r.area}: {f}" for r in everything for f in r.failures]
    for failure in failures:
        # Whole lines (a log keeps them greppable), and the text is not rich markup.
        console.print(f"[red]FAIL[/] {escape(failure)}", soft_wrap=True)
    # A worker that died took the model down with it (a crash, not a broken rule): as bad.
    deaths = [f"{r.area}: {d}" for r in everything for d in r.worker_deaths]
    for death in deaths:
        console.print(f"[yellow]WORKER DIED[/] {escape(death)}", soft_wrap=True)
    corrupt = pool.corrupt_entries if pool is not None else 0
    if corrupt:
        console.print(
            f"[yellow]WARNING[/] {corrupt} example-database entries could not be decoded;"
            " they were skipped and removed"
        )
    if report:
        Path(report).write_text(
            json.dumps(
                {
                    "seconds": elapsed,
                    "steps": total_steps,
                    "workers": processes,
                    "interrupted": interrupted,
                    "invariant_checks": checks,
                    "corrupt_database_entries": corrupt,
                    "peak_rss_mib": peak_rss,
                    # [seconds, resident MiB now, peak MiB so far] of the largest worker
                    "rss_mib": [[round(v, 1) for v in point] for point in rss_timeline],
                    "areas": [asdict(r) | {"steps_per_second": r.rate} for r in everything],
                },
                indent=2,
            )
        )
    if interrupted:
        return 130
    return 1 if failures or deaths else 0
