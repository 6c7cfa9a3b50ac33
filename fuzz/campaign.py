"""``kvmspec campaign``: run the state machines and the fuzzers for a time budget, summarise.

Each area is a state machine bound to a profile and a target. The campaign runs them in turn
in short slices under the ``kvmspec-thorough`` Hypothesis profile, sharing Hypothesis's example
database in ``.hypothesis/`` (so a failure found once is retried first next time). Meanwhile
a second process runs the Atheris fuzzers one after the other, sharing the same budget: the
memslot fuzzer (fuzz/fuzz_memslots.py), the generic-layer fuzzer (fuzz/fuzz_generic.py), then
the x86 shadow-MMU fuzzer (fuzz/fuzz_x86.py), so both cores work and each layer is fuzzed by
both engines. The campaign shows live progress
and ends with a summary table: steps (rules for a state machine, operations or actions for a
fuzzer), steps per second, invariant checks, failures. Each failure is written as a
replayable trace (or, for the generic and x86 fuzzers, the input and its report) under
corpus/regressions/; a generic or x86 state machine's failure also leaves its run as an input
of that layer's fuzzer, which replays it with its report.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test
from rich.console import Console
from rich.live import Live
from rich.table import Table

from kvmspec.fuzz import machines
from kvmspec.fuzz.generic_machine import generic_machine
from kvmspec.fuzz.profiles import THOROUGH, register_profiles
from kvmspec.fuzz.targets import TargetUnavailable, make_target
from kvmspec.fuzz.x86_machine import x86_machine
from kvmspec.spec.checked_by import CHECKED_BY, NOT_CHECKED
from kvmspec.spec.platforms import ARM64, DEFAULT_PROFILE, PROFILES
from kvmspec.spec.rules import RULES

REGRESSIONS = Path("corpus/regressions")
SLICE_EXAMPLES = 10
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.MULTILINE)


@dataclass
class AreaResult:
    area: str
    target: str
    steps: int = 0
    seconds: float = 0.0
    examples: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0


@dataclass
class Area:
    name: str
    target: str
    machine: type[RuleBasedStateMachine]


@dataclass(frozen=True)
class FuzzArea:
    """An Atheris fuzz target of the campaign: its module, seed corpus and input size, and
    the family of state-machine areas it fuzzes too (``kvmspec campaign generic`` picks it)."""

    name: str
    family: str
    module: str
    seeds: Path
    max_len: int
    counts_actions: bool = False
    """Whether the target writes its action counters (``KVMSPEC_FUZZ_STATS``): its steps are
    then harness actions, else executions."""


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
    kvm_wanted = target == "linux-kvm" or (target is None and (not wanted or "linux-kvm" in wanted))
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


def _table(results: list[AreaResult], elapsed: float, budget: float) -> Table:
    table = Table(title=f"kvmspec campaign: {elapsed:.0f}s of {budget:.0f}s")
    for column in ("area", "target", "examples", "steps", "steps/s", "failures"):
        left = column in ("area", "target")
        table.add_column(column, justify="left" if left else "right", no_wrap=column == "area")
    for result in results:
        table.add_row(
            result.area,
            result.target,
            str(result.examples),
            str(result.steps),
            f"{result.rate:,.0f}",
            f"[red]{len(result.failures)}[/]" if result.failures else "0",
        )
    return table


def _record_failure(area: Area, error: BaseException) -> str:
    """Write the failing run's trace under corpus/regressions/ and return a summary line."""
    trace = machines.LAST_RUN.get("trace", "")
    digest = hashlib.sha1(trace.encode()).hexdigest()[:12]
    REGRESSIONS.mkdir(parents=True, exist_ok=True)
    suffix = machines.LAST_RUN.get("suffix", ".jsonl")
    path = REGRESSIONS / f"{area.name.replace('/', '-')}-{digest}{suffix}"
    path.write_text(trace)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    reproducer = machines.LAST_RUN.get("reproducer")
    if reproducer is not None:
        # A generic or x86 machine's run as an input of its family's fuzzer:
        # ./fuzz/fuzz_<family>.py FILE replays it and prints the broken rules with each step.
        binary = path.with_name(f"{area.name.replace('/', '-')}-{digest}.bin")
        binary.write_bytes(bytes.fromhex(reproducer))
        fuzzer = f"./fuzz/fuzz_{area.name.split('/')[0]}.py"
        return f"{first} (trace: {path}; replay: {fuzzer} {binary})"
    return f"{first} (trace: {path})"


