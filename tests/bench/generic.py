"""The generic layer's figures: scheduler and harness throughput, and what an MMU-notifier
invalidation costs as its range grows while the number of mapped pages stays the same.

* Steps per second: page-fault actors (reads and writes over 64 pages of one slot) advanced
  one step at a time by the harness's Scheduler, with host writes in between: the overhead a
  state machine pays per interleaving step.
* Harness actions per second: the generic harness (kvmspec.fuzz.generic_harness) driven by
  the Atheris target's decoder in this process, on random inputs: each input sets up a fresh
  VM, and every action is decoded, applied and followed by every check, as the fuzzer and the
  state machine run it. This is the scheduler and machine overhead per interleaving step.
* Invalidation cost: one slot as large as the range, 1000 pages mapped through the flat MMU
  (all of them if the range has fewer), then invalidate_range_start and _end over the whole
  range. The cost should follow the mapped pages, not the range: nothing is sized by guest
  memory.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

from kvmspec.fuzz.fuzz_generic import run_input
from kvmspec.fuzz.scheduler import Scheduler
from kvmspec.reference import kvm_main
from kvmspec.reference.concurrency import run_to_completion
from kvmspec.reference.flat_mmu import FlatMmu
from kvmspec.reference.host import PROT_READ, PROT_WRITE, HostMm
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.mmu_notifier import (
    KvmMmuNotifier,
    kvm_mmu_notifier_invalidate_range_end,
    kvm_mmu_notifier_invalidate_range_start,
)
from kvmspec.reference.page_fault import kvm_page_fault
from kvmspec.spec.platforms import PlatformProfile
from kvmspec.spec.uapi.memslot_rules import MemoryRegion

PAGE = 4096
GPA = 1 << 32
RANGES = {"1 MiB": 1 << 20, "1 GiB": 1 << 30, "1 TiB": 1 << 40}
MAPPED = 1000


def _vm(profile: PlatformProfile, size: int) -> tuple[Kvm, FlatMmu, HostMm, int]:
    mmu = FlatMmu()
    kvm = Kvm(profile, mmu)
    host = HostMm(PAGE, profile.user_address_limit)
    host.notifier = KvmMmuNotifier(kvm)
    _, hva = host.mmap(min(size, 64 * PAGE), PROT_READ | PROT_WRITE)
    if size > 64 * PAGE:
        hva = 1 << 42  # a large slot's host range need not be mapped to be invalidated
    region = MemoryRegion(0, 0, GPA, size, hva)
    assert run_to_completion(kvm_main.kvm_vm_ioctl_set_memory_region(kvm, region, 1)) == 0
    return kvm, mmu, host, hva


def scheduler_steps_per_second(profile: PlatformProfile, seconds: float = 3.0) -> float:
    """Scheduler steps per second over fault actors, three in flight at a time."""
    kvm, _mmu, host, hva = _vm(profile, 64 * PAGE)
    rng = random.Random(0)
    scheduler = Scheduler()
    steps = 0
    counter = 0
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        for _ in range(100):
            while len(scheduler.actors) < 3:
                counter += 1
                gpa = GPA + rng.randrange(64) * PAGE
                fault = kvm_page_fault(kvm, host, 0, gpa, rng.random() < 0.5)
                scheduler.start(f"fault#{counter}", fault, lambda outcome: None)
            scheduler.step(rng.choice(scheduler.runnable()))
            steps += 1
            if rng.random() < 0.05:
                host.host_write(hva + rng.randrange(64) * PAGE, b"x")
        scheduler.schedule.clear()
    return steps / (time.perf_counter() - started)


@dataclass(frozen=True)
class HarnessSpeed:
    """Inputs run, actions applied and rejected by the decoder, and the seconds it took."""

    executions: int
    actions: int
    rejected: int
    seconds: float

    @property
    def actions_per_second(self) -> float:
        return self.actions / self.seconds

    @property
    def executions_per_second(self) -> float:
        return self.executions / self.seconds


def harness_speed(profile: PlatformProfile, seconds: float = 3.0, size: int = 256) -> HarnessSpeed:
    """Run random ``size``-byte inputs (seeded) through the generic fuzz target's decoder and
    harness for about ``seconds``; fail if one breaks a rule (the figure would be wrong)."""
    rng = random.Random(0)
    executions = actions = rejected = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        for _ in range(20):
            run = run_input(rng.randbytes(size), profile)
            assert not run.violations, run.violations
            executions += 1
            actions += run.actions
            rejected += run.rejected.total()
    return HarnessSpeed(executions, actions, rejected, time.perf_counter() - started)


@dataclass(frozen=True)
class InvalidationCost:
    range_name: str
    mapped: int
    microseconds: float


def invalidation_costs(profile: PlatformProfile, repeats: int = 7) -> list[InvalidationCost]:
    """Median time of one start/end pair over each range, with its pages mapped before."""
    costs = []
    for name, size in RANGES.items():
        kvm, mmu, _host, hva = _vm(profile, size)
        pages = min(MAPPED, size // PAGE)
        stride = size // PAGE // pages
        first = GPA // PAGE
        times = []
        for _ in range(repeats):
            with kvm.mmu_lock.write():
                for index in range(pages):
                    mmu.map(kvm, 0, first + index * stride, 1000 + index, True)
            start = time.perf_counter()
            kvm_mmu_notifier_invalidate_range_start(kvm, hva, hva + size)
            kvm_mmu_notifier_invalidate_range_end(kvm, hva, hva + size)
            times.append(time.perf_counter() - start)
            assert not mmu.ptes
        costs.append(InvalidationCost(name, pages, statistics.median(times) * 1e6))
    return costs
