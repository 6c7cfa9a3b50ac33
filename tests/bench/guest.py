"""Guest accesses per second (issue 4 §9): one trace of guest loads and stores, run on the
reference (its shadow MMU, with the linux-kvm guest's page tables) and on the real kernel
(the linux-kvm target: one KVM_SET_REGS and KVM_RUN per access, a CPL 3 guest) in one run.

The trace: one vCPU, one slot of PAGES pages (at 1 GiB, over one region of the VMM), then
ACCESSES 8-byte accesses, a third of them stores, each at a random 8-byte-aligned place of a
random page of the slot (seeded, so both targets run the same accesses). The first access
to a page faults it in on both sides; most accesses after that find it mapped (on the
reference, in the vCPU's TLB). Only the accesses are timed, through ``Target.apply``, with
no contract or invariant check.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from kvmspec.fuzz.ops import (
    CreateVcpu,
    GuestRead,
    GuestWrite,
    Mmap,
    Operation,
    RegionAddr,
    SetUserMemoryRegion,
)
from kvmspec.fuzz.targets import TargetUnavailable, make_target
from kvmspec.spec.platforms import PlatformProfile

PAGE = 4096
PAGES = 10_000
ACCESSES = 100_000
SLOT_GPA = 1 << 30
SEED = 4


@dataclass(frozen=True)
class GuestSpeed:
    """Accesses per second on each target; a string says why linux-kvm was not measured."""

    accesses: int
    pages: int
    reference: float
    kernel: float | str


def setup(pages: int) -> list[Operation]:
    """The region, the vCPU and the slot the accesses go to."""
    return [
        Mmap("ram", pages * PAGE),
        CreateVcpu(0),
        SetUserMemoryRegion(0, 0, SLOT_GPA, pages * PAGE, RegionAddr("ram")),
    ]


def accesses(count: int, pages: int, seed: int = SEED) -> list[Operation]:
    """``count`` 8-byte loads and stores at random places of the slot's ``pages`` pages."""
    rng = random.Random(seed)
    ops: list[Operation] = []
    for _ in range(count):
        gpa = SLOT_GPA + rng.randrange(pages) * PAGE + 8 * rng.randrange(PAGE // 8)
        if rng.randrange(3) == 0:
            ops.append(GuestWrite(gpa, 8, rng.getrandbits(64)))
        else:
            ops.append(GuestRead(gpa, 8))
    return ops


def _rate(name: str, profile: PlatformProfile, ops: list[Operation], pages: int) -> float:
    """Accesses per second of ``ops`` on a fresh target ``name``, each access checked to
    have completed (exit none)."""
    target = make_target(name, profile)
    try:
        for op in setup(pages):
            assert target.apply(op) == {"errno": 0}, op
        started = time.perf_counter()
        for op in ops:
            observed = target.apply(op)
            assert observed.get("exit") == "none", (op, observed)
        return len(ops) / (time.perf_counter() - started)
    finally:
        target.close()


def measure(profile: PlatformProfile, count: int = ACCESSES, pages: int = PAGES) -> GuestSpeed:
    """The same accesses on the reference and on linux-kvm (if it can run here)."""
    ops = accesses(count, pages)
    reference = _rate("reference", profile, ops, pages)
    kernel: float | str
    try:
        kernel = _rate("linux-kvm", profile, ops, pages)
    except (TargetUnavailable, ImportError) as reason:
        kernel = str(reason)
    return GuestSpeed(count, pages, reference, kernel)
