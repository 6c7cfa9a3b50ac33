"""``kvmspec campaign``: run the state machines and the fuzzer for a time budget, summarise.

Each area is a state machine bound to a profile and a target. The campaign runs them in turn
in short slices under the ``kvmspec-thorough`` Hypothesis profile, sharing Hypothesis's example
database in ``.hypothesis/`` (so a failure found once is retried first next time). Meanwhile
a second process runs the Atheris memslot fuzzer (fuzz/fuzz_memslots.py) for the same budget,
so both cores work. The campaign shows live progress and ends with a summary table: steps,
steps per second, invariant checks, failures. Each failure is written as a replayable trace
under corpus/regressions/.
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
from kvmspec.spec.checked_by import CHECKED_BY, NOT_CHECKED
from kvmspec.spec.platforms import ARM64, DEFAULT_PROFILE, PROFILES
from kvmspec.spec.rules import RULES

REGRESSIONS = Path("corpus/regressions")
FUZZ_SEEDS = Path("corpus/seeds/memslots")
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


def _areas(wanted: Sequence[str], target: str | None, console: Console) -> list[Area]:
    areas = []
    if target in (None, "reference"):
        for name, profile in PROFILES.items():
            areas.append(Area(f"memslots/{name}", "reference", machines.memslot_machine(profile)))
        for profile in (DEFAULT_PROFILE, ARM64):
            areas.append(Area(f"generic/{profile.name}", "reference", generic_machine(profile)))
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
    return f"{first} (trace: {path})"


class AtherisWorker:
    """fuzz_memslots.py in its own process for the whole budget (when atheris is installed).

    New inputs go to a scratch corpus (libFuzzer writes into its first corpus folder), so the
    seed corpus in the repository is only read. A finding stops libFuzzer; its trace is in
    corpus/regressions/ like every other finding.
    """

    def __init__(self, seconds: float, scratch: Path) -> None:
        self.result = AreaResult("atheris/memslots", "reference")
        corpus = scratch / "corpus"
        corpus.mkdir()
        command = [
            sys.executable,
            "-m",
            "kvmspec.fuzz.fuzz_memslots",
            "-max_len=1024",
            f"-max_total_time={max(int(seconds), 1)}",
            "-print_final_stats=1",
            f"-artifact_prefix={scratch}/",
            str(corpus),
        ]
        if FUZZ_SEEDS.is_dir():
            command.append(str(FUZZ_SEEDS))
        environment = dict(os.environ, KVMSPEC_REGRESSIONS=str(REGRESSIONS.resolve()))
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )

    def finish(self) -> AreaResult:
        """Wait for the fuzzer to stop and read libFuzzer's final statistics."""
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
        if self.process.returncode:
            lines = [line for line in stderr.splitlines() if line.strip()]
            finding = next((line for line in lines if "SpecViolation" in line), None)
            self.result.failures.append(finding or (lines[-1] if lines else "fuzzer failed"))
        return self.result


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
    if not areas:
        console.print("kvmspec: error: no area matches, or no usable target")
        return 2
    results = [AreaResult(area.name, area.target) for area in areas]
    budget = max(minutes * 60.0, 1.0)
    scratch = tempfile.TemporaryDirectory(prefix="kvmspec-campaign-")
    fuzzer = None
    if target in (None, "reference") and importlib.util.find_spec("atheris") is not None:
        fuzzer = AtherisWorker(budget, Path(scratch.name))
    start = time.monotonic()
    base = settings.get_profile(THOROUGH)
    with Live(
        _table(results, 0, budget), console=console, refresh_per_second=2, transient=True
    ) as live:
        while time.monotonic() - start < budget:
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
    if fuzzer is not None:
        results.append(fuzzer.finish())
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
