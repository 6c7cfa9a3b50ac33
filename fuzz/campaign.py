"""``kvmspec campaign``: run the state machines for a time budget and summarise.

Each area is a state machine bound to a profile and a target. The campaign runs them in turn
in short slices under the ``kvmspec-thorough`` Hypothesis profile, sharing Hypothesis's example
database in ``.hypothesis/`` (so a failure found once is retried first next time), shows live
progress, and ends with a summary table: steps, steps per second, invariant checks, failures.
Each failure is written as a replayable trace under corpus/regressions/.
"""

from __future__ import annotations

import hashlib
import json
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
from kvmspec.fuzz.profiles import THOROUGH, register_profiles
from kvmspec.fuzz.targets import TargetUnavailable, make_target
from kvmspec.spec.invariants.memslots import CHECKED_RULES
from kvmspec.spec.platforms import DEFAULT_PROFILE, PROFILES
from kvmspec.spec.rules import RULES

REGRESSIONS = Path("corpus/regressions")
SLICE_EXAMPLES = 10


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
        areas = [a for a in areas if any(a.name.startswith(w) or w in a.name for w in wanted)]
    return areas


def _table(results: list[AreaResult], elapsed: float, budget: float) -> Table:
    table = Table(title=f"kvmspec campaign: {elapsed:.0f}s of {budget:.0f}s")
    for column in ("area", "target", "examples", "steps", "steps/s", "failures"):
        table.add_column(column, justify="left" if column in ("area", "target") else "right")
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
    path = REGRESSIONS / f"{area.name.replace('/', '-')}-{digest}.jsonl"
    path.write_text(trace)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{first} (trace: {path})"


def run_campaign(
    wanted: Sequence[str],
    minutes: float,
    target: str | None,
    report: str | None,
) -> int:
    """Run the campaign; exit status 0 when no rule was broken, 1 otherwise."""
    register_profiles()
    console = Console()
    areas = _areas(wanted, target, console)
    if not areas:
        console.print("kvmspec: error: no area matches, or no usable target")
        return 2
    results = [AreaResult(area.name, area.target) for area in areas]
    budget = max(minutes * 60.0, 1.0)
    start = time.monotonic()
    base = settings.get_profile(THOROUGH)
    with Live(_table(results, 0, budget), console=console, refresh_per_second=2) as live:
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
    elapsed = time.monotonic() - start
    total_steps = sum(r.steps for r in results)
    console.print(
        f"{total_steps} steps in {elapsed:.1f}s; invariant checks run after every reference "
        f"step: {machines.STATS['invariant_checks']}; rules checked: {len(CHECKED_RULES)} "
        f"invariants + {sum(1 for r in RULES.values() if r.kind == 'contract')} contracts"
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