class AtherisWorker:
    """One Atheris fuzz target in its own process, for ``seconds``.

    New inputs go to a scratch corpus (libFuzzer writes into its first corpus folder), so the
    seed corpus in the repository is only read. A finding stops libFuzzer; what it keeps is in
    corpus/regressions/ like every other finding.
    """

    def __init__(self, area: FuzzArea, seconds: float, scratch: Path) -> None:
        self.area = area
        self.result = AreaResult(area.name, "reference")
        folder = scratch / area.family
        corpus = folder / "corpus"
        corpus.mkdir(parents=True)
        self.counters = folder / "counters.json"
        command = [
            sys.executable,
            "-m",
            area.module,
            f"-max_len={area.max_len}",
            f"-max_total_time={max(int(seconds), 1)}",
            "-print_final_stats=1",
            f"-artifact_prefix={folder}/",
            str(corpus),
        ]
        if area.seeds.is_dir():
            command.append(str(area.seeds))
        environment = dict(
            os.environ,
            KVMSPEC_REGRESSIONS=str(REGRESSIONS.resolve()),
            KVMSPEC_FUZZ_STATS=str(self.counters),
        )
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )

    def finish(self) -> AreaResult:
        """Wait for the fuzzer to stop and read libFuzzer's final statistics (and, for a
        target that counts its actions, its counters)."""
        try:
            _, stderr = self.process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, stderr = self.process.communicate()
        stats = {name: int(value) for name, value in _STAT.findall(stderr)}
        units = stats.get("number_of_executed_units", 0)
        self.result.steps = self.result.examples = units
        rate = stats.get("average_exec_per_sec", 0)
        self.result.seconds = units / rate if rate else time.monotonic() - self.started
        if self.area.counts_actions and self.counters.exists():
            counters = json.loads(self.counters.read_text())
            if counters["executions"]:
                # The counters are written at most once a second: scale them to the final
                # number of executions.
                per_execution = counters["actions"] / counters["executions"]
                self.result.steps = round(per_execution * units)
        if self.process.returncode:
            lines = [line for line in stderr.splitlines() if line.strip()]
            finding = next((line for line in lines if "SpecViolation" in line), None)
            self.result.failures.append(finding or (lines[-1] if lines else "fuzzer failed"))
        return self.result


class AtherisWorkers:
    """The Atheris areas one after the other, in one process at a time, within ``seconds``:
    each gets an equal share of the time left when it starts (a fuzzer stopped early by a
    finding leaves its time to the next)."""

    def __init__(self, areas: Sequence[FuzzArea], seconds: float, scratch: Path) -> None:
        self.results: list[AreaResult] = []
        deadline = time.monotonic() + seconds
        self.thread = threading.Thread(target=self._run, args=(areas, deadline, scratch))
        self.thread.start()

    def _run(self, areas: Sequence[FuzzArea], deadline: float, scratch: Path) -> None:
        for index, area in enumerate(areas):
            share = (deadline - time.monotonic()) / (len(areas) - index)
            self.results.append(AtherisWorker(area, share, scratch).finish())

    def finish(self) -> list[AreaResult]:
        """Wait for the last fuzzer; the results, in the order the areas ran."""
        self.thread.join()
        return self.results


def run_campaign(
    wanted: Sequence[str],
    minutes: float,
    target: str | None,
    report: str | None,
) -> int:
    """Run the campaign; exit status 0 when no rule was broken, 1 otherwise."""
    register_profiles()
    # A report piped to a file or CI log gets a width that fits the table.
    console = Console(width=None if sys.stdout.isatty() else 110)
    areas = _areas(wanted, target, console)
    fuzz_areas = _fuzz_areas(wanted, target)
    if not areas and not fuzz_areas:
        console.print("kvmspec: error: no area matches, or no usable target")
        return 2
    results = [AreaResult(area.name, area.target) for area in areas]
    budget = max(minutes * 60.0, 1.0)
    scratch = tempfile.TemporaryDirectory(prefix="kvmspec-campaign-")
    fuzzers = AtherisWorkers(fuzz_areas, budget, Path(scratch.name)) if fuzz_areas else None
    start = time.monotonic()
    base = settings.get_profile(THOROUGH)
    with Live(
        _table(results, 0, budget), console=console, refresh_per_second=2, transient=True
    ) as live:
        while areas and time.monotonic() - start < budget:
            for area, result in zip(areas, results, strict=True):
                if time.monotonic() - start >= budget:
                    break
                if result.failures:
                    continue
                before = machines.STATS["steps"]
                began = time.monotonic()
                slice_settings = settings(base, max_examples=SLICE_EXAMPLES)
                try:
                    run_state_machine_as_test(area.machine, settings=slice_settings)
                except Exception as error:  # a broken rule, reported with its trace
                    result.failures.append(_record_failure(area, error))
                result.seconds += time.monotonic() - began
                result.steps += machines.STATS["steps"] - before
                result.examples += SLICE_EXAMPLES
                live.update(_table(results, time.monotonic() - start, budget))
    if fuzzers is not None:
        results.extend(fuzzers.finish())
    scratch.cleanup()
    elapsed = time.monotonic() - start
    console.print()
    console.print(_table(results, elapsed, budget))
    total_steps = sum(r.steps for r in results)
    checked = sum(1 for by in CHECKED_BY.values() if not by[0].startswith(NOT_CHECKED))
    console.print(
        f"{total_steps} steps in {elapsed:.1f}s; invariant checks run after every reference "
        f"step: {machines.STATS['invariant_checks']}; rules with a checker: {checked} of "
        f"{len(RULES)}"
    )
    failures = [f"{r.area}: {f}" for r in results for f in r.failures]
    for failure in failures:
        console.print(f"[red]FAIL[/] {failure}")
    if report:
        Path(report).write_text(
            json.dumps(
                {
                    "seconds": elapsed,
                    "steps": total_steps,
                    "areas": [asdict(r) | {"steps_per_second": r.rate} for r in results],
                },
                indent=2,
            )
        )
    return 1 if failures else 0
