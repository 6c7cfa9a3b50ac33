"""kvmspec's performance figures: ``make bench`` (``python -m bench`` with tests/ on the path).

One run measures, each next to its goal:

* :mod:`bench.memslots`: KVM_SET_USER_MEMORY_REGION create, flags-only, move and delete
  throughput on the reference target and on the real kernel (the linux-kvm target), with
  100 to 32764 one-page slots, and their ratio;
* :mod:`bench.lookup`: the cost of a gfn lookup with 10 slots against 32764 slots;
* :mod:`bench.memory`: the peak RSS growth of the model for a 1 TiB slot plus a full set of
  one-page slots, and the sparse dirty-bitmap cost of the 1 TiB slot;
* :mod:`bench.fuzzer`: the executions per second of ``fuzz/fuzz_memslots.py`` under libFuzzer;
* :mod:`bench.generic`: the generic layer: scheduler steps and harness actions per second (and
  ``fuzz/fuzz_generic.py``'s executions and actions per second under libFuzzer), and what an
  MMU-notifier invalidation costs as its range grows;
* :mod:`bench.guest`: guest accesses per second, one trace of 100,000 loads and stores over
  10,000 pages on the reference (the shadow MMU) and on the real kernel, and their ratio.

The figures are medians of repeated measurements. ``make bench`` sets ``KVMSPEC_CONTRACTS=off``
for the model measurements; the fuzzer is measured with the contracts on (as it runs) and off.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test

from kvmspec.fuzz import machines
from kvmspec.fuzz.campaign import SLICE_EXAMPLES as SLICE_EXAMPLES
from kvmspec.fuzz.profiles import THOROUGH, register_profiles

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Figure:
    """One measured figure and its goal. ``met`` is None for a figure without a goal."""

    name: str
    value: str
    goal: str = ""
    met: bool | None = None

    @property
    def verdict(self) -> str:
        return "" if self.met is None else ("PASS" if self.met else "MISS")


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """The median wall time of ``repeats`` calls of ``run``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_steps_per_second(machine: type[RuleBasedStateMachine], seconds: float) -> float:
    """Rules per second of a state machine, run as the campaign runs it (slices of
    ``SLICE_EXAMPLES`` examples of the thorough profile) for about ``seconds``."""
    register_profiles()
    slice_settings = settings(
        settings.get_profile(THOROUGH), max_examples=SLICE_EXAMPLES, database=None
    )
    before = machines.STATS["steps"]
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        run_state_machine_as_test(machine, settings=slice_settings)
    return (machines.STATS["steps"] - before) / (time.perf_counter() - started)
