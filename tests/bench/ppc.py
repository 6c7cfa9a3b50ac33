"""POWER Book3S HV figures: how fast its state machines, its Atheris target and its hypercalls run.

* HPT state-machine steps per second: the campaign's area ``ppc/ppc64-hv``
  (:func:`kvmspec.fuzz.ppc_machine.ppc_machine`) run in slices of ten examples under the
  ``kvmspec-thorough`` Hypothesis profile (no example database), for a time budget; a step
  is one rule, with every check after it.
* Radix state-machine steps per second: the area ``ppc/ppc64-hv-radix``
  (:class:`kvmspec.fuzz.radix_machine.RadixMachine`), run the same way.
* ``fuzz/fuzz_ppc.py`` under libFuzzer: executions per second (and harness actions per
  second, from its counters), measured by :func:`bench.fuzzer.measure` from
  ``corpus/seeds/ppc``.
* Hypercalls per second on a big table: an HPT of order 24 (a million entries) holding
  :data:`VALID_ENTRIES` valid entries entered with H_ENTER (not timed), then a timed mix of
  H_READ, H_PROTECT, H_REMOVE and H_ENTER on random ones of them (each removed entry is
  entered again, so the table stays that full).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import bench
from bench.fuzzer import FuzzScript
from kvmspec.fuzz.ppc_machine import ppc_machine
from kvmspec.fuzz.radix_machine import RadixMachine
from kvmspec.reference import kvm_main
from kvmspec.reference.concurrency import run_to_completion
from kvmspec.reference.host import PROT_READ, PROT_WRITE, HostMm
from kvmspec.reference.kvm import Kvm
from kvmspec.reference.ppc.hcalls import (
    H_SUCCESS,
    kvmppc_do_h_enter,
    kvmppc_do_h_remove,
    kvmppc_h_protect,
    kvmppc_h_read,
)
from kvmspec.reference.ppc.hpt import HPTES_PER_GROUP, Segment, hpt_hash, hpte_encode_v
from kvmspec.reference.ppc.hpt_mmu import HptMmu
from kvmspec.reference.ppc.hpte import HPTE_R_M, HPTE_V_VALID, PP_RWXX, PP_RXRX
from kvmspec.spec.platforms import PPC64_HV, PlatformProfile
from kvmspec.spec.uapi.memslot_rules import MemoryRegion

FUZZ_PPC = FuzzScript("fuzz/fuzz_ppc.py", "corpus/seeds/ppc", 256)
HCALL_ORDER = 24
VALID_ENTRIES = 100_000
SLOT_PAGES = 256
"""The guest's RAM in the hypercall figure: 256 host pages of 64 KiB (16 MiB), 4,096 pages
of the guest's 4 KiB, each entered about 24 times (rmap chains of about 390 entries)."""
GUEST_PAGES_PER_SEGMENT = 1 << 16
"""4 KiB pages in a 256 MiB segment: the entries span two segments."""


def machine_steps_per_second(profile: PlatformProfile = PPC64_HV, seconds: float = 5.0) -> float:
    """Rules per second of the HPT state machine (the campaign's, with its tolerance of the
    known kernel finding), for about ``seconds``."""
    return bench.machine_steps_per_second(ppc_machine(profile), seconds)


def radix_steps_per_second(seconds: float = 5.0) -> float:
    """Rules per second of the radix state machine, for about ``seconds``."""
    return bench.machine_steps_per_second(RadixMachine, seconds)


@dataclass(frozen=True)
class HcallSpeed:
    """The hypercall figure: calls per second of the timed mix, how many calls it made,
    the valid entries the table held, and how long entering them took (not in the figure)."""

    calls_per_second: float
    calls: int
    entries: int
    fill_seconds: float


class BigHpt:
    """An HPT guest with a table of ``order`` and one slot of :data:`SLOT_PAGES` pages, all
    faulted in; the guest translates 4 KiB pages of two segments."""

    def __init__(self, order: int = HCALL_ORDER) -> None:
        self.mmu = HptMmu(order)
        self.kvm = Kvm(PPC64_HV, self.mmu)
        self.host = HostMm(PPC64_HV.page_size, PPC64_HV.user_address_limit)
        size = SLOT_PAGES * PPC64_HV.page_size
        _, hva = self.host.mmap(size, PROT_READ | PROT_WRITE)
        for page in range(SLOT_PAGES):
            assert self.host.host_write(hva + page * PPC64_HV.page_size, b"x") == 0
        region = MemoryRegion(0, 0, 0, size, hva)
        assert run_to_completion(kvm_main.kvm_vm_ioctl_set_memory_region(self.kvm, region, 1)) == 0
        self.segments = (Segment(vsid=0x1234), Segment(vsid=0x5678))
        self.guest_ram_pages = size // 0x1000

    def translation(self, n: int) -> tuple[int, int, int]:
        """The guest's n-th translation, read-write, as H_ENTER takes it: the first index of
        its group, "v" and "r"."""
        segment = self.segments[n // GUEST_PAGES_PER_SEGMENT]
        ea = (n % GUEST_PAGES_PER_SEGMENT) * 0x1000
        group = hpt_hash(self.mmu.hpt, segment, ea)
        gpa = (n % self.guest_ram_pages) * 0x1000
        return group * HPTES_PER_GROUP, hpte_encode_v(segment, ea), gpa | HPTE_R_M | PP_RWXX

    def enter(self, translation: tuple[int, int, int]) -> int:
        """H_ENTER of ``translation``; the index it got."""
        group, v, r = translation
        status, index = run_to_completion(kvmppc_do_h_enter(self.kvm, self.host, 0, group, v, r))
        assert status == H_SUCCESS, f"H_ENTER at {group:#x}: {status}"
        return index


def hcalls_per_second(
    entries: int = VALID_ENTRIES, calls: int = 200_000, order: int = HCALL_ORDER, seed: int = 1
) -> HcallSpeed:
    """Fill an HPT of ``order`` with ``entries`` valid entries (H_ENTER, not timed), then
    time ``calls`` hypercalls in rounds of five on a random entry: H_READ, H_PROTECT to
    read-only, H_PROTECT back to read-write, H_REMOVE, and H_ENTER of it again."""
    vm = BigHpt(order)
    started = time.perf_counter()
    translations = [vm.translation(n) for n in range(entries)]
    index_of = [vm.enter(translation) for translation in translations]
    fill_seconds = time.perf_counter() - started
    kvm, host = vm.kvm, vm.host
    rng = random.Random(seed)
    picks = [rng.randrange(entries) for _ in range(calls // 5)]
    started = time.perf_counter()
    for n in picks:
        index = index_of[n]
        kvmppc_h_read(kvm, 0, index)
        kvmppc_h_protect(kvm, PP_RXRX, index, 0)
        kvmppc_h_protect(kvm, PP_RWXX, index, 0)
        kvmppc_do_h_remove(kvm, 0, index, 0)
        group, v, r = translations[n]
        _, index_of[n] = run_to_completion(kvmppc_do_h_enter(kvm, host, 0, group, v, r))
    seconds = time.perf_counter() - started
    valid = sum(1 for v, _ in vm.mmu.hpt.hptes.values() if v & HPTE_V_VALID)
    assert valid == entries, f"{valid} valid entries after the mix, not {entries}"
    made = 5 * len(picks)
    return HcallSpeed(made / seconds, made, entries, fill_seconds)
