"""Memslot update throughput: the reference target against the real kernel, ioctl for ioctl.

The scenario of shared/kvm-reference/linux-kvm-here/bench_memslots.py: slot ``i`` is one page
at gpa 16 MiB + 2i pages, backed by page ``i`` of one host mapping, so a one-page gap follows
each slot and MOVE shifts every slot into its gap. Four passes over all slots are timed:
create, flags-only (KVM_MEM_LOG_DIRTY_PAGES on), move (into the gap, LOG kept) and delete.
Both targets are driven the same way, through ``Target.apply`` (the reference target runs the
model's ioctl path; the linux-kvm target packs the struct and calls ioctl), so the ratio
compares one KVM_SET_USER_MEMORY_REGION with another. Slot ids are 0..N-1 (32764 slots are
every user slot of the x86 profiles).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmspec.fuzz.ops import Mmap, RegionAddr, SetUserMemoryRegion
from kvmspec.fuzz.targets import Target, TargetUnavailable, make_target
from kvmspec.spec.platforms import PlatformProfile
from kvmspec.spec.uapi.constants import KVM_MEM_LOG_DIRTY_PAGES

PAGE = 4096
BASE = 16 << 20
HOST = "host"
HOST_PAGES = 32768
PHASES = ("create", "flags-only", "move", "delete")
SIZES = (100, 1000, 10000, 32764)


def _region(slot: int, shift: int, flags: int, size: int = PAGE) -> SetUserMemoryRegion:
    gpa = BASE + (2 * slot + shift) * PAGE
    return SetUserMemoryRegion(slot, flags, gpa, size, RegionAddr(HOST, slot * PAGE))


def phase_requests(nslots: int) -> dict[str, list[SetUserMemoryRegion]]:
    """The requests of each pass, built before any timing."""
    slots = range(nslots)
    log = KVM_MEM_LOG_DIRTY_PAGES
    return {
        "create": [_region(i, 0, 0) for i in slots],
        "flags-only": [_region(i, 0, log) for i in slots],
        "move": [_region(i, 1, log) for i in slots],
        "delete": [SetUserMemoryRegion(i, 0, 0, 0, 0) for i in slots],
    }


def one_run(target: Target, requests: dict[str, list[SetUserMemoryRegion]]) -> dict[str, float]:
    """Time the four passes on a fresh target; every request must succeed."""
    observed = target.apply(Mmap(HOST, HOST_PAGES * PAGE))
    if observed["errno"]:
        raise RuntimeError(f"{target.name}: mmap failed: {observed}")
    apply = target.apply
    seconds = {}
    for phase in PHASES:
        ops = requests[phase]
        start = time.perf_counter()
        results = [apply(op) for op in ops]
        seconds[phase] = time.perf_counter() - start
        failed = [(op, r) for op, r in zip(ops, results, strict=True) if r["errno"]]
        if failed:
            raise RuntimeError(f"{target.name} {phase}: {failed[0]}")
    return seconds


def repeats_for(nslots: int, repeats: int) -> int:
    """More repetitions where one pass is short (and noisy), fewer where it takes seconds."""
    if nslots <= 100:
        return repeats * 3
    if nslots >= 10000:
        return max(1, repeats - 2)
    return repeats


@dataclass
class Throughput:
    """Median operations per second of each pass, by slot count."""

    target: str
    ops_per_second: dict[int, dict[str, float]] = field(default_factory=dict)


def _median_rates(nslots: int, runs: list[dict[str, float]]) -> dict[str, float]:
    return {phase: nslots / statistics.median(run[phase] for run in runs) for phase in PHASES}


def _timed_run(
    factory: Callable[[], Target], requests: dict[str, list[SetUserMemoryRegion]]
) -> dict[str, float]:
    target = factory()
    try:
        return one_run(target, requests)
    finally:
        target.close()


def measure_both(
    profile: PlatformProfile, sizes: tuple[int, ...] = SIZES, repeats: int = 5
) -> tuple[Throughput, Throughput | str]:
    """The reference's figures, and linux-kvm's (or the reason it is unavailable).

    The two targets take turns, run for run, so that a slow spell of this (nested, shared)
    machine weighs on both medians alike instead of on whichever target ran during it.
    """
    reference_factory = functools.partial(make_target, "reference", profile)
    kernel_factory = functools.partial(make_target, "linux-kvm", profile)
    kernel_missing = ""
    try:
        kernel_factory().close()
    except (TargetUnavailable, ImportError, OSError) as reason:
        kernel_missing = str(reason) or type(reason).__name__
    reference, kernel = Throughput("reference"), Throughput("linux-kvm")
    for nslots in sizes:
        requests = phase_requests(nslots)
        reference_runs, kernel_runs = [], []
        for _ in range(repeats_for(nslots, repeats)):
            reference_runs.append(_timed_run(reference_factory, requests))
            if not kernel_missing:
                kernel_runs.append(_timed_run(kernel_factory, requests))
        reference.ops_per_second[nslots] = _median_rates(nslots, reference_runs)
        if kernel_runs:
            kernel.ops_per_second[nslots] = _median_rates(nslots, kernel_runs)
    return reference, (kernel_missing or kernel)
